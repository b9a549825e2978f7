"""Which source each global training block comes from: a fixed interleaving that realizes the weights exactly,
stage by stage.

A run without `data.stages` has one stage: the data.mix weights from block 0 on. With stages, stage j covers
the global blocks [start_j, start_{j+1}) (start_j = the previous stage's `until` step x the global batch), and
its own `Mixture` interleaves them from its first block; each source's blocks continue where the earlier stages
left them (a source is never read twice within an epoch because the mixture changed). A stage may also train
on blocks of another length (context extension): each source's blocks then continue where the tokens read so
far leave it (its block number scaled by the ratio of the lengths), in that length's own shuffled order. So the
order stays a pure function of the global block number: resume anywhere, across a boundary too, gives the same
blocks.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

import numpy as np


class Mixture:
    """Global block g -> (source i, that source's block number k), realizing the weights exactly per period.

    Within a period the slots go to sources by largest deficit (weight share so far minus blocks given), so
    every stretch of blocks, even one micro batch, holds each source close to its share. O(1) per lookup and
    a pure function of g: resuming at any g continues the same interleaving. A weight of 0 gets no slot.
    """

    PERIOD = 4096

    def __init__(self, weights: list[float]):
        total = sum(weights)
        share = [w / total for w in weights]
        counts = [int(s * self.PERIOD) for s in share]  # largest remainder: the counts sum to PERIOD
        for i in sorted(range(len(share)), key=lambda i: counts[i] - share[i] * self.PERIOD)[
            : self.PERIOD - sum(counts)
        ]:
            counts[i] += 1
        self.counts = counts
        self.source = np.empty(self.PERIOD, dtype=np.int64)  # the source of each slot
        self.rank = np.empty(self.PERIOD, dtype=np.int64)  # how many earlier slots of the period it has
        given = [0] * len(counts)
        for t in range(self.PERIOD):
            i = max(range(len(counts)), key=lambda i: (t + 1) * counts[i] / self.PERIOD - given[i])
            self.source[t], self.rank[t] = i, given[i]
            given[i] += 1

    def __call__(self, g: int) -> tuple[int, int]:
        period, t = divmod(g, self.PERIOD)
        i = int(self.source[t])
        return i, period * self.counts[i] + int(self.rank[t])

    def given(self, n: int) -> list[int]:
        """How many of the first `n` blocks each source gets."""
        period, t = divmod(n, self.PERIOD)
        partial = np.bincount(self.source[:t], minlength=len(self.counts))
        return [period * c + int(p) for c, p in zip(self.counts, partial, strict=True)]


@dataclass(frozen=True)
class Stage:
    """From global block `start` on (until the next stage's start), the training sources' weights and the
    tokens per block."""

    start: int
    weights: tuple[float, ...]
    block_size: int

    def to_json(self) -> list:
        return [self.start, list(self.weights), self.block_size]

    @classmethod
    def from_json(cls, data: list) -> Stage:
        return cls(int(data[0]), tuple(float(w) for w in data[1]), int(data[2]))


class StagedMixture:
    """Global block g -> (source i, its block number k) through the stages; one stage is a plain Mixture."""

    def __init__(self, stages: list[Stage]):
        self.stages = stages
        self.starts = [s.start for s in stages]
        self.mixtures = [Mixture(list(s.weights)) for s in stages]
        # offsets[j][i]: where source i's blocks of stage j start (its blocks taken by the stages before j, in
        # stage j's block length)
        self.offsets, taken = [], [0] * len(stages[0].weights)
        for j, mix in enumerate(self.mixtures):
            if j and stages[j].block_size != stages[j - 1].block_size:  # (rounded up: no block read twice)
                taken = [-(-t * stages[j - 1].block_size // stages[j].block_size) for t in taken]
            self.offsets.append(list(taken))
            if j + 1 < len(stages):
                taken = [a + b for a, b in zip(taken, mix.given(stages[j + 1].start - stages[j].start), strict=True)]

    def stage_of(self, g: int) -> int:
        return bisect_right(self.starts, g) - 1

    def block_size(self, g: int) -> int:
        """Tokens per block of global block g."""
        return self.stages[self.stage_of(g)].block_size

    def __call__(self, g: int) -> tuple[int, int]:
        j = bisect_right(self.starts, g) - 1
        i, k = self.mixtures[j](g - self.starts[j])
        return i, self.offsets[j][i] + k

    def blocks_in(self, j: int) -> list[int] | None:
        """Stage j's blocks per source, exactly (None for the last stage, which lasts as long as the run)."""
        if j + 1 >= len(self.stages):
            return None
        return self.mixtures[j].given(self.stages[j + 1].start - self.stages[j].start)


def plan(stages: list, names: list[str], weights: list[float], blocks_per_step: int, block_size: int) -> list[Stage]:
    """`data.stages` (each with `until`, a step, and optionally `weights` by source name and `block_size`) as
    Stages over the training sources `names`, in blocks; a stage without weights or block size keeps the previous
    stage's (the first: the data.mix `weights` and data.block_size); no stages: one stage of those."""
    weights = tuple(float(w) for w in weights)
    if not stages:
        return [Stage(0, weights, block_size)]
    out, start = [], 0
    for s in stages:
        if s.weights is not None:
            weights = tuple(float(s.weights.get(n, 0.0)) for n in names)
        block_size = s.block_size or block_size
        out.append(Stage(start, weights, block_size))
        start = s.until * blocks_per_step
    return out


def past_changed(saved: list[Stage], now: list[Stage], blocks: int) -> bool:
    """Whether `now` orders the first `blocks` global blocks differently from `saved` (the stages a checkpoint
    was trained with): a stage's start or weights changed before `blocks`. Later stages may change freely."""

    def clipped(stages: list[Stage]) -> list[tuple]:
        ends = [s.start for s in stages[1:]] + [blocks]
        return [(s.start, min(end, blocks), s.weights, s.block_size)
                for s, end in zip(stages, ends, strict=True) if s.start < blocks]  # fmt: skip

    return clipped(saved) != clipped(now)


def shares(mixture: StagedMixture, j: int) -> list[float]:
    """Stage j's exact share of blocks per source (the last stage's: over every period of blocks)."""
    counts = mixture.blocks_in(j) or mixture.mixtures[j].counts
    return [c / sum(counts) for c in counts]


def describe(mixture: StagedMixture, j: int, names: list[str], blocks_per_step: int) -> str:
    """One line on stage j: its steps and its exact share of blocks per source."""
    stages = mixture.stages
    first = stages[j].start // blocks_per_step + 1
    last = stages[j + 1].start // blocks_per_step if j + 1 < len(stages) else ""
    mix = ", ".join(f"{n} {100 * s:.1f}%" for n, s in zip(names, shares(mixture, j), strict=True))
    return f"data stage {j + 1} of {len(stages)} (steps {first}-{last}): {mix} of the blocks" + (
        f", {stages[j].block_size} tokens each" if len({s.block_size for s in stages}) > 1 else ""
    )
