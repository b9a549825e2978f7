"""A run killed (SIGKILL) while it is writing a checkpoint resumes from the previous complete one: whether the
step loop waits for the write (checkpoint.async_save=false) or goes on while a background thread writes it."""

import json
import os
import signal
import subprocess
import time

import pytest

from dist_clm.checkpointing.checkpointer import COMPLETE, PREFIX, complete_checkpoints
from tests.helpers import BIN, TINY, metrics, train_losses

pytestmark = pytest.mark.slow


def _last_logged_step(run) -> int:
    try:
        return max((row["step"] for row in metrics(run)), default=0)
    except (FileNotFoundError, json.JSONDecodeError):  # (a line being written)
        return 0


def _catch_a_save(run, cmd: list[str], async_save: bool) -> tuple[object, int]:
    """Run `cmd` and kill its process group (-9) while a checkpoint after a complete one is being written: (that
    checkpoint, the last step logged then), or (None, 0) where none was caught or the kill came too late (its
    marker landed between the look and the kill: a complete save, not the case under test)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    caught, trained_past = None, 0
    deadline = time.time() + 400
    while proc.poll() is None and time.time() < deadline:
        complete = complete_checkpoints(run)  # (first: a save may complete while the directory is listed)
        partial = [d for d in (run / "checkpoints").glob("step_*")
                   if complete and d.name > complete[-1].name and any(d.iterdir())]  # fmt: skip
        if partial:
            step = int(partial[0].name[len(PREFIX) :])
            trained_past = _last_logged_step(run)
            # in the background: only once the step loop has gone past the checkpoint's step
            if not async_save or trained_past > step:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, writer thread and all
                caught = partial[0]
                break
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    if caught is None or (caught / COMPLETE).exists():
        return None, 0
    return caught, trained_past


def _kill_during_a_save(tmp_path, data_dir, async_save: bool):
    for attempt in range(3):
        run = tmp_path / f"run{attempt}"
        # a wider model, so that each save takes long enough to be caught in the act
        cmd = [str(BIN / "dist-clm"), "train", *TINY, f"data.path={data_dir}", f"run.dir={run}",
               "model.overrides.n_embd=256", "model.overrides.n_layer=4",
               f"checkpoint.async_save={str(async_save).lower()}", "train.max_steps=60",
               f"checkpoint.save_every={2 if async_save else 1}", "checkpoint.keep_last=3", "train.log_every=1",
               "train.eval_every=0"]  # fmt: skip
        caught, trained_past = _catch_a_save(run, cmd, async_save)
        if caught is not None:
            break
    assert caught is not None, "no save was caught in progress in 3 runs"
    assert not (caught / COMPLETE).exists()  # the half-written checkpoint is not marked complete
    last_good = complete_checkpoints(run)[-1]
    assert last_good.name < caught.name
    good_step = json.loads((last_good / COMPLETE).read_text())["step"]

    skip = len(metrics(run))
    again = [*cmd[:-5], f"train.max_steps={good_step + 2}", *cmd[-4:]]  # the same run, to 2 steps past it
    r = subprocess.run(again, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {last_good}" in r.stdout + r.stderr
    assert list(train_losses(metrics(run, skip))) == [good_step + 1, good_step + 2]
    assert not caught.exists() or (caught / COMPLETE).exists()  # the fragment was cleared (or rewritten whole)
    return run, caught, trained_past


def test_sigkill_in_the_middle_of_a_save(tmp_path, data_dir):
    _kill_during_a_save(tmp_path, data_dir, async_save=False)


def test_sigkill_while_a_checkpoint_is_written_in_the_background(tmp_path, data_dir):
    run, caught, trained_past = _kill_during_a_save(tmp_path, data_dir, async_save=True)
    assert trained_past > int(caught.name[len(PREFIX) :])  # training had gone on past the checkpoint being written
    saves = [row for row in metrics(run) if "checkpoint/step" in row]  # each completed save is logged ...
    assert saves and all(row["checkpoint/blocked_s"] <= row["checkpoint/save_s"] for row in saves)
    assert any(row["step"] > row["checkpoint/step"] for row in saves)  # ... at a step after its own
