"""Each rank's sign of life in the process group's store, so that the survivors of a failed collective can name
the rank that stopped, and so that ranks can wait for work that one rank does alone (downstream tasks on rank 0)
for as long as it takes, with no collective timeout, yet not for a rank that is gone (`set_done`, `wait_done`)."""

from __future__ import annotations

from datetime import timedelta

from dist_clm.parallel.process_group import DistEnv


class Heartbeat:
    """Each rank's sign of life, in the process group's store (served by rank 0's process): a daemon thread
    adds 1 to this rank's counter every second, whatever the main thread is doing (computing, or blocked in a
    collective). When a collective fails, the survivors look at which counters stopped moving: those ranks'
    processes are dead or stopped. The store is torch's own (no public accessor: `_get_default_store`).
    `stop()` before the process exits: a daemon thread still inside the store's C++ client when the interpreter
    finalizes aborts the process ("terminate called without an active exception")."""

    PERIOD_S = 1.0

    def __init__(self, env: DistEnv):
        import threading

        import torch.distributed as dist

        self.env, self.store, self._thread = env, None, None
        self._stopped = threading.Event()
        if not (dist.is_initialized() and env.world_size > 1):
            return
        try:
            self.store = dist.distributed_c10d._get_default_store()
            self.store.set(f"dist_clm/node/{env.rank}", env.node)
        except Exception:  # noqa: BLE001 (no store, no names: failures are still reported, without them)
            self.store = None
            return
        self._thread = threading.Thread(target=self._beat, name="dist-clm-heartbeat", daemon=True)
        self._thread.start()

    @staticmethod
    def key(rank: int) -> str:
        return f"dist_clm/alive/{rank}"

    def _beat(self) -> None:
        key = self.key(self.env.rank)
        while not self._stopped.is_set():
            try:
                self.store.add(key, 1)
            except Exception:  # noqa: BLE001 (rank 0's process, which serves the store, is gone: nothing to do)
                return
            self._stopped.wait(self.PERIOD_S)

    def stop(self) -> None:
        """End the thread and wait for it (at most one store call: milliseconds, or an error once the store's
        server is gone)."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def laggards(self) -> str:
        """Who stopped, e.g. 'rank 3 (node dn2) stopped answering', or '' when it cannot be told."""
        import time

        if self.store is None:
            return ""
        try:
            self.store.set_timeout(timedelta(seconds=5))
            keys = [self.key(r) for r in range(self.env.world_size)]
            before = [self.store.add(k, 0) for k in keys]
            time.sleep(3 * self.PERIOD_S)
            after = [self.store.add(k, 0) for k in keys]
            silent = [r for r in range(self.env.world_size) if after[r] == before[r]]
            nodes = {r: self.store.get(f"dist_clm/node/{r}").decode() for r in silent}
        except Exception:  # noqa: BLE001 (the store lives in rank 0's process: it may be the one that stopped)
            return "rank 0 (which serves the process group's store) stopped answering"
        if not silent or len(silent) == self.env.world_size:
            return ""
        named = ", ".join(f"rank {r} (node {nodes[r]})" for r in silent[:4]) + (" and more" if len(silent) > 4 else "")
        return f"{named} stopped answering (dead or stopped process)"


def _store():
    """The process group's store, or None (no process group, a world of one, or no store to be had)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001
        return None


def set_done(key: str) -> None:
    """Tell the ranks in `wait_done(key, ...)` that this rank's work alone is done."""
    import torch.distributed as dist

    store = _store()
    if store is not None:
        store.set(key, "1")
    elif dist.is_initialized():
        dist.barrier()  # (theirs waits long: wait_done)


def wait_done(key: str, rank: int, silent_s: float, poll_s: float = 0.2) -> None:
    """Wait until `rank` calls `set_done(key)`, however long its work takes: in no collective, so no timeout ends
    the wait. A `rank` whose heartbeat (`Heartbeat`) stands still for `silent_s` is gone: the RuntimeError of a
    collective that timed out (train() reports it as a lost peer); a store that went away with it raises its own.
    Without a store (none seen so far): a barrier that waits up to collectives.SETUP_TIMEOUT_S, then `silent_s`
    again as the timeout of collectives."""
    import time

    import torch.distributed as dist

    store = _store()
    if store is None:
        from dist_clm.parallel.collectives import long_collectives

        if dist.is_initialized():
            with long_collectives(silent_s):
                dist.barrier()
        return
    beats, last = None, time.monotonic()
    while not store.check([key]):
        now, count = time.monotonic(), store.add(Heartbeat.key(rank), 0)
        if count != beats:
            beats, last = count, now
        elif now - last > silent_s:
            raise RuntimeError(f"Timed out waiting for rank {rank}: its heartbeat stood still for {silent_s:g} s")
        time.sleep(poll_s)
