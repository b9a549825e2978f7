"""Preemption: a signal to one rank stops every rank at the same step, after a checkpoint, with exit code 75;
rerunning continues the run exactly — with dropout on, so the random streams must continue too: the losses of
2N steps in one go and of N + stop + N steps are bitwise identical at every step, and so are the final weights."""

import os
import signal
import subprocess
import time

import psutil
import pytest

from dist_clm.checkpointing.checkpointer import complete_checkpoints
from dist_clm.parallel.process_group import free_port
from dist_clm.training.preemption import PREEMPTED_EXIT
from tests.helpers import BIN, TINY, metrics, same, train_losses, weights

pytestmark = pytest.mark.slow


def command(run, data_dir, stage: int) -> list[str]:
    return [
        str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "dist_clm",
        "train", *TINY, f"data.path={data_dir}", f"run.dir={run}", f"distributed.zero_stage={stage}",
        "train.max_steps=14", "checkpoint.save_every=0", "train.log_every=1", "train.eval_every=0",
        "model.overrides.resid_pdrop=0.1", "model.overrides.attn_pdrop=0.1", "model.overrides.embd_pdrop=0.1",
    ]  # fmt: skip


@pytest.mark.parametrize("stage", [2, 3])
def test_signal_on_one_rank_checkpoints_all_and_the_rerun_is_bitwise_identical(tmp_path, data_dir, stage):
    reference = tmp_path / "reference"
    r = subprocess.run(command(reference, data_dir, stage), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = train_losses(metrics(reference))

    run = tmp_path / "run"
    proc = subprocess.Popen(command(run, data_dir, stage), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=os.environ.copy())  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and len(train_losses(metrics(run))) >= 3):
        time.sleep(0.2)
    rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=1" in p.cmdline()]
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGUSR1)  # one rank only, like a node's scheduler warning
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT, err[-3000:]
    assert "stopped by SIGUSR1" in err and "rerun the same command to continue" in err
    stopped = complete_checkpoints(run)
    assert len(stopped) == 1  # save_every=0: the only checkpoint is the one the signal asked for
    at = int(stopped[0].name.split("_")[1])
    assert 3 <= at < 14 and list(train_losses(metrics(run))) == list(range(1, at + 1))

    skip = len(metrics(run))
    r = subprocess.run(command(run, data_dir, stage), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = train_losses(metrics(run, skip))
    assert list(resumed) == list(range(at + 1, 15))
    for step, loss in resumed.items():
        assert loss == expected[step], (step, loss, expected[step])  # bitwise, dropout included
    assert same(weights(run, 14), weights(reference, 14))  # and the final weights, bit for bit
