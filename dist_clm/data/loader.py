"""This rank's training batches: the blocks of its share of each step (order.py), made into micro batches
(batches.py) by DataLoader workers, in order, from the data position on.

The model of the data, in four lines:
- A split's chunks, in stored order, concatenate into its token stream (stream.py); cut into `block_size`
  pieces it gives `per_epoch = tokens // block_size` blocks (the tail, shorter than a block, is left out of that
  epoch).
- Block k of a source is block perm_e(k mod per_epoch) of its epoch e = k // per_epoch, where perm_e is a
  seeded permutation drawn anew each epoch (the identity without shuffling; order.PackedBlocks).
- Global block g belongs to source mix(g) as that source's block number k(g): a fixed interleaving that
  realizes the weights exactly over every period of `Mixture.PERIOD` blocks (one source: k = g), stage by
  stage when the mixture changes over the run (mixture.py).
- Optimizer step s uses global blocks [s*G, (s+1)*G), G = world * micro_batch * grad_accum; rank r takes the
  r-th contiguous share of them (order.rank_blocks).

So the loader's whole position is one integer, the global blocks consumed at a step boundary (order.DataPosition,
saved in every checkpoint); on resume the block indices restart from it, which gives back exactly the blocks
an uninterrupted run would have seen (any number of loader workers), and, on another number of ranks with the
same global batch, exactly the same blocks per step split differently between ranks.

What is read is checked against what prepare wrote, and damage is a DataError (one sentence, naming the file):
index.json's names and every shard file's size and hash (shards.py), every block's token ids (batches.py).
"""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401 -- its exit handler registered before ours, so ours runs first
import os
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dist_clm.data.batches import MixedBlocks
from dist_clm.data.mixture import describe, shares
from dist_clm.data.order import Source, rank_blocks
from dist_clm.data.prefetch import Prefetcher
from dist_clm.data.remote import check_room_for_readers, is_remote
from dist_clm.errors import UserError

if TYPE_CHECKING:
    from dist_clm.config import DataConfig, TrainConfig
    from dist_clm.data.order import DataPosition


class _Failed:
    """A micro batch that could not be made: the error, carried as data (see _ErrorsAsData)."""

    def __init__(self, error: UserError):
        self.error = error


class _ErrorsAsData(Dataset):
    """MixedBlocks for the DataLoader, with a UserError returned as a `_Failed` batch instead of raised: torch
    re-raises a worker's exception in the main process with a traceback for its message, while this way
    TrainLoader raises the error itself, its one sentence intact (the same with 0 workers)."""

    def __init__(self, blocks: MixedBlocks):
        self.blocks = blocks

    def __getitem__(self, g: int):
        return self.__getitems__([g])

    def __getitems__(self, gs: list[int]):
        try:
            return self.blocks.__getitems__(gs)
        except UserError as e:
            return _Failed(e)


def _as_is(batch):
    """The DataLoader's collate_fn: MixedBlocks.__getitems__ already returns the batch."""
    return batch


class RankShareSampler(Sampler[int]):
    """Global block indices of this rank, from `start`: its contiguous share of each step's blocks."""

    def __init__(self, rank: int, world: int, blocks_per_rank_step: int, start: int = 0):
        self.rank, self.world, self.per_rank, self.start = rank, world, blocks_per_rank_step, start

    def __iter__(self) -> Iterator[int]:
        step = 0
        while True:
            yield from rank_blocks(self.start, step, self.rank, self.world, self.per_rank)
            step += 1


# Worker processes of the loaders made here. In training they ignore SIGTERM (training/preemption.py), so
# multiprocessing's own exit handler, which terminates and joins them, would wait forever for one still running:
# any left at exit are killed first (atexit runs the later registration first, and multiprocessing.util is
# imported above). Tracked as
# processes, not iterators: an iterator caught in a reference cycle (a traceback) can lose its queues to the
# garbage collector before its own cleanup runs, and then its workers never hear that they should stop.
_WORKERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _kill_leftover_workers() -> None:
    for worker in list(_WORKERS):
        if worker.is_alive():
            worker.kill()
            worker.join()


def ordered_blocks(sources: list[Source], position: DataPosition, shuffle: bool, seed: int,
                   document_mask: bool) -> MixedBlocks:  # fmt: skip
    """Global block -> its tokens, in the order `position`'s settings (block size, shuffle window, stages) make."""
    window = max(1, position.shuffle_window // position.block_size) if position.shuffle_window else 0
    return MixedBlocks(sources, position.block_size, shuffle, seed, document_mask, window, position.stages)


class TrainLoader:
    """This rank's micro batches, from its DataPosition on; `close()` stops its workers."""

    def __init__(
        self,
        sources: list[Source],
        position: DataPosition | None = None,
        *,
        block_size: int = 0,
        shuffle_window: int = 0,
        stages: list | None = None,
        micro_batch: int,
        grad_accum: int = 1,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        document_mask: bool = False,
        prefetch_steps: int = 0,
        pin_memory: bool = False,
        worker_init=None,
    ):
        """`position`: the data's order settings and where to start (order.DataPosition, which this loader moves
        on at each step_done); None: at the start of the order `block_size`, `shuffle_window` (tokens per window
        of the two-level shuffle; 0: a global shuffle) and `stages` (data.stages) make. `prefetch_steps`: how many
        steps ahead the shards of remote sources are fetched into the node's cache; `pin_memory`: batches in
        page-locked memory (for a GPU); `worker_init`: what each DataLoader worker runs first (training gives
        the one that leaves the stop signals to the main process, training/preemption.py)."""
        if position is None:
            from dist_clm.data.order import DataPosition

            position = DataPosition(sources, block_size=block_size, global_batch=world * micro_batch * grad_accum,
                                    shuffle_window=shuffle_window, stages=stages)  # fmt: skip
        if world * micro_batch * grad_accum != position.global_batch:
            raise ValueError(f"{world} x {micro_batch} x {grad_accum} blocks per step, not {position.global_batch}")
        self.position, self.names, self.stages = position, position.names, position.stages
        self.global_blocks_per_step = position.global_batch
        self.block_size = position.block_size
        self.start = position.blocks_consumed
        self.blocks = ordered_blocks(sources, position, shuffle, seed, document_mask)
        self._check_cache_room(num_workers)
        self.prefetcher = None
        if prefetch_steps and any(is_remote(s.path) for s in sources if s.weight > 0):
            self.prefetcher = Prefetcher(
                ordered_blocks(sources, position, shuffle, seed, document_mask),
                rank=rank, world=world, per_rank=micro_batch * grad_accum, start=self.start, steps=prefetch_steps,
            )  # fmt: skip
        self.loader = DataLoader(
            _ErrorsAsData(self.blocks),
            batch_size=micro_batch,
            sampler=RankShareSampler(rank, world, micro_batch * grad_accum, self.start),
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            collate_fn=_as_is,
            worker_init_fn=worker_init,
            # its own generator for the workers' base seed: making an iterator leaves torch's global one alone,
            # so a resumed run's random streams continue whenever the loader is made
            generator=torch.Generator().manual_seed(seed),
        )
        self.steps_done = 0  # optimizer steps taken since `start`
        self.pin_memory = pin_memory

    def _check_cache_room(self, num_workers: int) -> None:
        """Remote sources through a limited cache: it holds the shard each reading process of the node keeps open
        (the workers of every rank of the node, and each rank's main process, which validates)."""
        sizes = [
            r.raw_data.bytes for s in self.blocks.blocks if s.stream.chunks.mirror for r in s.stream.chunks.readers
        ]
        if sizes:
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            check_room_for_readers(per_node * (num_workers + 1), max(sizes))

    @classmethod
    def from_config(
        cls,
        d: DataConfig,
        t: TrainConfig,
        sources: list[Source],
        position: DataPosition | None = None,
        *,
        rank: int,
        world: int,
        grad_accum: int,
        pin_memory: bool = False,
        worker_init=None,
    ) -> TrainLoader:
        """The loader the data section and the loop's batch and seed (train.*) mean, for this rank, from
        `position` (None: the start)."""
        return cls(
            sources, position, block_size=d.block_size, shuffle_window=d.shuffle_window, stages=d.stages,
            micro_batch=t.micro_batch_size, grad_accum=grad_accum, rank=rank, world=world,
            shuffle=d.shuffle, seed=t.seed, num_workers=d.num_workers, prefetch_steps=d.prefetch_steps,
            document_mask=d.document_mask, pin_memory=pin_memory, worker_init=worker_init,
        )  # fmt: skip

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro batches as tensors; damaged data raises a DataError (one sentence) from next()."""
        batches = iter(self.loader)  # made now, not at the first next(): the workers start here
        _WORKERS.update(getattr(batches, "_workers", ()))
        return self._checked(batches)

    def _checked(self, batches) -> Iterator[dict[str, torch.Tensor]]:
        for batch in batches:
            if isinstance(batch, _Failed):
                self.close()  # damaged data ends the run: the workers stop now, not when the traceback is collected
                raise batch.error
            tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
            # page-locked for a GPU, so that the step's copies do not wait (here, not in the DataLoader's pin
            # thread: it pins tensors only, and arrays travel from workers faster than tensors, see above)
            yield {k: v.pin_memory() for k, v in tensors.items()} if self.pin_memory else tensors

    def close(self) -> None:
        """Stop the loader's worker processes now (in training they ignore SIGTERM, see training/preemption.py,
        so they must be told)."""
        it = getattr(self.loader, "_iterator", None)  # persistent workers live in the DataLoader's iterator
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()  # torch's own orderly shutdown (no public method for persistent workers)
        self.loader._iterator = None
        if self.prefetcher is not None:
            self.prefetcher.close()

    def step_done(self) -> None:
        """One optimizer step's micro batches consumed: the position moves on (and the prefetcher with it)."""
        self.steps_done += 1
        self.position.step_done()
        if self.prefetcher is not None:
            self.prefetcher.step_done()

    def stage(self, blocks_consumed: int) -> int:
        """The stage (0-based) that the step starting at `blocks_consumed` trains in."""
        return self.blocks.mixture.stage_of(blocks_consumed)

    def describe_stage(self, j: int) -> str:
        return describe(self.blocks.mixture, j, self.names, self.global_blocks_per_step)

    def stage_shares(self, j: int) -> list[tuple[str, float]]:
        """Stage j's exact share of the blocks, per training source."""
        return list(zip(self.names, shares(self.blocks.mixture, j), strict=True))
