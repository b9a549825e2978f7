"""The prefetcher's thread and its close: closing while the thread is in the middle of submitting a step's
fetches ends the thread quietly."""

from __future__ import annotations

import threading

from dist_clm.data import prefetch


class _Files:
    def ensure_local(self, shard: int) -> bool:
        return False


class _Store:
    files = _Files()


def test_closing_while_the_thread_submits_a_steps_fetches_raises_nothing(monkeypatch):
    """The thread submitted one of a step's fetches and is about to submit the next when close() comes (and its
    wait for the thread runs out, as it can behind a slow download): nothing may be submitted to a pool shut
    down. Before, the thread raised 'cannot schedule new futures after shutdown'."""
    inside, release = threading.Event(), threading.Event()

    def shards(self, step):
        yield _Store(), 0
        inside.set()
        release.wait(10)
        yield _Store(), 1

    monkeypatch.setattr(prefetch.Prefetcher, "shards", shards)
    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    join = threading.Thread.join
    monkeypatch.setattr(threading.Thread, "join", lambda self, timeout=None: join(self, timeout and 0.2))
    p = prefetch.Prefetcher(None, rank=0, world=1, per_rank=1, start=0, steps=2)
    assert inside.wait(10)
    p.close()
    release.set()
    join(p._thread, 10)
    assert not p._thread.is_alive() and errors == []
