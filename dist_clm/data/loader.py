"""Streaming loader: MDS chunks -> one token stream -> fixed-size blocks packed on the fly.

The model of the data, in three lines:
- A split's chunks, in stored order, concatenate into its token stream; cut into `block_size` pieces it gives
  `per_epoch = tokens // block_size` blocks (the tail, shorter than a block, is left out of that epoch).
- Global block g is block perm_e(g mod per_epoch) of epoch e = g // per_epoch, where perm_e is a seeded
  permutation drawn anew each epoch (the identity without shuffling): a batch mixes blocks from all over.
- Optimizer step s uses global blocks [s*G, (s+1)*G), G = world * micro_batch * grad_accum; rank r takes the
  r-th contiguous share of them.

So the loader's whole position is one integer, the global blocks consumed at a step boundary. It is saved in
every checkpoint; on resume the block indices restart from it, which gives back exactly the blocks an
uninterrupted run would have seen, on any number of ranks with the same global batch. Chunks are read by
`StreamingDataset` random access (`ds[i]`): streaming keeps the storage (shard index, local/remote cache,
decompression); the order is ours, because its sample-level resume cannot express a position inside a
chunk, and packing at train time needs exactly that.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dist_clm.errors import UserError


def open_split(data_dir: str | Path, split: str):
    """A `StreamingDataset` over one split of a prepared directory, read in stored order."""
    from streaming import StreamingDataset

    return StreamingDataset(local=str(Path(data_dir) / split), shuffle=False, batch_size=1)


class TokenStream:
    """Random access into the token stream of one split, in stored order."""

    def __init__(self, data_dir: str | Path, split: str, manifest: dict):
        info = manifest["splits"][split]
        self.n_chunks, self.tokens = info["chunks"], info["tokens"]
        self.chunk_tokens = manifest["chunk_tokens"]  # every chunk but the last holds exactly this many
        self.ds = open_split(data_dir, split)
        if self.ds.num_samples != self.n_chunks:
            raise UserError(
                f"'{data_dir}/{split}' holds {self.ds.num_samples} chunks but its manifest says {self.n_chunks}; "
                "the directory was changed after prepare: prepare it again."
            )
        self._cached: tuple[int, np.ndarray] | None = None

    def _chunk(self, index: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != index:
            self._cached = (index, self.ds[index]["tokens"])
        return self._cached[1]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, across chunk borders."""
        if start < 0 or start + length > self.tokens:
            raise IndexError(f"tokens [{start}, {start + length}) are outside the stream of {self.tokens}")
        out = np.empty(length, dtype=np.int64)
        filled = 0
        while filled < length:
            k, lo = divmod(start + filled, self.chunk_tokens)
            chunk = self._chunk(k)
            take = min(length - filled, len(chunk) - lo)
            out[filled : filled + take] = chunk[lo : lo + take]
            filled += take
        return out


class PackedBlocks(Dataset):
    """Global block g -> {"input_ids", "labels"} of `block_size` tokens; labels = input_ids (the model shifts)."""

    def __init__(self, stream: TokenStream, block_size: int, shuffle: bool, seed: int):
        self.stream, self.block_size, self.shuffle, self.seed = stream, block_size, shuffle, seed
        self.per_epoch = stream.tokens // block_size
        if self.per_epoch == 0:
            raise UserError(
                f"the training split has {stream.tokens} tokens, fewer than one block of {block_size}; "
                "lower data.block_size or prepare more data."
            )
        self._epoch, self._perm = -1, None

    def __len__(self) -> int:  # endless: epochs follow each other
        raise TypeError("PackedBlocks is endless")

    def position(self, g: int) -> int:
        """Stream offset of global block g."""
        epoch, j = divmod(g, self.per_epoch)
        if self.shuffle:
            if epoch != self._epoch:
                self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.per_epoch)
            j = int(self._perm[j])
        return j * self.block_size

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.stream.read(self.position(g), self.block_size))
        return {"input_ids": ids, "labels": ids}


class RankShareSampler(Sampler[int]):
    """Global block indices of this rank, from `start`: its contiguous share of each step's blocks."""

    def __init__(self, rank: int, world: int, blocks_per_rank_step: int, start: int = 0):
        self.rank, self.world, self.per_rank, self.start = rank, world, blocks_per_rank_step, start

    def __iter__(self) -> Iterator[int]:
        base = self.start + self.rank * self.per_rank
        while True:
            yield from range(base, base + self.per_rank)
            base += self.world * self.per_rank


class TrainLoader:
    """This rank's micro batches; `state_dict()` at a step boundary is the position to resume from."""

    def __init__(
        self,
        data_dir: str | Path,
        manifest: dict,
        block_size: int,
        micro_batch: int,
        grad_accum: int,
        rank: int,
        world: int,
        shuffle: bool,
        seed: int,
        num_workers: int = 0,
        state: dict | None = None,
    ):
        if state and state["block_size"] != block_size:
            raise UserError(
                f"config key 'data.block_size' is {block_size} but the checkpoint was trained with "
                f"{state['block_size']}; resume with that value or start a new run directory."
            )
        self.block_size = block_size
        self.global_blocks_per_step = world * micro_batch * grad_accum
        self.start = int(state["blocks_consumed"]) if state else 0
        self.blocks = PackedBlocks(TokenStream(data_dir, "train", manifest), block_size, shuffle, seed)
        self.loader = DataLoader(
            self.blocks,
            batch_size=micro_batch,
            sampler=RankShareSampler(rank, world, micro_batch * grad_accum, self.start),
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )
        self.steps_done = 0  # optimizer steps taken since `start`

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.loader)

    def step_done(self) -> None:
        self.steps_done += 1

    def state_dict(self) -> dict:
        return {
            "blocks_consumed": self.start + self.steps_done * self.global_blocks_per_step,
            "block_size": self.block_size,
        }
