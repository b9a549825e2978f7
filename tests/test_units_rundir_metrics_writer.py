"""Fast unit tests (no training process) for the run directory's lock and files (checkpointing/rundir.py), the logged
numbers (observability/metrics.py) and the background checkpoint writer (checkpointing/writer.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zipfile
from types import SimpleNamespace

import psutil
import pytest
import torch
import yaml
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo

from dist_clm.checkpointing import rundir
from dist_clm.checkpointing.writer import BackgroundWriter
from dist_clm.data.tokenizer import fingerprint, load_tokenizer, train_bpe
from dist_clm.errors import UserError
from dist_clm.observability.metrics import LogWindow, Metrics, peak_flops, peak_for
from dist_clm.parallel.process_group import DistEnv

MAIN = DistEnv(rank=0, local_rank=0, world_size=1, device="cpu")


def _touch(path, text="old"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ---- checkpointing/rundir.py


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


# ---- observability/metrics.py


def test_metrics_jsonl_rows_and_notes_on_main_only(tmp_path):
    """The main rank appends one JSON row per log/note call (none for empty scalars), no TensorBoard unless
    asked; a reopened Metrics appends; other ranks write nothing."""
    m = Metrics(tmp_path, is_main=True, tensorboard=False)
    m.log(3, {"train/loss": 1.5, "train/lr": 0.01})
    m.log(4, {})
    m.note(5, "train/skipped", "spike")
    m.close()
    m = Metrics(tmp_path, is_main=True, tensorboard=False)  # a resumed run appends
    m.log(6, {"val/loss": 2.0})
    m.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = [{"step": 3, "train/loss": 1.5, "train/lr": 0.01}, {"step": 5, "train/skipped": "spike"}]
    assert rows == [*expected, {"step": 6, "val/loss": 2.0}]
    assert not (tmp_path / "tensorboard").exists()
    (other := tmp_path / "rank1").mkdir()
    w = Metrics(other, is_main=False, tensorboard=True)
    w.log(1, {"train/loss": 1.0})
    w.note(1, "x", "y")
    w.close()
    assert list(other.iterdir()) == []


def test_metrics_tensorboard_events_hold_the_scalars(tmp_path):
    """With tensorboard=True the scalars also go to an event file under RUN/tensorboard, readable back."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    m = Metrics(tmp_path, is_main=True, tensorboard=True)
    m.log(7, {"train/loss": 2.5})
    m.note(8, "train/skipped", "why")
    m.close()
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    seen = {(v.tag, e.step) for e in EventFileLoader(str(events)).Load() for v in e.summary.value}
    assert ("train/loss", 7) in seen and any(tag.startswith("train/skipped") and s == 8 for tag, s in seen)


def _window(world=1, sources=("a", "b")):
    return LogWindow(list(sources), tokens_per_step=1000, flops_per_token=6e6, world=world, device="cpu")


def test_log_window_emit_computes_the_window_scalars():
    """Mean loss over good steps only, tokens/s and data-wait fraction over the window's time, token sum,
    per-source shares, MFU against the peak (none on the CPU), the process's RSS on CPU; then a fresh window."""
    w = _window()
    assert w.peak is None and peak_flops("cpu") is None  # the CPU has no peak: no MFU
    w.peak = 1e12
    w.add(2.0, True, 0.5, [2, 1], [0.1], token_sum=10)
    w.add(50.0, False, 0.0, [1, 0], [0.1], token_sum=20)  # a skipped step: its loss does not count
    w.add(4.0, True, 0.3, [0, 0], [0.1], token_sum=5)
    w.start = time.perf_counter() - 2.0  # the window lasted 2 s
    out = w.emit(lr=0.01, grad_norm=0.7, tokens_seen=3000, skipped_steps=1)
    assert out["train/loss"] == 3.0
    rates = [out["train/tokens_per_s"], out["train/data_wait_frac"], out["train/mfu"]]  # 3000 tokens in 2 s ...
    assert rates == pytest.approx([1500, 0.8 / 2, 1500 * 6e6 / 1e12], rel=1e-3)
    assert out["data/token_sum"] == 35 and (out["data/mix/a"], out["data/mix/b"]) == (0.75, 0.25)
    assert (out["train/lr"], out["train/grad_norm"], out["train/tokens_seen"], out["train/skipped_steps"]) == (
        0.01, 0.7, 3000, 1
    )  # fmt: skip
    assert out["memory/rss_gib"] == pytest.approx(psutil.Process().memory_info().rss / 2**30, rel=0.2)  # on CPU
    assert "train/straggler_rank" not in out  # one rank
    w.peak = None
    w.add(9.0, False, 0.0, [0, 1], [0.1])
    again = w.emit(lr=0.01, grad_norm=0.0, tokens_seen=4000, skipped_steps=2)
    assert "train/loss" not in again and "train/mfu" not in again and again["data/token_sum"] == 0
    assert (again["data/mix/a"], again["data/mix/b"]) == (0.0, 1.0)  # the new window alone
    one = _window(sources=("only",))
    one.add(1.0, True, 0.0, [3], [0.0])
    assert not any(k.startswith("data/mix/") for k in one.emit(lr=0, grad_norm=0, tokens_seen=0, skipped_steps=0))


def test_log_window_straggler_and_persistent_straggler():
    """The straggler is the rank arriving last on average, its lag over the (lower) median rank; it is persistent
    only when the same rank lags by STRAGGLER_LAG or more two windows in a row."""
    two = _window(world=2)
    two.add(1.0, True, 0.6, [1, 0], [1.0, 3.0])
    assert two.straggler() == (1, 3.0)
    two.start = time.perf_counter() - 2.0
    out = two.emit(lr=0, grad_norm=0, tokens_seen=0, skipped_steps=0)
    assert out["train/data_wait_frac"] == pytest.approx(0.6 / (2 * 2.0), rel=1e-3)  # the mean over the ranks
    assert (out["train/straggler_rank"], out["train/straggler_lag"]) == (1, 3.0)
    w = _window(world=3)
    persistent = []
    for arrivals in ([1.0, 1.0, 2.0], [1.0, 1.0, 2.0], [1.0, 1.0, 2.0], [1.0, 1.2, 1.0], [2.0, 1.0, 1.0]):
        w.add(1.0, True, 0.0, [1, 1], arrivals)
        out = w.emit(lr=0, grad_norm=0, tokens_seen=0, skipped_steps=0)
        persistent.append(w.persistent_straggler)
    assert (out["train/straggler_rank"], out["train/straggler_lag"]) == (0, 2.0)
    assert persistent == [None, 2, 2, None, None]


SXM, PCIE, V100 = "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "Tesla V100-SXM2-32GB"
PEAK_CASES = [  # (card name as torch reports it, precision, train.tf32, peak): variants told apart by their words
    (SXM, "bf16", True, 989e12), (PCIE, "bf16", True, 756e12), ("NVIDIA H100 NVL", "fp16", True, 835e12),
    (SXM, "fp32", True, 495e12), (SXM, "fp32", False, 67e12), (PCIE, "fp32", False, 51e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", True, 312e12), ("NVIDIA GH200 480GB", "bf16", True, 989e12),
    ("NVIDIA L40S", "bf16", True, 362e12), ("NVIDIA L4", "bf16", True, 121e12), ("Tesla T4", "fp16", True, 65e12),
    (V100, "bf16", True, None), ("NVIDIA GeForce RTX 4090", "bf16", True, None), ("AMD MI300X", "bf16", True, None),
]  # fmt: skip


@pytest.mark.parametrize("name, precision, tf32, peak", PEAK_CASES)
def test_peak_for_card_and_precision(name, precision, tf32, peak):
    """PEAKS' figure for the card's name (variants told apart) in the precision; an unknown card has none."""
    assert peak_for(name, precision, tf32) == peak


def test_peak_for_fp32_falls_back_when_the_card_has_no_tf32():
    """A V100 runs fp32 on its CUDA cores whatever train.tf32 says, so MFU uses its fp32 figure (15.7 TFLOP/s)."""
    assert peak_for(V100, "fp32", tf32=True) == 15.7e12


# ---- checkpointing/writer.py


def test_writer_snapshots_at_save_and_writes_after_commit(tmp_path):
    """save copies the tensors then and there (a later in-place change is not written); nothing is written before
    commit; after drain the file loads with the saved values, a tensor saved twice still one storage."""
    w = BackgroundWriter()
    assert w.preserves_storage_sharing() is False and not w.busy()
    t = torch.arange(4.0)
    state = {"w": t, "alias": t, "nested": [t * 2, (1, "x")], "step": 3}
    path = tmp_path / "mp_rank_00_model_states.pt"
    w.save(state, str(path))
    t.add_(100)
    assert w.busy() and not path.exists()
    assert w.commit(CheckpointCommitInfo(tag="step_1", save_dir=str(tmp_path), save_latest=False)) is True
    deadline = time.monotonic() + 10
    while w.busy() and time.monotonic() < deadline:  # commit starts the writes; drain is not needed for them
        time.sleep(0.01)
    assert path.exists()
    w.drain()
    assert not w.busy() and w.take_error() is None
    got = torch.load(path, weights_only=False)
    assert torch.equal(got["w"], torch.arange(4.0)) and torch.equal(got["nested"][0], torch.arange(4.0) * 2)
    assert got["alias"].data_ptr() == got["w"].data_ptr()
    assert got["nested"][1] == (1, "x") and got["step"] == 3
    assert zipfile.is_zipfile(path)


def test_writer_reports_a_failed_write_once_and_writes_nothing_more_until_taken(tmp_path):
    """A write that fails (its directory does not exist) is kept as `error`: take_error returns it once, then None;
    the same checkpoint's later files are not written; after take_error the writer writes again."""
    w = BackgroundWriter()
    w.save({"a": torch.ones(2)}, str(tmp_path / "missing" / "a.pt"))
    w.save({"b": torch.ones(2)}, str(tmp_path / "b.pt"))
    w.drain()
    assert not w.busy()
    error = w.take_error()
    assert isinstance(error, Exception) and "missing" in str(error)
    assert w.take_error() is None
    assert not (tmp_path / "b.pt").exists()
    w.save({"c": torch.zeros(3)}, str(tmp_path / "c.pt"))
    w.drain()
    assert w.take_error() is None and torch.equal(torch.load(tmp_path / "c.pt")["c"], torch.zeros(3))


def test_replacing_installs_the_writer_keeping_the_serialization(tmp_path):
    """replacing(engine) makes the writer the engine's checkpoint engine with the old engine's zipfile setting
    (legacy, non-zip files when it was off); without a setting the zip format is used."""
    engine = SimpleNamespace(checkpoint_engine=SimpleNamespace(zipfile_serialization=False))
    w = BackgroundWriter.replacing(engine)
    assert engine.checkpoint_engine is w and w.zipfile_serialization is False
    w.save({"x": torch.ones(3)}, str(tmp_path / "legacy.pt"))
    w.drain()
    assert not zipfile.is_zipfile(tmp_path / "legacy.pt")
    assert torch.equal(torch.load(tmp_path / "legacy.pt")["x"], torch.ones(3))
    assert BackgroundWriter.replacing(SimpleNamespace(checkpoint_engine=object())).zipfile_serialization is True
