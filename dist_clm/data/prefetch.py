"""Exact prefetch of remote shards: the block order is a function of the step alone, so this rank knows which
shards its next steps read; a background thread fetches exactly those into the node's cache, in the order they
will be read, a few steps ahead of the loader (`data.prefetch_steps`).

The thread has its own MixedBlocks (the block order's caches are not shared across threads) and fetches a
step's shards side by side (`PARALLEL` downloads: a new shuffle window needs several shards at once, and over
a distant bucket each one costs a round trip or more). It never raises: a shard it could not fetch is fetched
again, and its error raised, where the loader reads it. It never waits for readers to let go of the cache
either (a shard for which only readers' shards would have to go is left to the loader), so it stops soon.

The thread is the pool's only client: it submits under the lock that `close` shuts the pool down under, after
seeing that it was not stopped, so nothing is submitted to a pool shut down (a pool shut down while the thread
was still submitting a step's fetches raised in it).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait

from dist_clm.data.order import rank_blocks

PARALLEL = 4  # downloads at once


class Prefetcher:
    def __init__(self, blocks, *, rank: int, world: int, per_rank: int, start: int, steps: int):
        """`blocks`: a MixedBlocks of the same sources and order as the loader's; this rank reads, in step s
        (0-based since `start`), the global blocks order.rank_blocks gives (as the loader's sampler does)."""
        self.blocks, self.steps = blocks, steps
        self.share = (start, rank, world, per_rank)
        self._done = 0  # steps the loader has finished
        self._wake = threading.Condition()
        self._stopped = False
        self.fetched = 0  # shards this thread put in the cache (the rest were there already)
        self._count = threading.Lock()  # (the fetch threads add to it side by side)
        self._pool = ThreadPoolExecutor(PARALLEL, thread_name_prefix="dist-clm-fetch")
        self._thread = threading.Thread(target=self._run, name="dist-clm-prefetch", daemon=True)
        self._thread.start()

    def step_done(self) -> None:
        with self._wake:
            self._done += 1
            self._wake.notify()

    def close(self) -> None:
        """Stop: fetches not started are cancelled, those in flight end (each within a download's time), and
        the thread ends."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
            self._pool.shutdown(wait=False, cancel_futures=True)  # (under the lock the thread submits under)
        self._thread.join(timeout=60)

    def shards(self, step: int) -> Iterator[tuple[object, int]]:
        """(ChunkStore, shard number) that step `step` reads on this rank, in reading order."""
        seen = set()
        start, rank, world, per_rank = self.share
        for g in rank_blocks(start, step, rank, world, per_rank):
            i, k = self.blocks.mixture(g)
            stream = self.blocks.blocks[i].stream
            size = self.blocks.mixture.block_size(g)
            pos = self.blocks.offset(i, k, size)
            first, last = stream.locate(pos)[0], stream.locate(pos + size - 1)[0]
            for chunk in range(first, last + 1):
                shard = stream.chunks.shard_of_chunk(chunk)
                if (i, shard) not in seen:
                    seen.add((i, shard))
                    yield stream.chunks, shard

    def _run(self) -> None:
        ahead = 0  # the next step whose shards are not yet in the cache
        while True:
            with self._wake:
                while not self._stopped and ahead >= self._done + self.steps:
                    self._wake.wait()
                if self._stopped:
                    return
                ahead = max(ahead, self._done)
            fetches = []
            for store, shard in self.shards(ahead):
                with self._wake:
                    if self._stopped:
                        return
                    fetches.append(self._pool.submit(self._fetch, store, shard))
            wait(fetches)
            ahead += 1

    def _fetch(self, store, shard: int) -> None:
        if self._stopped:
            return
        try:
            if store.files.ensure_local(shard):
                with self._count:
                    self.fetched += 1
        except Exception:  # noqa: BLE001 (the loader meets the same error where it reads, and says it; or the
            pass  # cache is full of shards open for reading, remote.CacheHeld, and the loader fetches it later)
