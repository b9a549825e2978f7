"""Where a run stands in its data, and what fixes the order of the blocks: the part of a checkpoint that decides
whether a resume continues the same data.

The order of the training blocks is a pure function of the global block number (loader.MixedBlocks over
mixture.StagedMixture), given the settings this part holds: the training sources (their weights, tokenizer and
token counts: a fingerprint, not a path, so a moved directory still resumes), the block size, the shuffle
window, the stages (in blocks) and the global batch (blocks per optimizer step). Its position is one integer,
the global blocks consumed, moved past every data window a rollback skipped (RUN/skips.json, kept by rank 0:
a resume from a checkpoint before a rollback skips that window again).

`load_state_dict` refuses, naming each change, a checkpoint whose blocks this run would order differently;
the number of ranks and the micro batch may change (the global batch may not), and stages that have not begun
may be appended or changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dist_clm.data.mixture import Stage, past_changed, plan
from dist_clm.errors import Mismatch, UserError
from dist_clm.fsutil import atomic_write_text

if TYPE_CHECKING:
    from dist_clm.data.stream import TokenStream

SKIPS = "skips.json"


@dataclass
class Source:
    """One prepared directory in the training mixture (weight 0: validation only)."""

    name: str
    path: str
    manifest: dict
    weight: float = 1.0


class PackedBlocks:
    """Block k of one source's stream: shuffled anew each epoch, the tail shorter than a block left out.

    With `window` blocks (0: a global shuffle), the shuffle has two levels over the epoch's pieces, one per
    shard (the blocks that start in it): the pieces come in a seeded random order, consecutive groups of them
    (as many whole shards as make about `window` blocks, at least one) form the windows, and the blocks of a
    window come in another seeded order. Consecutive k then read one window, a few random shards of the
    corpus, at a time, which keeps a bounded cache of remote shards from thrashing and mixes several distant
    stretches of the stream in every window. Still a bijection of each epoch's blocks, a function of k.
    """

    def __init__(
        self, stream: TokenStream, block_size: int, shuffle: bool, seed: int, name: str = "train", window: int = 0
    ):
        self.stream, self.block_size, self.shuffle, self.seed = stream, block_size, shuffle, seed
        self.per_epoch = stream.tokens // block_size
        if self.per_epoch == 0:
            raise UserError(
                f"the training split of '{name}' has {stream.tokens} tokens, fewer than one block of {block_size}; "
                "lower data.block_size or prepare more data."
            )
        # where each shard's piece of the epoch's blocks starts (a block belongs to the shard it starts in)
        bounds = {0} | {-(-stream.chunk_start(e) // block_size) for e in stream.chunks.ends[:-1]}
        self.edges = np.array(sorted(b for b in bounds if b < self.per_epoch) + [self.per_epoch])
        n = len(self.edges) - 1
        self.group = max(1, round(window * n / self.per_epoch)) if window else n  # shards per window
        self.window = window if self.group < n else self.per_epoch  # (per_epoch: the global shuffle)
        self._epoch, self._perm = -1, None
        self._window, self._inner = -1, None

    def position(self, k: int) -> int:
        """Stream offset of block k."""
        epoch, j = divmod(k, self.per_epoch)
        if self.shuffle:
            j = self._shuffled(epoch, j)
        return j * self.block_size

    def _shuffled(self, epoch: int, j: int) -> int:
        if self.window == self.per_epoch:  # one window: the permutation of all the epoch's blocks
            if epoch != self._epoch:
                self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.per_epoch)
            return int(self._perm[j])
        if epoch != self._epoch:  # the pieces' order, and where each window starts in it
            order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.edges) - 1)
            sizes = np.diff(self.edges)[order]
            per_window = np.add.reduceat(sizes, np.arange(0, len(order), self.group))
            self._epoch, self._perm = epoch, (order, np.concatenate([[0], np.cumsum(per_window)]))
            self._window = -1
        order, starts = self._perm
        w = int(np.searchsorted(starts, j, side="right")) - 1
        if w != self._window:  # window w: its pieces, where each starts in the window, the blocks' order
            pieces = order[w * self.group : (w + 1) * self.group]
            within = np.concatenate([[0], np.cumsum(np.diff(self.edges)[pieces])])
            inner = np.random.default_rng([self.seed, epoch, 2, w]).permutation(int(within[-1]))
            self._window, self._inner = w, (pieces, within, inner)
        pieces, within, inner = self._inner
        i = int(inner[j - int(starts[w])])
        p = int(np.searchsorted(within, i, side="right")) - 1
        return int(self.edges[pieces[p]]) + i - int(within[p])


def rank_blocks(start: int, step: int, rank: int, world: int, per_rank: int) -> range:
    """The global blocks rank `rank` reads in step `step` (0-based from the global block `start`): its contiguous
    share of the step's world x per_rank blocks."""
    first = start + (step * world + rank) * per_rank
    return range(first, first + per_rank)


def prepared_identity(m: dict) -> dict:
    """What identifies one prepared dataset, wherever it lies: its tokenizer and its token stream's shape."""
    splits = {k: [v["documents"], v["tokens"], v["chunks"]] for k, v in sorted(m["splits"].items())}
    return {"tokenizer": m["tokenizer"]["fingerprint"], "chunk_tokens": m["chunk_tokens"], "splits": splits}


def data_fingerprint(sources) -> list[dict]:
    """What identifies the data: per source, whether it trains (its weight is the order's: the mixture's and the
    stages' checks) and its prepared_identity."""
    return [{"trains": s.weight > 0, **prepared_identity(s.manifest)} for s in sources]


class DataPosition:
    """The data's order settings and the run's position in it (the module docstring)."""

    def __init__(self, sources, *, block_size: int, global_batch: int, shuffle_window: int = 0, stages=None,
                 run_dir: str | Path | None = None, writes: bool = True):  # fmt: skip
        """`sources`: loader.Source (validation-only ones, weight 0, included); `stages`: data.stages (None: the
        sources' weights throughout); `run_dir`: where RUN/skips.json lives (None: no rollbacks recorded);
        `writes`: this process records skips (rank 0)."""
        self.mix = [[s.name, s.weight] for s in sources if s.weight > 0]
        self.names = [name for name, _ in self.mix]
        self.block_size, self.shuffle_window, self.global_batch = block_size, shuffle_window, global_batch
        self.stages = plan(stages or [], self.names, [w for _, w in self.mix], global_batch, block_size)
        self.fingerprint = data_fingerprint(sources)
        self.skips = Path(run_dir) / SKIPS if run_dir is not None else None
        self.writes = writes
        self.blocks_consumed = 0

    @classmethod
    def from_config(cls, d, run_dir, sources, global_batch: int, writes: bool = True) -> DataPosition:
        """At the start of the data section `d` (config.DataConfig) for a run in `run_dir`."""
        return cls(sources, block_size=d.block_size, global_batch=global_batch, shuffle_window=d.shuffle_window,
                   stages=d.stages, run_dir=run_dir, writes=writes)  # fmt: skip

    def state_dict(self) -> dict:
        return {
            "blocks_consumed": self.blocks_consumed,
            "block_size": self.block_size,
            "global_batch": self.global_batch,
            "mix": self.mix,
            "shuffle_window": self.shuffle_window,
            "stages": [s.to_json() for s in self.stages],
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, saved: dict) -> None:
        """Continue from `saved` (past any skipped window), or raise Mismatch naming what would order the blocks
        differently."""
        changes = []
        if saved["fingerprint"] != self.fingerprint:
            changes.append("the training data (tokenizer, sources or token counts)")
        if saved["global_batch"] != self.global_batch:
            old = saved["global_batch"]  # (unset, it is micro batch x ranks x accumulation: ranks change it)
            changes.append(f"the global batch: {old} blocks per step, now {self.global_batch}; "
                           f"train.global_batch_size={old} keeps it on any number of ranks")  # fmt: skip
        for key in ("block_size", "shuffle_window"):
            if saved[key] != getattr(self, key):
                changes.append(f"data.{key}: {saved[key]} -> {getattr(self, key)}")
        # (a record from before stages had block sizes: its block size throughout)
        past = [Stage.from_json(x if len(x) > 2 else [*x, saved["block_size"]]) for x in saved["stages"]]
        one_stage = len(past) == len(self.stages) == 1  # (its block size is data.block_size's, named above)
        if len(saved["mix"]) != len(self.mix) or (one_stage and past[0].weights != self.stages[0].weights):
            changes.append(f"the training mixture ({saved['mix']} -> {self.mix})")  # (names may change: a move)
        elif not one_stage and past_changed(past, self.stages, saved["blocks_consumed"]):
            changes.append(self._stage_change(past, saved["blocks_consumed"]))
        if changes:
            raise Mismatch(changes)
        self.blocks_consumed = self.past_skipped(saved["blocks_consumed"])

    def _stage_change(self, past: list[Stage], blocks: int) -> str:
        per_step = self.global_batch

        def show(stages: list[Stage]) -> str:
            return "; ".join(
                f"from step {s.start // per_step + 1}: "
                + ", ".join(f"{n} {w:g}" for n, w in zip(self.names, s.weights, strict=True))
                + f" in blocks of {s.block_size}"
                for s in stages
                if s.start < blocks
            )

        return (
            f"the data mixture of the {blocks // per_step} steps already trained ({show(past)} -> "
            f"{show(self.stages)}): stages that have begun cannot change, their block size included (appending a "
            "stage, or changing one that has not begun, is fine)"
        )

    def block_size_at(self, blocks_consumed: int | None = None) -> int:
        """Tokens per block of the step starting at `blocks_consumed` (default: where the position stands)."""
        blocks = self.blocks_consumed if blocks_consumed is None else blocks_consumed
        return [s for s in self.stages if s.start <= blocks][-1].block_size

    @property
    def block_sizes(self) -> list[int]:
        """Every block size of the run's stages, in order of first use."""
        return list(dict.fromkeys(s.block_size for s in self.stages))

    def step_done(self) -> None:
        """One optimizer step's blocks consumed."""
        self.blocks_consumed += self.global_batch

    def skip_to(self, blocks: int, at_step: int, reason: str) -> tuple[int, int]:
        """After a rollback to a checkpoint (this position is the checkpoint's): move to `blocks` (where the run
        stood), past the data window that led to `reason`, and record the window so that a resume from that
        checkpoint skips it too. Returns the window."""
        window = (self.blocks_consumed, blocks)
        if self.writes and self.skips is not None:
            skips = json.loads(self.skips.read_text()) if self.skips.is_file() else []
            skips.append({"from_block": window[0], "to_block": window[1], "diverged_at_step": at_step,
                          "reason": reason})  # fmt: skip
            atomic_write_text(self.skips, json.dumps(skips, indent=2))
        self.blocks_consumed = blocks
        return window

    def skipped_windows(self) -> list[dict]:
        """RUN/skips.json's records (from_block, to_block, diverged_at_step, reason), oldest first."""
        if self.skips is None or not self.skips.is_file():
            return []
        return json.loads(self.skips.read_text())

    def skip_ends(self) -> dict[int, int]:
        """Every skipped window, from_block -> to_block (the latest record of a start wins)."""
        return {s["from_block"]: s["to_block"] for s in self.skipped_windows()}

    def past_skipped(self, blocks_consumed: int) -> int:
        """`blocks_consumed`, moved past every skipped window starting there."""
        ends = self.skip_ends()
        while blocks_consumed in ends and ends[blocks_consumed] > blocks_consumed:
            blocks_consumed = ends[blocks_consumed]
        return blocks_consumed
