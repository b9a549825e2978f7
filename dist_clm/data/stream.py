"""A split's token stream, read at random: its chunks (MDS samples, read through memory maps of the shard files),
in stored order, concatenated; the documents' starts inside any range; the largest token id it may hold.

Chunks are read with mosaicml-streaming's own MDS shard readers, by random access. `StreamingDataset` is not
used: its coordination (shared memory between local ranks, a registry of local directories) exists to plan a
sample order, and ours is computed, not coordinated (order.py). Without it a run killed with -9 leaves no
shared memory behind, and any number of runs can read one prepared directory side by side.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dist_clm.data.format import token_limit
from dist_clm.data.remote import local_dir, mirror_of
from dist_clm.data.shards import ShardFiles
from dist_clm.errors import DataError

if TYPE_CHECKING:
    from dist_clm.data.remote import Lease, Mirror

_SHAPE_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.uint64))

# the store (of remote data through a limited cache) that holds this process's one open shard, if any
_HOLDING: list[ChunkStore] = []


def _let_go_held() -> None:
    """This process lets go of the shard it holds open; at a fork, the child (a loader worker) lets go of its
    copy of its parent's (leaving the parent's lease alone, remote.Lease) and opens its own when it reads."""
    for store in _HOLDING:
        store.let_go()
    _HOLDING.clear()


os.register_at_fork(after_in_child=_let_go_held)


class ChunkStore:
    """Chunk i of one split, read with streaming's MDS readers; compressed shards are decompressed once.

    `store[i]` is streaming's own decoding (`get_item`). The loader's hot path, `arrays(i)`, instead views the
    columns in a memory map of the shard: `get_item` opens the file and decodes the whole 16K-token sample on
    every call (~80 us), while a block needs a slice of it. The views follow the MDS layout streaming writes
    (sample offsets, then per sample the column sizes and each `ndarray:DTYPE` column's shape header and
    values), and every shard's first sample is checked against streaming's decoding when it is first mapped.

    A shard is mapped through its open file (ShardFiles.open). Remote data through a limited cache: a process
    keeps one shard mapped at a time, and holds it in the cache while mapped (its lease); before it opens
    another, it lets go of it, so a reader waiting for room in the cache holds none, and the cache's limit
    needs one shard per reading process of the node. Otherwise the maps are kept (nothing evicts the files).
    """

    def __init__(self, split_dir: str | Path, mirror: Mirror | None = None):
        """`split_dir`: a split of a prepared directory, or of the `mirror` of a remote one (whose shard files
        are fetched when first mapped, and checked then)."""
        self.files = ShardFiles(split_dir, mirror)
        self.dir, self.mirror, self.readers = self.files.dir, mirror, self.files.readers
        self.ends = np.cumsum([r.samples for r in self.readers]).tolist()
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._leases: dict[int, Lease] = {}  # (the shard mapped, held in a limited cache)
        self._one_at_a_time = mirror is not None and mirror.config.limit is not None
        self._layout_checked: set[int] = set()

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def shard_of_chunk(self, i: int) -> int:
        """The shard that holds chunk i."""
        return self._locate(i)[0]

    def _locate(self, i: int) -> tuple[int, int]:
        shard = bisect_right(self.ends, i)
        return shard, i - (self.ends[shard - 1] if shard else 0)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        shard, j = self._locate(i)
        return self.readers[shard].get_item(j)

    def arrays(self, i: int) -> dict[str, np.ndarray]:
        """Chunk i's columns as read-only views of the memory-mapped shard (no copy, no file open)."""
        shard, j = self._locate(i)
        if shard not in self._maps:
            self._maps[shard] = self._map(shard)
        return self._views(shard, j)

    def _map(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        reader = self.readers[shard]
        if any(s is not None for s in reader.column_sizes) or not all(
            e.startswith("ndarray:") and e.count(":") == 1 for e in reader.column_encodings
        ):
            raise DataError(f"'{self.dir}' holds MDS columns dist_clm did not write; prepare the data again.")
        if self._one_at_a_time:
            _let_go_held()  # (this process's one open shard, of any store, goes first)
            _HOLDING.append(self)
        lease = self.files.open(shard)  # checked (its size again: it may have changed since the split was opened)
        try:
            mm = np.memmap(lease.file, dtype=np.uint8, mode="r")
            # reads the file once (it is in the page cache after)
            self.files.check_hash(lease.file, reader.raw_data, mm, label=self.files.label(reader.raw_data))
            offsets = np.frombuffer(mm, np.uint32, count=reader.samples + 1, offset=4)
            self._maps[shard] = (mm, offsets)
            if shard not in self._layout_checked:
                self._check_layout(shard, mm[offsets[0] : offsets[1]].tobytes())
        except BaseException:
            self._maps.pop(shard, None)
            lease.release()
            raise
        if self._one_at_a_time:
            self._leases[shard] = lease
        else:
            lease.release()  # (the map is all it needs: nothing evicts the file)
        return mm, offsets

    def _check_layout(self, shard: int, sample: bytes) -> None:
        """The views of the shard's first sample are what streaming decodes from its bytes."""
        expected = self.readers[shard].decode_sample(sample)
        got = self._views(shard, 0)
        if any(not np.array_equal(got[k], expected[k]) for k in expected):
            raise DataError(f"'{self.dir}' uses an MDS layout this dist_clm cannot read; prepare the data again.")
        self._layout_checked.add(shard)

    def let_go(self) -> None:
        """Unmap the shards this store holds open, letting the cache evict them."""
        for lease in self._leases.values():
            lease.release()
        self._leases.clear()
        self._maps.clear()

    def shard_of(self, i: int) -> tuple[Path | str, int]:
        """Chunk i's shard file and its sample number in it (for messages)."""
        shard, j = self._locate(i)
        return self.files.label(self.readers[shard].raw_data), j

    def _views(self, shard: int, j: int) -> dict[str, np.ndarray]:
        mm, offsets = self._maps[shard]
        reader = self.readers[shard]
        names = reader.column_names
        begin = int(offsets[j])
        sizes = np.frombuffer(mm, np.uint32, count=len(names), offset=begin).tolist()  # every column varies
        pos = begin + 4 * len(names)
        out = {}
        for name, encoding, size in zip(names, reader.column_encodings, sizes, strict=True):
            head = int(mm[pos])  # ndim << 2 | shape dtype
            header = 1 + (head >> 2) * _SHAPE_DTYPES[head & 3].itemsize
            dtype = np.dtype(encoding.split(":")[1])
            out[name] = np.frombuffer(mm, dtype, count=(size - header) // dtype.itemsize, offset=pos + header)
            pos += size
        return out


class TokenStream:
    """Random access into the token stream of one split, in stored order, with its document starts."""

    def __init__(self, data_dir: str | Path, split: str, manifest: dict):
        info = manifest["splits"][split]
        self.n_chunks, self.tokens = info["chunks"], info["tokens"]
        self.chunk_tokens = manifest["chunk_tokens"]  # every chunk but a part's last holds exactly this many
        # a merged dataset's parts (each one's chunks, tokens), one after the other; else the split is one part
        runs = info.get("parts") or [[self.n_chunks, self.tokens]]
        self._chunk_starts = np.cumsum([0] + [c for c, _ in runs]).tolist()
        self._token_starts = np.cumsum([0] + [t for _, t in runs]).tolist()
        self.limit = token_limit(manifest)  # the largest token id the stream may hold
        self.masked = "fine_tuning" in manifest  # its chunks carry a loss mask (fine-tuning data)
        self.paired = bool(manifest.get("fine_tuning", {}).get("pairs"))  # preference pairs: blocks 2k, 2k+1
        self.chunks = ChunkStore(local_dir(data_dir) / split, mirror=mirror_of(data_dir))
        if len(self.chunks) != self.n_chunks:
            raise DataError(
                f"'{data_dir}/{split}' holds {len(self.chunks)} chunks but its manifest says {self.n_chunks}; "
                "the directory was changed after prepare: prepare it again."
            )

    def read(self, start: int, length: int, with_starts: bool = False):
        """Tokens [start, start + length) of the stream, across chunk borders; with `with_starts`, also the
        offsets (relative to `start`) where documents begin inside that range. Checked for token ids above
        the manifest's (validation and evaluation read this way; training blocks are checked in MixedBlocks)."""
        out = np.empty(length, dtype=np.int64)
        starts = self.read_into(start, out, with_starts)
        if length and out.max() > self.limit:
            raise self.bad_token(start, out)
        return (out, starts) if with_starts else out

    def bad_token(self, start: int, tokens: np.ndarray) -> DataError:
        """The error for `tokens`, read from offset `start`, holding an id above the limit."""
        at = int(np.argmax(tokens > self.limit))
        return bad_token_error(self.chunks, self.locate(start + at)[0], int(tokens[at]), self.limit)

    def locate(self, pos: int) -> tuple[int, int]:
        """(the chunk that holds token `pos` of the stream, the token's offset in it)."""
        p = bisect_right(self._token_starts, pos) - 1
        k, lo = divmod(pos - self._token_starts[p], self.chunk_tokens)
        return self._chunk_starts[p] + k, lo

    def chunk_start(self, chunk: int) -> int:
        """The stream offset of chunk `chunk`'s first token."""
        p = bisect_right(self._chunk_starts, chunk) - 1
        return self._token_starts[p] + (chunk - self._chunk_starts[p]) * self.chunk_tokens

    def document_start(self, pos: int) -> int:
        """The stream offset of the first token of the document that holds token `pos` (the stream's first token
        starts a document)."""
        k, lo = self.locate(pos)
        while True:
            bounds = self.chunks.arrays(k)["doc_bounds"][:-1]  # (the last entry is the chunk length)
            before = bounds[bounds <= lo]
            if before.size or k == 0:
                return self.chunk_start(k) + (int(before.max()) if before.size else 0)
            k -= 1
            lo = len(self.chunks.arrays(k)["tokens"])

    def reader(self):
        """What evaluation reads windows with: `read_learned` for fine-tuning data, else `read`."""
        return self.read_learned if self.masked else self.read

    def read_learned(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, learned, positions) of [start, start + length): `learned` marks the tokens that are targets
        (the loss mask of fine-tuning data, all tokens otherwise; never a document's first token) and the
        positions restart at every document start (for attention that stays inside documents)."""
        ids, learned = np.empty(length, dtype=np.int64), np.ones(length, dtype=np.uint8)
        starts = self.read_into(start, ids, True, learned if self.masked else None)
        if length and ids.max() > self.limit:
            raise self.bad_token(start, ids)
        learned[starts] = 0
        return ids, learned, document_positions(length, starts)

    def read_into(
        self, start: int, out: np.ndarray, with_starts: bool = False, mask: np.ndarray | None = None
    ) -> np.ndarray | None:
        """Fill `out` with tokens [start, start + len(out)) (and `mask` with their loss mask); return the
        document starts if asked."""
        length = len(out)
        if start < 0 or start + length > self.tokens:
            raise IndexError(f"tokens [{start}, {start + length}) are outside the stream of {self.tokens}")
        starts: list[np.ndarray] = []
        filled = 0
        while filled < length:
            k, lo = self.locate(start + filled)
            chunk = self.chunks.arrays(k)
            tokens = chunk["tokens"]
            take = min(length - filled, len(tokens) - lo)
            out[filled : filled + take] = tokens[lo : lo + take]
            if mask is not None:
                mask[filled : filled + take] = chunk["loss_mask"][lo : lo + take]
            if with_starts:
                b = chunk["doc_bounds"][:-1].astype(np.int64)  # the last entry is the chunk length
                starts.append(b[(b >= lo) & (b < lo + take)] - lo + filled)
            filled += take
        return np.concatenate(starts) if with_starts else None


def bad_token_error(store: ChunkStore, chunk: int, value: int, limit: int) -> DataError:
    """A token id above the manifest's `max_token_id` in chunk `chunk` of `store`: the shard is damaged."""
    path, j = store.shard_of(chunk)
    return DataError(
        f"shard file '{path}' holds token id {value} in chunk {chunk} (its sample {j}), above {limit}, the largest "
        "id its manifest allows, so it was damaged after prepare; prepare the data again."
    )


def document_positions(length: int, starts: np.ndarray) -> np.ndarray:
    """Positions that restart at 0 at every document start (a block's first token starts one too)."""
    begin = np.zeros(length, dtype=np.int64)
    begin[starts] = starts
    return np.arange(length, dtype=np.int64) - np.maximum.accumulate(begin)
