"""Shared memory after kill -9, and runs side by side (real processes under the deepspeed launcher).

The loader keeps nothing in shared memory (it reads MDS shards with streaming's readers, no
StreamingDataset). DeepSpeed's CPU all-reduce does: one segment per rank, named after the master address,
port and rank, which DeepSpeed never removes. dist_clm unlinks each rank's name as soon as every rank has
mapped it, and removes a stale one left under this run's own name by a killed run.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dist_clm.checkpointing.checkpointer import complete_checkpoints
from dist_clm.parallel.process_group import free_port
from tests.helpers import BIN, TINY, metrics, new_in_shared_memory, train_losses

pytestmark = pytest.mark.slow


DS_SHM = "deepspeed_allreduce_buffer_"


def start(run_dir, data_dir, port: int, *extra: str) -> subprocess.Popen:
    cmd = [
        str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "--module", "dist_clm", "train",
        *TINY, f"data.path={data_dir}", f"run.dir={run_dir}", "data.num_workers=2", "train.eval_every=0",
        "train.log_every=1", *extra,
    ]  # fmt: skip
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=os.environ.copy())


def ours(port: int) -> set[str]:
    return {
        n for n in os.listdir("/dev/shm") if n.startswith(DS_SHM) and n.endswith(tuple(f"_{port}_{r}" for r in (0, 1)))
    }


def test_kill_9_leaves_nothing_behind_and_the_rerun_resumes(tmp_path, data_dir):
    port = free_port()
    before = set(os.listdir("/dev/shm"))
    # a stale segment under this run's own names, as a killed run of an older version would leave
    for rank in (0, 1):
        (Path("/dev/shm") / f"{DS_SHM}{os.getuid()}_127.0.0.1_{port}_{rank}").write_bytes(b"x")
    run = tmp_path / "run"
    proc = start(run, data_dir, port, "train.max_steps=400", "checkpoint.save_every=2")
    deadline = time.time() + 300
    while not complete_checkpoints(run) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert complete_checkpoints(run), (run.parent / "run.log").read_text()[-3000:]
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher, both ranks and their loader workers, mid-training
    proc.wait()
    assert ours(port) == set()  # stale ones removed, the live ones unlinked once mapped
    assert new_in_shared_memory(before) == set()  # nothing new in shared memory at all

    killed_at = int(complete_checkpoints(run)[-1].name.split("_")[1])
    skip = len(metrics(run))
    again = start(run, data_dir, port, f"train.max_steps={killed_at + 3}", "checkpoint.save_every=2")
    assert again.wait(timeout=300) == 0, (run.parent / "run.log").read_text()[-3000:]
    assert list(train_losses(metrics(run, skip))) == [killed_at + 1, killed_at + 2, killed_at + 3]
    assert new_in_shared_memory(before) == set()


def test_two_runs_side_by_side_on_one_data_directory(tmp_path, data_dir):
    before = set(os.listdir("/dev/shm"))
    runs = [tmp_path / "a", tmp_path / "b"]
    procs = [start(r, data_dir, free_port(), "train.max_steps=6", "checkpoint.save_every=3") for r in runs]
    for r, p in zip(runs, procs, strict=True):
        assert p.wait(timeout=400) == 0, (r.parent / f"{r.name}.log").read_text()[-3000:]
        assert list(train_losses(metrics(r))) == list(range(1, 7))
    assert train_losses(metrics(runs[0])) == pytest.approx(train_losses(metrics(runs[1])), rel=1e-5)  # same run
    assert new_in_shared_memory(before) == set()
