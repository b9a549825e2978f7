"""Signals the way they arrive in practice end in a checkpoint: SIGTERM to the whole process group (loader
workers included), and SIGTERM to the `deepspeed` or `torchrun` command alone. No process outlives its
launcher, and the rerun continues from the checkpoint."""

import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from dist_clm.checkpointing.checkpointer import COMPLETE, complete_checkpoints
from dist_clm.parallel.process_group import free_port
from dist_clm.training.preemption import PREEMPTED_EXIT
from tests.helpers import BIN, TINY, metrics, run_cli, train_losses


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_steps(run, n: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        if (run / "metrics.jsonl").is_file() and len(train_losses(metrics(run))) >= n:
            return
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    raise AssertionError("training did not start")


def session_processes(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def wait_until_gone(sid: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and session_processes(sid):
        time.sleep(0.5)
    left = session_processes(sid)
    for p in left:
        p.kill()
    assert not left, f"processes outlived their launcher: {[p.cmdline()[:4] for p in left]}"


def checkpoint_step(run) -> int:
    [only] = complete_checkpoints(run)
    return json.loads((only / COMPLETE).read_text())["step"]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_to_the_process_group_ends_in_a_checkpoint(tmp_path, data_dir, workers):
    run = tmp_path / "run"
    common = [*TINY, f"data.path={data_dir}", f"run.dir={run}", f"data.num_workers={workers}",
              "checkpoint.save_every=0", "train.log_every=1", "train.eval_every=0"]  # fmt: skip
    proc = start([str(BIN / "dist-clm"), "train", *common, "train.max_steps=100000"])
    wait_for_steps(run, 3, proc)
    if not workers:  # `dist-clm status` while it trains, once it stopped, and watching its rerun to the end
        shown = run_cli("status", str(run)).stdout
        assert f"run {run}: training (pid {proc.pid} on host " in shown and " of 100000 (0%)" in shown, shown
    os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its loader workers alike, as SLURM and terminals do
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT, err[-3000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    at = checkpoint_step(run)
    assert list(train_losses(metrics(run))) == list(range(1, at + 1))
    wait_until_gone(proc.pid, 30)
    if not workers:
        shown = run_cli("status", str(run)).stdout
        assert f"stopped at step {at} by SIGTERM after a checkpoint; rerun it to continue" in shown, shown
        assert f"last complete checkpoint: step {at} (" in shown

    skip = len(metrics(run))
    rerun = subprocess.Popen([str(BIN / "dist-clm"), "train", *common, f"train.max_steps={at + 2}",
                              "stability.fault_injection=1-100000:sleep0.3"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    if not workers:
        from dist_clm.checkpointing.rundir import holder

        deadline = time.time() + 120
        while holder(run) is None and rerun.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        watched = run_cli("status", str(run), "--watch", "0.2").stdout.split("\n\n")
        assert "training (pid" in watched[0] and f"finished at step {at + 2}" in watched[-1], watched
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert list(train_losses(metrics(run, skip))) == [at + 1, at + 2]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_sigterm_to_the_launcher_command_ends_in_a_checkpoint(tmp_path, data_dir, launcher):
    run = tmp_path / "run"
    port = str(free_port())
    if launcher == "deepspeed":
        head = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port, "--module"]
    else:
        head = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, "-m"]
    common = [*TINY, f"data.path={data_dir}", f"run.dir={run}", "data.num_workers=2", "checkpoint.save_every=0",
              "train.log_every=1", "train.eval_every=0"]  # fmt: skip
    proc = start([*head, "dist_clm", "train", *common, "train.max_steps=100000"])
    wait_for_steps(run, 3, proc)
    proc.send_signal(signal.SIGTERM)  # the command the user started, alone
    proc.communicate(timeout=300)
    wait_until_gone(proc.pid)  # every rank and worker ends, none is left running without its launcher
    at = checkpoint_step(run)
    assert at >= 3 and list(train_losses(metrics(run))) == list(range(1, at + 1))


@pytest.mark.parametrize("held", ["alive", "in_a_cycle"])
def test_a_process_with_live_loader_workers_still_exits(data_dir, held):
    """Workers ignore SIGTERM (training's worker_init: it is the main process's), so multiprocessing's exit
    handler, which SIGTERMs them, would wait for them forever: the loader stops them first, also when its iterator
    was lost in a reference cycle (as a traceback makes), whose collection closes the workers' queues before they
    are told."""
    code = (
        "import gc\nfrom dist_clm.data.loader import TrainLoader\nfrom dist_clm.data.order import Source\n"
        "from dist_clm.data.format import read_manifest\nfrom dist_clm.training.preemption import ignore_stop_signals\n"
        f"d = {str(data_dir)!r}\n"
        "ld = TrainLoader([Source('a', d, read_manifest(d))], block_size=64, micro_batch=2, num_workers=2,\n"
        "                 worker_init=ignore_stop_signals)\n"
        "held = [iter(ld)]\nnext(held[0])\n"
    )
    if held == "in_a_cycle":
        code += "held.append(held)\ndel held, ld\ngc.collect()\n"
    r = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
