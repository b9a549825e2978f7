"""A run directory has one owner and keeps its training; checkpoints are durable, whole or not taken, and
readers are not pulled from under; state loads without running code. Real processes, real files."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config

from dist_clm.checkpointing.checkpointer import COMPLETE, Checkpointer, RandomState
from dist_clm.errors import UserError
from dist_clm.parallel.process_group import DistEnv, free_port
from tests.helpers import BIN, REPO, TINY, assert_clean_error, metrics, run_cli, train_losses

# the overrides of the session's trained_run fixture (12 steps, checkpoints at 6 and 12)
TRAINED = ["train.max_steps=12", "checkpoint.save_every=6", "train.eval_every=6", "train.log_every=3",
           "distributed.zero_stage=2"]  # fmt: skip


def copy_run(trained_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


def wait_for(predicate, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_second_trainer_is_refused_while_the_first_runs_and_a_dead_ones_lock_goes_with_it(tmp_path, data_dir):
    run = tmp_path / "run"
    common = [*TINY, f"data.path={data_dir}", f"run.dir={run}", "checkpoint.save_every=2", "train.log_every=1",
              "train.eval_every=0"]  # fmt: skip
    first = subprocess.Popen([str(BIN / "dist-clm"), "train", *common, "train.max_steps=100000"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: (run / "metrics.jsonl").is_file() and len(train_losses(metrics(run))) >= 3, "training")
        second = run_cli("train", *common, "train.max_steps=100000")
        assert_clean_error(second, f"run directory '{run}' is in use by pid {first.pid} on host", "another run.dir")
        assert len(list((run / "checkpoints").glob("step_*"))) >= 1  # the first one's checkpoints are untouched
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a dead holder: the kernel drops its lock
        first.wait()
    step = max(json.loads(p.read_text())["step"] for p in (run / "checkpoints").glob(f"step_*/{COMPLETE}"))
    r = run_cli("train", *common, f"train.max_steps={step + 1}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr


def test_a_run_directory_keeps_its_training(trained_run, tmp_path, data_dir, corpus_dir):
    run = copy_run(trained_run, tmp_path)
    same = [*TINY, f"data.path={data_dir}", f"run.dir={run}"]

    r = run_cli("train", *same, *TRAINED, "optim.lr=1e-3")
    assert_clean_error(r, "holds checkpoints of another training", "optim.lr: 0.003 -> 0.001", "run.overwrite=true")
    r = run_cli("train", *same, *TRAINED, "checkpoint.resume=false")
    assert_clean_error(r, "checkpoint.resume=false but run directory", "step_00000012", "run.overwrite=true")

    # data made with another tokenizer, in a directory of the same name
    from dist_clm.data import sources
    from dist_clm.data.prepare import prepare
    from dist_clm.data.tokenizer import train_bpe

    other_tok = train_bpe(sources.iter_documents(sources.resolve_inputs([str(corpus_dir)])), tmp_path / "tok2", 300)
    other = tmp_path / "other" / data_dir.name
    prepare(other_tok, other, [str(corpus_dir)], val_fraction=0.15, chunk_tokens=1000, progress=False)
    r = run_cli("train", *TINY, f"data.path={other}", f"run.dir={run}", *TRAINED)
    assert_clean_error(r, "holds checkpoints of another training", "the training data")
    assert f"path: {data_dir}" in (run / "config.yaml").read_text()  # nothing of the refused runs was written

    # what may change: the length of the run (and intervals); it continues
    r = run_cli("train", *same, *TRAINED[1:], "train.max_steps=13")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr and list(train_losses(metrics(run)))[-1] == 13

    # an explicit overwrite starts afresh: the earlier run's checkpoints and metrics are gone
    r = run_cli("train", *same, *TRAINED, "optim.lr=1e-3", "train.max_steps=3", "train.log_every=1",
                "run.overwrite=true")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "deleting the earlier run" in r.stdout + r.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000003"]
    assert list(train_losses(metrics(run))) == [1, 2, 3] and "lr: 0.001" in (run / "config.yaml").read_text()


def test_checkpoints_and_prepared_data_are_durable_before_they_are_marked_complete(tmp_path, data_dir, corpus_dir,
                                                                                   tokenizer_dir):  # fmt: skip
    def record(*argv) -> list:
        out = tmp_path / f"record_{argv[0]}.json"
        r = subprocess.run([sys.executable, str(REPO / "tests" / "fsync_probe.py"), str(out), *argv],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(out.read_text())

    run = tmp_path / "run"
    events = record("train", *TINY, f"data.path={data_dir}", f"run.dir={run}", "train.max_steps=3",
                    "checkpoint.save_every=1", "train.eval_every=0", "train.eval_blocks=1")  # fmt: skip
    for tag_dir in sorted((run / "checkpoints").glob("step_*")):
        marker = json.loads((tag_dir / COMPLETE).read_text())
        # the marker's own rename: after every file it lists and the directory were fsynced
        done = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(tag_dir / COMPLETE))
        synced = {e[1] for e in events[:done] if e[0] == "fsync"}
        assert set(marker["files"]) and {str(tag_dir / f) for f in marker["files"]} <= synced
        assert str(tag_dir) in synced
        assert ["fsync", str(tag_dir)] in events[done + 1 :]  # and the rename itself

    out = tmp_path / "prepared"
    events = record("prepare", str(corpus_dir), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--quiet")
    partial = str(out.with_name(f".{out.name}.partial"))
    done = events.index(["rename", partial, str(out)])
    synced = {e[1] for e in events[:done] if e[0] == "fsync"}
    files = {str(p).replace(str(out), partial) for p in out.rglob("*")}
    assert files and files <= synced  # every file and directory, before the directory got its final name
    assert ["fsync", str(out.parent)] in events[done + 1 :]


def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_continues_exactly(trained_run, tmp_path,
                                                                                         data_dir):  # fmt: skip
    expected = train_losses(metrics(trained_run))
    for damage in ("remove", "truncate"):
        run = copy_run(trained_run, tmp_path / damage)
        optim = next((run / "checkpoints" / "step_00000012").glob("*optim_states.pt"))
        if damage == "remove":
            optim.unlink()
        else:
            optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])
        skip = len(metrics(run))
        r = run_cli("train", *TINY, f"data.path={data_dir}", f"run.dir={run}", *TRAINED)
        assert r.returncode == 0, r.stderr[-3000:]
        out = r.stdout + r.stderr
        assert "step_00000012 is damaged" in out and optim.name in out and "falling back" in out
        assert "resumed from" in out and "step_00000006 at step 6" in out
        assert train_losses(metrics(run, skip)) == {9: expected[9], 12: expected[12]}  # bit for bit

    # every checkpoint damaged: one sentence, not a traceback
    for tag_dir in (run / "checkpoints").glob("step_*"):
        next(tag_dir.glob("*optim_states.pt")).unlink()
    r = run_cli("train", *TINY, f"data.path={data_dir}", f"run.dir={run}", *TRAINED)
    assert_clean_error(r, "can be loaded whole", "run.overwrite=true")

    # the project's own state loads without running code
    tag_dir = trained_run / "checkpoints" / "step_00000012"
    assert json.loads((tag_dir / "train_state.json").read_text())["parts"]["progress"]["step"] == 12
    assert set(torch.load(tag_dir / "random_rank0.pt", weights_only=True)) >= {"python", "numpy", "torch"}


AGREE = """
import os, sys
from pathlib import Path
from dist_clm.parallel import process_group
from dist_clm.checkpointing.checkpointer import Checkpointer
env = process_group.init()
ckpt = Checkpointer(Path(sys.argv[1]) / f"view{env.rank}", 2, env, zero_stage=2)
(Path(sys.argv[1]) / f"chosen{env.rank}").write_text(ckpt.latest().name)
process_group.shutdown()
"""


@pytest.mark.slow
def test_the_ranks_agree_on_the_checkpoint_to_resume(tmp_path):
    # two views of one run directory, as ranks on a caching shared filesystem may have: rank 1 does not see
    # step 12 complete yet; both must resume from step 8
    for rank, steps in ((0, (4, 8, 12)), (1, (4, 8))):
        for step in steps:
            d = tmp_path / f"view{rank}" / "checkpoints" / f"step_{step:08d}"
            d.mkdir(parents=True)
            (d / COMPLETE).write_text(json.dumps({"step": step, "zero_stage": 2, "world_size": 2, "files": {}}))
    (tmp_path / "agree.py").write_text(AGREE)
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(tmp_path / "agree.py"), str(tmp_path)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(tmp_path / f"chosen{rank}").read_text() for rank in (0, 1)] == ["step_00000008"] * 2


@pytest.mark.slow
def test_pruning_leaves_a_checkpoint_that_is_being_read(trained_run, tmp_path, data_dir):
    run = copy_run(trained_run, tmp_path)
    hold = ("import sys, time\nfrom dist_clm.checkpointing.checkpointer import reading\n"
            "with reading(sys.argv[1]) as tag:\n    print(tag, flush=True)\n    time.sleep(600)\n")  # fmt: skip
    reader = subprocess.Popen([sys.executable, "-c", hold, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip().endswith("step_00000012")  # held from here on
        r = run_cli("train", *TINY, f"data.path={data_dir}", f"run.dir={run}", *TRAINED[1:], "train.max_steps=14",
                    "checkpoint.save_every=1", "checkpoint.keep_last=1")  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        assert "step_00000012 a while: a reader" in r.stderr
        kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
        assert kept == ["step_00000012", "step_00000014"]  # 6 and 13 pruned, 12 kept for its reader
        assert (run / "checkpoints" / "step_00000012" / COMPLETE).is_file()
    finally:
        reader.kill()
        reader.wait()


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_sentence(tmp_path, data_dir):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        common = [*TINY, f"data.path={data_dir}", f"run.dir={mnt / 'run'}", "checkpoint.save_every=1",
                  "train.eval_every=0", "train.eval_blocks=1", "run.tensorboard=false"]  # fmt: skip
        r = run_cli("train", *common, "train.max_steps=3")  # refused before a byte of the checkpoint is written
        assert_clean_error(r, "not enough space to save checkpoint", "step_00000001", "MiB free", "free space")

        # a save that runs out of space while writing (its size was underestimated): what torch.save raises
        # on a full disk (a RuntimeError from its zip writer) becomes the same kind of sentence
        class Engine:
            def save_checkpoint(self, save_dir, tag, save_latest):
                (Path(save_dir) / tag).mkdir(parents=True)
                torch.save(torch.zeros(1 << 20), Path(save_dir) / tag / "model_states.pt")  # 4 MiB

        env = DistEnv(rank=0, local_rank=0, world_size=1, device="cpu")
        with pytest.raises(UserError, match=r"could not save checkpoint .*step_00000005.* free on its filesystem"):
            Checkpointer(mnt / "fake", 1, env, zero_stage=2).save(Engine(), 5, {}, RandomState(env), GPT2Config())

        # the same write failing in the background writer: the save returns, its completion says so
        class EngineWithWriter(Engine):
            checkpoint_engine, world_size = None, 1

            def save_checkpoint(self, save_dir, tag, save_latest):
                (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
                self.checkpoint_engine.save({"w": torch.zeros(1 << 20)}, str(Path(save_dir) / tag / "states.pt"))

            def zero_optimization_stage(self):
                return 2

        shutil.rmtree(mnt / "fake")
        background = Checkpointer(mnt / "fake", 1, env, zero_stage=2, background=True)
        background.save(EngineWithWriter(), 6, {}, RandomState(env), GPT2Config())  # snapshotted, not yet written
        assert background.pending is not None
        with pytest.raises(UserError, match=r"could not save checkpoint .*step_00000006.* free on its filesystem"):
            background.wait()
        assert not (mnt / "fake" / "checkpoints" / "step_00000006" / COMPLETE).exists()
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
