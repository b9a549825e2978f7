"""The run directory (checkpointing/rundir.py): one owner, its files, clearing it."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import yaml

from dist_clm.checkpointing import rundir
from dist_clm.data.tokenizer import fingerprint, load_tokenizer, train_bpe
from dist_clm.errors import UserError
from dist_clm.parallel.process_group import DistEnv

MAIN = DistEnv(rank=0, local_rank=0, world_size=1, device="cpu")


def _touch(path, text="old"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_second_claim_is_refused_naming_the_holder_until_release(tmp_path):
    """One owner at a time: a second claim is refused with one sentence naming the run dir and the holder's pid;
    after release (or leaving the `with`) the directory can be claimed again."""
    run = tmp_path / "run"
    _touch(run / rundir.LOCK, "pid 1 on host gone, a longer text left by a run that was killed " * 3)
    owner = rundir.claim(run, MAIN)  # (a dead holder does not block; its text is replaced whole)
    assert re.fullmatch(rf"pid {os.getpid()} on host \S+ \(since [-0-9T:+]+\)", (run / rundir.LOCK).read_text())
    with pytest.raises(UserError) as e:
        rundir.claim(run, MAIN)
    msg = str(e.value)
    assert str(run) in msg and f"pid {os.getpid()}" in msg
    assert msg.endswith(".") and "\n" not in msg and msg.count(". ") == 0
    owner.release()
    assert (run / rundir.LOCK).read_text() == ""  # a run that ended names no holder (it is not a dead pid's)
    owner.release()  # a second release is harmless
    with rundir.claim(run, MAIN), pytest.raises(UserError, match="is in use by"):
        rundir.claim(run, MAIN)
    rundir.claim(run, MAIN).release()


def test_non_main_ranks_hold_nothing(tmp_path):
    """A rank other than 0 neither locks nor creates anything, and is not refused while rank 0 holds the dir."""
    worker = DistEnv(rank=1, local_rank=1, world_size=1, device="cpu")
    absent = tmp_path / "absent"
    rundir.claim(absent, worker).release()
    assert not absent.exists()
    with rundir.claim(tmp_path / "run", MAIN):
        other = rundir.claim(tmp_path / "run", worker)
        assert other._fd is None


def test_clear_deletes_exactly_the_run_outputs(tmp_path):
    """`clear` removes every name in RUN_OUTPUTS (files and directories) and nothing else, the lock included."""
    run = tmp_path / "run"
    for name in rundir.RUN_OUTPUTS:  # the directories (checkpoints, tokenizer, ...) with a file inside
        _touch(run / name if "." in name else run / name / "sub" / "f")
    kept = [rundir.LOCK, "notes.txt", "metrics.jsonl.bak", "data/metrics.jsonl"]
    for name in kept:
        _touch(run / name, "mine")
    written = {"checkpoints", "metrics.jsonl", "tensorboard", "skips.json", "tokenizer", "config.yaml"}
    assert written | {"ds_config.json", "ranks.json"} <= set(rundir.RUN_OUTPUTS)  # all that a run writes
    rundir.clear(run, "test")
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()) == sorted(kept)
    rundir.clear(run, "again")  # nothing left to delete: no error


def test_clear_empties_a_symlinked_checkpoints_dir_and_keeps_the_link(tmp_path):
    """A run whose checkpoints/ is a link to other storage is cleared without a traceback: the linked directory
    is emptied and the link stays where the user put it."""
    (tmp_path / "scratch" / "step_00000001").mkdir(parents=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").symlink_to(tmp_path / "scratch")
    rundir.clear(tmp_path / "run", "test")
    assert (tmp_path / "run" / "checkpoints").is_symlink() and list((tmp_path / "scratch").iterdir()) == []


@pytest.fixture(scope="module")
def other_tok_dir(tmp_path_factory):
    """A tokenizer unlike the data's (trained on a few words)."""
    return train_bpe(["alpha beta gamma delta"] * 4, tmp_path_factory.mktemp("other") / "tok", vocab_size=300)


def test_write_run_files_writes_config_ds_config_ranks_and_tokenizer(tmp_path, tokenizer_dir):
    """config.yaml keeps the config (in its order), ds_config.json and ranks.json hold what was given, and the
    tokenizer is saved; a second call keeps a tokenizer that is already the data's."""
    tok = load_tokenizer(tokenizer_dir)
    config = {"train": {"max_steps": 5, "lr": 0.001}, "model": {"preset": "tiny"}, "data": {"path": "/d"}}
    ds = {"train_batch_size": 8, "zero_optimization": {"stage": 2}}
    world = [{"rank": 0, "node": "n0", "local_rank": 0, "pid": 11}, {"rank": 1, "node": "n1", "local_rank": 0}]
    rundir.write_run_files(tmp_path, config, tok, ds, world)
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written == config and list(written) == ["train", "model", "data"]
    assert json.loads((tmp_path / "ds_config.json").read_text()) == ds
    assert json.loads((tmp_path / "ranks.json").read_text()) == world
    assert fingerprint(load_tokenizer(tmp_path / "tokenizer")) == fingerprint(tok)
    (tmp_path / "tokenizer" / "marker").write_text("x")
    rundir.write_run_files(tmp_path, {"new": 1}, tok, ds, world)
    assert (tmp_path / "tokenizer" / "marker").exists()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {"new": 1}


@pytest.mark.parametrize("with_checkpoint", [False, True], ids=["no-checkpoint-replaced", "checkpoint-kept"])
def test_write_run_files_replaces_a_stale_tokenizer_only_without_checkpoints(
    tmp_path, tokenizer_dir, other_tok_dir, with_checkpoint
):
    """Another tokenizer left by a start that saved no checkpoint is replaced by the data's; one that a complete
    checkpoint was trained with is kept (the checkpoint's own checks decide about it)."""
    shutil.copytree(other_tok_dir, tmp_path / "tokenizer")
    if with_checkpoint:
        _touch(tmp_path / "checkpoints" / "step_00000002" / "complete.json", "{}")
    tok = load_tokenizer(tokenizer_dir)
    rundir.write_run_files(tmp_path, {}, tok, {}, [])
    expected = load_tokenizer(other_tok_dir) if with_checkpoint else tok
    assert fingerprint(load_tokenizer(tmp_path / "tokenizer")) == fingerprint(expected)
    assert fingerprint(load_tokenizer(other_tok_dir)) != fingerprint(tok)
