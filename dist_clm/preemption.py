"""Stopping cleanly on a signal: SIGTERM, SIGUSR1 or SIGUSR2 on any rank -> every rank stops at the same step boundary,
a checkpoint is saved, and the process exits with PREEMPTED_EXIT.

The signal handler only records the signal: no I/O and never a collective inside a handler (a rank could be
in the middle of one). Once per step the ranks agree (stability.agree: one small all-reduce that also carries
the loss checks), so a signal delivered to any one rank stops them all at the same step.
"""

from __future__ import annotations

import signal
import threading

PREEMPTED_EXIT = 75  # EX_TEMPFAIL ("try again later"): the run saved a checkpoint; rerunning continues it
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)  # USR2: SLURM's --signal (dist_clm/slurm.py)


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
