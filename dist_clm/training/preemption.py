"""Stopping cleanly on a signal: SIGTERM, SIGUSR1 or SIGUSR2 on any rank -> every rank stops at the same step
boundary, a checkpoint is saved, and the process exits with PREEMPTED_EXIT.

The signal handler only records the signal: no I/O and never a collective inside a handler (a rank could be
in the middle of one). Once per step the ranks agree (agreement.agree: one small all-reduce that also carries
the loss checks), so a signal delivered to any one rank stops them all at the same step.

Signals often reach the whole process group (SLURM's --signal, a terminal, `kill -TERM -- -PGID`), so:
- the handlers are installed before anything forks, and DataLoader workers ignore the stop signals
  (`ignore_stop_signals`, their worker_init_fn): the main process saves and then shuts its workers down;
- under the `deepspeed` launcher, a SIGTERM to the `deepspeed` command ends that command at once (its runner
  keeps the default handler) and leaves its per-node launcher and the ranks running; each rank therefore
  watches that command (`watch_launcher`) and stops, with a checkpoint, when it is gone. torchrun forwards
  a SIGTERM to its workers itself.
"""

from __future__ import annotations

import os
import signal
import threading

PREEMPTED_EXIT = 75  # EX_TEMPFAIL ("try again later"): the run saved a checkpoint; rerunning continues it
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)  # USR2: SLURM's --signal (dist_clm/launch/slurm.py)


class StopRequest:
    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS):
        self.signals = [int(s) for s in signals]
        self.received: set[int] = set()
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():  # signal.signal works there only
            for s in signals:
                self._previous[s] = signal.signal(s, self._handler)

    def _handler(self, signum, frame) -> None:
        self.received.add(signum)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader worker's init: the stop signals are the main process's business (torch's worker would
    die on a SIGTERM that did not come from its parent, and take the run down with it)."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def watch_launcher(stop: StopRequest, interval_s: float = 1.0) -> None:
    """Under the deepspeed launcher, treat the end of the `deepspeed` command as a SIGTERM (see the module
    docstring). Elsewhere nothing is watched: a plain process or torchrun gets its signals directly."""
    import psutil

    from dist_clm import console

    try:
        parent = psutil.Process(os.getppid())
        if not any("deepspeed.launcher.launch" in part for part in parent.cmdline()):
            return
        runner = parent.ppid()
    except psutil.Error:
        return
    if runner <= 1:
        return

    def watch() -> None:
        while True:
            try:
                if parent.ppid() != runner:  # the deepspeed command ended; its launcher was re-parented
                    break
            except psutil.NoSuchProcess:  # the launcher itself is gone
                break
            threading.Event().wait(interval_s)
        console.warning(f"the deepspeed command (pid {runner}) ended; stopping at the next step with a checkpoint")
        stop.received.add(int(signal.SIGTERM))

    threading.Thread(target=watch, name="dist-clm-launcher-watch", daemon=True).start()
