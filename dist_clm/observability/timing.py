"""Where a step's time goes, and the PyTorch profiler over chosen steps.

`Phases` is the timeline of one rank: the step loop marks where each named range begins (data wait, forward,
backward, optimizer step, checkpoint, validation, downstream tasks) and the ranges add up into the time split
the log window reports (time/data_wait, time/forward_backward, time/optimizer, time/checkpoint_stall, time/eval:
shares of the window's wall time, for rank 0 and for the window's slowest rank). While the profiler records, the
same ranges are its named ranges (record_function), so a trace and the time split speak of the same things.

On a GPU the compute ranges (forward, backward, optimizer step) are timed by CUDA events recorded on the stream:
the host runs ahead of the device, and a host clock would put a step's kernels into whatever the host waits on
next. The events are read when the log window reduces its sums, which waits for the device anyway: no other host
synchronization. Host ranges (data, checkpoint, evaluation) are timed by the host clock.

`StepProfiler` runs torch.profiler over train.profile_steps on train.profile_ranks and writes one trace per rank
into RUN/profile/, named as TensorBoard's profile plugin looks for them (Perfetto opens them too).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

PHASES = ("data_wait", "forward_backward", "optimizer", "checkpoint_stall", "eval")
NOT_COMPUTE = ("data_wait", "checkpoint_stall", "eval")  # what the console points out above SHOWN_SHARE
SHOWN_SHARE = 0.10
# each named range -> the phase of the time split it counts in
RANGES = {
    "data_wait": "data_wait",
    "forward": "forward_backward",
    "backward": "forward_backward",
    "optimizer_step": "optimizer",
    "checkpoint": "checkpoint_stall",
    "validation": "eval",
    "downstream_tasks": "eval",
}
DEVICE_TIMED = {"forward_backward", "optimizer"}
RANGE_PREFIX = "dist_clm/"  # the named ranges' prefix in a trace


class Phases:
    """One rank's seconds per phase since the last `take()`. `mark(name)` ends the open range and begins `name`
    (one of RANGES; None: none); ranges never nest."""

    def __init__(self, device: str = "cpu"):
        self.cuda = device.startswith("cuda")
        self.profiling = False  # (StepProfiler: the ranges are also the profiler's named ranges)
        self._open: tuple | None = None  # (name, host start, device start event or None, record_function or None)
        self._host = dict.fromkeys(PHASES, 0.0)
        self._events: list[tuple] = []  # (phase, start event, end event) of the device-timed ranges

    def mark(self, name: str | None) -> None:
        now, event = time.perf_counter(), None
        opened = self._open
        if self.cuda and (RANGES.get(name) in DEVICE_TIMED or (opened and RANGES[opened[0]] in DEVICE_TIMED)):
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
        if opened is not None:
            was, started, start_event, recording = opened
            phase = RANGES[was]
            if start_event is not None and phase in DEVICE_TIMED:
                self._events.append((phase, start_event, event))
            else:
                self._host[phase] += now - started
            if recording is not None:
                recording.__exit__(None, None, None)
        self._open = None
        if name is not None:
            recording = None
            if self.profiling:
                import torch

                recording = torch.profiler.record_function(RANGE_PREFIX + name)
                recording.__enter__()
            self._open = (name, now, event, recording)

    @contextmanager
    def range(self, name: str):
        """The named range `name` around a block (validation, downstream tasks, a checkpoint's save)."""
        self.mark(name)
        try:
            yield
        finally:
            self.mark(None)

    def take(self) -> list[float]:
        """Seconds per PHASES since the last take(), then zeros. A device-timed range's events are read here: call
        it where the log window reduces its sums (the device has to get there anyway)."""
        seconds = dict(self._host)
        for phase, start, end in self._events:
            end.synchronize()
            seconds[phase] += start.elapsed_time(end) / 1000
        self._host, self._events = dict.fromkeys(PHASES, 0.0), []
        return [seconds[p] for p in PHASES]


def split_scalars(per_rank: list[list[float]], elapsed: float, slowest: int | None) -> dict[str, float]:
    """The time split's scalars from every rank's seconds per PHASES over a window of `elapsed` seconds: rank 0's
    shares as time/PHASE, the remainder as time/other (logging, the loader's bookkeeping, launch overheads), and
    the `slowest` rank's as time/slowest/PHASE."""
    out = {}
    for prefix, rank in (("time", 0), ("time/slowest", slowest)):
        if rank is None:
            continue
        shares = [s / elapsed if elapsed > 0 else 0.0 for s in per_rank[rank]]
        out |= {f"{prefix}/{p}": share for p, share in zip(PHASES, shares, strict=True)}
        out[f"{prefix}/other"] = max(0.0, 1.0 - sum(shares))
    return out


def stall_note(scalars: dict) -> dict[str, str]:
    """For the console's line: rank 0's biggest share of time not spent computing, when above SHOWN_SHARE
    ({"checkpoint stall": "34%"}), else nothing."""
    shares = {p: scalars.get(f"time/{p}", 0.0) for p in NOT_COMPUTE}
    phase = max(shares, key=shares.get)
    return {phase.replace("_", " "): f"{shares[phase]:.0%}"} if shares[phase] > SHOWN_SHARE else {}


class StepProfiler:
    """The PyTorch profiler over steps [first, last] (train.profile_steps) on the ranks `ranks`
    (train.profile_ranks), with the step loop's named ranges; the trace goes to RUN/profile/ when the last step
    is done, or when the run stops first (a signal, the end of a shorter run)."""

    def __init__(self, steps: list[int], ranks: list[int], rank: int, run_dir: Path, phases: Phases):
        self.first, self.last = (steps[0], steps[-1]) if steps else (0, -1)
        self.on = bool(steps) and rank in ranks
        self.rank, self.out, self.phases = rank, Path(run_dir) / "profile", phases
        self.profile, self.step_range = None, None

    def before(self, step: int) -> None:
        """Before step `step`: the profiler starts at the first profiled step (or the first this process takes)."""
        if self.on and self.profile is None and self.first <= step <= self.last:
            import torch

            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            else:  # (else the profiler's library logs an error line for the GPU the machine does not have)
                os.environ.setdefault("KINETO_LOG_LEVEL", "5")
            self.started = step
            self.profile = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
            self.profile.start()
            self.phases.profiling = True
        if self.profile is not None:
            import torch

            self._end_step()  # (a step that rolled back never reached after())
            self.step_range = torch.profiler.record_function(f"{RANGE_PREFIX}step_{step}")
            self.step_range.__enter__()

    def after(self, step: int) -> None:
        """After step `step` (its logging, validation and checkpoint included)."""
        if self.profile is None:
            return
        self._end_step()
        if step >= self.last:
            self.close(step)

    def close(self, step: int) -> Path | None:
        """Stop and write the trace (RUN/profile/rank{R}.steps_{A}-{B}.pt.trace.json); its path, or None."""
        if self.profile is None:
            return None
        from dist_clm import console

        self.phases.mark(None)  # (no named range left open across the profiler's stop)
        self._end_step()
        self.phases.profiling = False
        self.profile.stop()
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"rank{self.rank}.steps_{self.started}-{step}.pt.trace.json"
        self.profile.export_chrome_trace(str(path))
        self.profile = None
        console.info(f"the profile of steps {self.started}-{step} is in {path}", every_rank=True)
        return path

    def _end_step(self) -> None:
        if self.step_range is not None:
            self.step_range.__exit__(None, None, None)
            self.step_range = None
