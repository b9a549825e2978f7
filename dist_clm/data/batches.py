"""A micro batch from global block numbers: each block's tokens (read from its source's stream at the offset the
order gives), its labels (the ids; -100 where nothing is learned: a loss mask, a document's first token with
document masking), its position ids (restarting at every document, with document masking), its source, and,
for preference pairs with a reference model's values, those values per conversation. Every block is checked
for token ids above its source's largest (damage that would be an IndexError in the model)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from dist_clm.data.mixture import Stage, StagedMixture
from dist_clm.data.order import PackedBlocks, Source
from dist_clm.data.reference_store import load_values, values_in
from dist_clm.data.stream import TokenStream, document_positions


class MixedBlocks(Dataset):
    """Global block g -> {"input_ids", "labels", "source"} (+ "position_ids" with document masking).

    labels = input_ids (the model shifts them). With `document_mask`, positions restart at every document start
    and the label of each document's first token is ignored (-100): nothing is predicted across a boundary,
    and transformers turns restarting positions into attention that does not cross documents. Fine-tuning
    data carries a loss mask: the labels of the tokens it does not learn (prompts, padding) are -100 too.
    """

    def __init__(
        self,
        sources: list[Source],
        block_size: int,
        shuffle: bool,
        seed: int,
        document_mask: bool,
        window: int = 0,
        stages: list[Stage] | None = None,
    ):
        """`stages`: the mixture and block sizes over the run (mixture.plan); None: the sources' weights and
        `block_size` throughout. `window`: blocks of `block_size` per shuffle window (scaled for other sizes)."""
        train = [s for s in sources if s.weight > 0]
        self.names = [s.name for s in train]
        streams = [TokenStream(s.path, "train", s.manifest) for s in train]
        self.mixture = StagedMixture(stages or [Stage(0, tuple(s.weight for s in train), block_size)])
        # each block size's blocks of each source; a source of preference pairs is shuffled pair by pair: its
        # units are two blocks (chosen, rejected)
        self.by_size = {
            size: [
                PackedBlocks(t, size * (2 if t.paired else 1), shuffle, seed + 1000 * i, s.name,
                             max(1, window * block_size // size) if window else 0)
                for i, (s, t) in enumerate(zip(train, streams, strict=True))
            ]
            for size in dict.fromkeys([block_size, *(s.block_size for s in self.mixture.stages)])
        }  # fmt: skip
        self.blocks = self.by_size[block_size]
        # the largest id each source may hold: a larger one is damage, which the model would turn into an
        # IndexError (on a GPU a device-side assert while the other ranks hang)
        self.limits = np.array([b.stream.limit for b in self.blocks], dtype=np.int64)
        self.smallest_limit = int(self.limits.min())
        self.block_size, self.document_mask = block_size, document_mask
        self.masked = [b.stream.masked for b in self.blocks]
        # preference pairs with the reference model's values (prepare-reference): (offsets, values) per source
        self.references = [load_values(s.path, "train") if t.paired else None
                           for s, t in zip(train, streams, strict=True)]  # fmt: skip
        self.with_reference = any(r is not None for r in self.references)
        self.labelled = document_mask or any(self.masked)  # labels differ from the ids

    def __len__(self) -> int:  # endless: epochs follow each other
        raise TypeError("MixedBlocks is endless")

    def offset(self, i: int, k: int, size: int | None = None) -> int:
        """Stream offset of block k of training source i (of a source of pairs: member k % 2 of pair k // 2), in
        blocks of `size` tokens (default: block_size)."""
        size = size or self.block_size
        blocks = self.by_size[size][i]
        if blocks.stream.paired:
            return blocks.position(k // 2) + (k % 2) * size
        return blocks.position(k)

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        return {k: torch.as_tensor(v[0]) for k, v in self.__getitems__([g]).items()}

    def __getitems__(self, gs: list[int]) -> dict[str, np.ndarray]:
        """A whole micro batch at once (the DataLoader calls this): rows filled in place, one array per key.

        numpy, not torch: from a loader worker, arrays travel pickled through the pipe, ~7x faster here than
        tensors, which torch moves through a new shared-memory segment each (TrainLoader converts them)."""
        n, size = len(gs), self.mixture.block_size(gs[0])  # (a micro batch lies in one stage)
        ids, source = np.empty((n, size), dtype=np.int64), np.empty(n, dtype=np.int64)
        if self.labelled:
            labels, learned = np.empty((n, size), dtype=np.int64), np.empty(size, dtype=np.uint8)
        if self.document_mask:
            positions = np.empty((n, size), dtype=np.int64)
        if self.with_reference:  # each row's learned conversations' reference values, in order (NaN after)
            reference = np.full((n, size // 2), np.nan)
        for row, g in enumerate(gs):
            i, k = self.mixture(g)
            blocks = self.blocks[i]
            source[row] = i
            mask = learned if self.masked[i] else None
            at = self.offset(i, k, size)
            starts = blocks.stream.read_into(at, ids[row], self.document_mask, mask)
            if self.with_reference and self.references[i] is not None:
                values = values_in(self.references[i], at, size)
                reference[row, : len(values)] = values
            if self.labelled:
                labels[row] = ids[row]
                if mask is not None:
                    labels[row, mask == 0] = -100
            if self.document_mask:
                labels[row, starts[starts > 0]] = -100
                positions[row] = document_positions(size, starts)
        # one max over the batch (~3 us for 8 x 2048 tokens), then rows against their own source's limit only
        # if it could be needed (sources prepared from different text have different largest ids)
        if ids.max() > self.smallest_limit:
            bad = np.flatnonzero(ids.max(axis=1) > self.limits[source])
            if bad.size:
                i, k = self.mixture(gs[bad[0]])
                raise self.blocks[i].stream.bad_token(self.offset(i, k, size), ids[bad[0]])
        batch = {"input_ids": ids, "source": source, "labels": labels if self.labelled else ids}
        if self.with_reference:
            batch["reference"] = reference
        return batch | ({"position_ids": positions} if self.document_mask else {})
