"""The time split (observability/timing.py): a rank's named ranges into phases, the shares a log window reports,
the console's note, and the profiler's trace with the same ranges."""

import json
import time

import pytest
import torch

from dist_clm.observability.metrics import LogWindow
from dist_clm.observability.timing import PHASES, Phases, StepProfiler, split_scalars, stall_note


def spend(phases: Phases, name: str | None, seconds: float) -> None:
    phases.mark(name)
    time.sleep(seconds)


def test_named_ranges_add_up_into_their_phases_and_take_starts_again():
    p = Phases("cpu")
    for name, s in (("data_wait", 0.03), ("forward", 0.02), ("backward", 0.02), ("optimizer_step", 0.01),
                    (None, 0.05), ("validation", 0.02), ("downstream_tasks", 0.01), ("checkpoint", 0.02)):  # fmt: skip
        spend(p, name, s)
    p.mark(None)
    got = dict(zip(PHASES, p.take(), strict=True))
    want = {"data_wait": 0.03, "forward_backward": 0.04, "optimizer": 0.01, "checkpoint_stall": 0.02, "eval": 0.03}
    for phase, seconds in want.items():  # (None's 0.05 s is in no phase)
        assert seconds <= got[phase] < seconds + 0.015, (phase, got)
    assert p.take() == [0.0] * len(PHASES)
    with p.range("checkpoint"):
        time.sleep(0.01)
    assert p.take()[PHASES.index("checkpoint_stall")] >= 0.01


class StandInEvent:
    """torch.cuda.Event's part that Phases uses, on the host clock: records and elapsed milliseconds."""

    recorded: list = []

    def __init__(self, enable_timing: bool):
        assert enable_timing

    def record(self):
        self.at = time.perf_counter()
        StandInEvent.recorded.append(self)

    def synchronize(self):
        self.synchronized = True

    def elapsed_time(self, end) -> float:
        return (end.at - self.at) * 1000


def test_on_a_gpu_the_compute_ranges_are_timed_by_events_on_the_stream(monkeypatch):
    """Forward, backward and the optimizer step between CUDA events (the host runs ahead of the device), read
    at take(); the data wait, checkpoints and evaluation on the host clock, without an event."""
    monkeypatch.setattr(torch.cuda, "Event", StandInEvent)
    StandInEvent.recorded = []
    p = Phases("cuda:0")
    spend(p, "data_wait", 0.02)  # host: an event only where a device range begins
    spend(p, "forward", 0.02)
    spend(p, "optimizer_step", 0.01)
    spend(p, "checkpoint", 0.01)  # ends the optimizer's range: an event
    p.mark(None)
    assert len(StandInEvent.recorded) == 3
    got = dict(zip(PHASES, p.take(), strict=True))
    assert all(getattr(e, "synchronized", False) for e in StandInEvent.recorded[1:])  # read once, at take()
    assert 0.02 <= got["forward_backward"] < 0.035 and 0.01 <= got["optimizer"] < 0.025
    assert 0.02 <= got["data_wait"] < 0.035 and 0.01 <= got["checkpoint_stall"] < 0.025


def test_the_shares_of_rank_0_and_of_the_slowest_rank_and_the_rest():
    per_rank = [[1.0, 4.0, 1.0, 2.0, 0.0], [3.0, 4.0, 1.0, 2.0, 0.0]]
    out = split_scalars(per_rank, 10.0, slowest=1)
    assert out["time/data_wait"] == 0.1 and out["time/forward_backward"] == 0.4
    assert out["time/other"] == pytest.approx(0.2) and out["time/slowest/data_wait"] == 0.3
    assert out["time/slowest/other"] == pytest.approx(0.0)
    assert not any(k.startswith("time/slowest") for k in split_scalars(per_rank, 10.0, slowest=None))


def test_the_console_names_the_biggest_share_not_spent_computing_above_a_tenth():
    assert stall_note({"time/data_wait": 0.05, "time/checkpoint_stall": 0.34, "time/eval": 0.2}) == {
        "checkpoint stall": "34%"
    }
    assert stall_note({"time/data_wait": 0.09, "time/forward_backward": 0.9}) == {}


def test_a_log_window_reports_the_split_of_its_wall_time():
    p = Phases("cpu")
    w = LogWindow(["a"], tokens_per_step=10, flops_per_token=1.0, world=1, device="cpu", phases=p)
    spend(p, "data_wait", 0.05)
    spend(p, "forward", 0.1)
    p.mark(None)
    w.add(1.0, True, 0.05, [1], [0.1])
    w.start = time.perf_counter() - 0.5  # the window lasted 0.5 s
    out = w.emit(lr=0.1, grad_norm=0.0, tokens_seen=10, skipped_steps=0)
    assert out["time/data_wait"] == pytest.approx(0.1, abs=0.03)
    assert out["time/forward_backward"] == pytest.approx(0.2, abs=0.03)
    assert out["time/other"] == pytest.approx(0.7, abs=0.05) and "time/slowest/other" not in out  # (one rank)


def test_the_profiler_records_the_chosen_steps_with_the_named_ranges(tmp_path):
    p = Phases("cpu")
    off = StepProfiler([2, 3], [1], rank=0, run_dir=tmp_path / "other", phases=p)  # another rank profiles
    prof = StepProfiler([2, 3], [0], rank=0, run_dir=tmp_path, phases=p)
    x = torch.randn(64, 64)
    for step in range(1, 6):
        for profiler in (off, prof):
            profiler.before(step)
        assert p.profiling == (step in (2, 3))
        for name in ("data_wait", "forward", "backward", "optimizer_step"):
            p.mark(name)
            x = torch.tanh(x @ x)
        with p.range("checkpoint"):
            x = x + 1
        for profiler in (off, prof):
            profiler.after(step)
    assert prof.close(5) is None and not (tmp_path / "other").exists()
    (trace,) = (tmp_path / "profile").glob("*.pt.trace.json")
    assert trace.name == "rank0.steps_2-3.pt.trace.json"
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    for name in ("data_wait", "forward", "backward", "optimizer_step", "checkpoint"):
        assert f"dist_clm/{name}" in names
    assert {"dist_clm/step_2", "dist_clm/step_3"} <= names and "dist_clm/step_4" not in names
    assert "aten::mm" in names


def test_a_profile_that_the_run_ends_early_is_written_at_the_end(tmp_path):
    p = Phases("cpu")
    prof = StepProfiler([2, 9], [0], rank=0, run_dir=tmp_path, phases=p)
    for step in (1, 2, 3):
        prof.before(step)
        p.mark("forward")
        prof.after(step)
    path = prof.close(3)
    assert path.name == "rank0.steps_2-3.pt.trace.json" and path.is_file() and not p.profiling
