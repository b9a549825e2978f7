"""Streaming loader: MDS chunks -> token streams -> fixed-size blocks packed on the fly, mixed by weight.

The model of the data, in four lines:
- A split's chunks, in stored order, concatenate into its token stream; cut into `block_size` pieces it gives
  `per_epoch = tokens // block_size` blocks (the tail, shorter than a block, is left out of that epoch).
- Block k of a source is block perm_e(k mod per_epoch) of its epoch e = k // per_epoch, where perm_e is a
  seeded permutation drawn anew each epoch (the identity without shuffling).
- Global block g belongs to source mix(g) as that source's block number k(g): a fixed interleaving that
  realizes the weights exactly over every period of `Mixture.PERIOD` blocks (one source: k = g), stage by
  stage when the mixture changes over the run (mixture.py).
- Optimizer step s uses global blocks [s*G, (s+1)*G), G = world * micro_batch * grad_accum; rank r takes the
  r-th contiguous share of them.

So the loader's whole position is one integer, the global blocks consumed at a step boundary. It is saved in
every checkpoint; on resume the block indices restart from it, which gives back exactly the blocks an
uninterrupted run would have seen (any number of loader workers), and, on another number of ranks with the
same global batch, exactly the same blocks per step split differently between ranks.

Chunks are read with mosaicml-streaming's own MDS shard readers, by random access. `StreamingDataset` is not
used: its coordination (shared memory between local ranks, a registry of local directories) exists to plan a
sample order, and ours is computed, not coordinated. Without it a run killed with -9 leaves no shared memory
behind, and any number of runs can read one prepared directory side by side.

What is read is checked against what prepare wrote, and damage is a DataError (one sentence, naming the file):
- index.json's file names are plain names inside the split directory, checked before any file is opened;
- every shard file has index.json's size when the split is opened; its hash (if index.json has one) is
  checked once per process, when the shard is first memory-mapped (a compressed file: before decompressing);
- every block handed to the model holds no token id above the manifest's `max_token_id` (one max per row).
"""

from __future__ import annotations

import atexit
import errno
import json
import multiprocessing.util  # noqa: F401 -- its exit handler registered before ours, so ours runs first
import os
import weakref
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dist_clm.data.mixture import Stage, StagedMixture, describe, shares
from dist_clm.data.prefetch import Prefetcher
from dist_clm.data.prepare import SHARD_HASH, token_limit
from dist_clm.data.reference_store import load_values
from dist_clm.data.remote import Mirror, is_remote, local_dir, mirror_of
from dist_clm.errors import DataError, UserError
from dist_clm.preemption import ignore_stop_signals

if TYPE_CHECKING:
    from dist_clm.config import Config
    from dist_clm.data.order import DataPosition

_SHAPE_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.uint64))
# shard files whose hash this process has checked: (path, device, inode, size, mtime); a changed file is new
_VERIFIED: set[tuple] = set()


def _verified_key(path: Path) -> tuple:
    """A file as _VERIFIED knows it: its path and what changes when it is rewritten."""
    st = path.stat()
    return (str(path.absolute()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def plain_name(name: object) -> bool:
    """Whether an index.json file name is a plain name inside its directory (it is joined to it as a path)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\\0")
        and not os.path.isabs(name)
    )


def read_index(split_dir: str | Path) -> list[dict]:
    """The shard entries of a split's index.json, checked to be MDS entries with plain file names (streaming
    joins its names to the directory unchecked; nothing here reads or writes a file before this check)."""
    d = Path(split_dir)
    index = d / "index.json"
    if not index.is_file():
        raise DataError(f"'{d}' has no index.json, so it holds no MDS shards; prepare the data again.")
    try:
        shards = json.loads(index.read_bytes())["shards"]
        ok = isinstance(shards, list) and all(
            isinstance(s, dict)
            and s.get("format") == "mds"
            and isinstance(s.get("samples"), int)
            and _file_entry(s.get("raw_data"))
            and (s.get("zip_data") is None or _file_entry(s["zip_data"]))
            for s in shards
        )
    except (OSError, ValueError, KeyError, TypeError):  # unreadable, not UTF-8 or JSON, not an index
        ok = False
    if not ok:
        raise DataError(f"'{index}' is not a readable MDS index (damaged or changed); prepare the data again.")
    for s in shards:
        for info in (s["raw_data"], s.get("zip_data")):
            if info is not None and not plain_name(info.get("basename")):
                raise DataError(
                    f"'{index}' names the shard file {info.get('basename')!r}, which is not a plain file name "
                    f"inside '{d}'; prepare the data again."
                )
    return shards


def _file_entry(info: object) -> bool:
    return isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("hashes"), dict)


def _damaged(path: Path, what: str) -> DataError:
    return DataError(f"shard file '{path}' {what}, so it was damaged or changed after prepare; prepare the data again.")


class ChunkStore:
    """Chunk i of one split, read with streaming's MDS readers; compressed shards are decompressed once.

    `store[i]` is streaming's own decoding (`get_item`). The loader's hot path, `arrays(i)`, instead views the
    columns in a memory map of the shard: `get_item` opens the file and decodes the whole 16K-token sample on
    every call (~80 us), while a block needs a slice of it. The views follow the MDS layout streaming writes
    (sample offsets, then per sample the column sizes and each `ndarray:DTYPE` column's shape header and
    values), and every shard's first sample is checked against `get_item` when it is first mapped.
    """

    def __init__(self, split_dir: str | Path, mirror: Mirror | None = None):
        """`split_dir`: a split of a prepared directory, or of the `mirror` of a remote one (whose shard files
        are fetched when first mapped, and checked then)."""
        from streaming.base.format import reader_from_json

        self.dir, self.mirror = Path(split_dir), mirror
        shards = read_index(self.dir)
        try:
            self.readers = [reader_from_json(str(self.dir), None, s) for s in shards]
        except (KeyError, TypeError, ValueError, AssertionError):  # fields streaming needs are missing or wrong
            raise DataError(
                f"'{self.dir / 'index.json'}' is not a readable MDS index (damaged or changed); prepare the data again."
            ) from None
        for reader in self.readers if mirror is None else ():  # (remote files: checked when fetched)
            raw = self.dir / reader.raw_data.basename
            if reader.zip_data is None or raw.is_file():
                self._check_size(raw, reader.raw_data)
            else:
                self._ensure_raw(reader)
        self.ends = np.cumsum([r.samples for r in self.readers]).tolist()
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @staticmethod
    def _check_size(path: Path, info, label: str | None = None) -> None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise DataError(f"shard file '{label or path}' is missing; prepare the data again.") from None
        if size != info.bytes:
            raise _damaged(label or path, f"has {size:,} bytes where index.json says {info.bytes:,}")

    def _fetched(self, info) -> Path:
        """A remote shard file in the node's cache: downloaded if missing, its size and hash checked first."""
        label = f"{self.mirror.url}/{self.dir.name}/{info.basename}"

        checked: list[Path] = []

        def check(part: Path) -> None:
            self._check_size(part, info, label)
            self._check_hash(part, info, np.memmap(part, dtype=np.uint8, mode="r"), force=True, label=label)
            checked.append(part)

        path = self.mirror.shard(self.dir.name, info.basename, info.bytes, check)
        if checked:  # hashed as it arrived: the renamed file (same inode) is not hashed again when mapped
            _VERIFIED.add(_verified_key(path))
        return path

    def _raw_file(self, reader) -> Path:
        """The shard's raw file to read: in the directory, or fetched into the cache (and decompressed there)."""
        if self.mirror is None:
            return self.dir / reader.raw_data.basename
        if reader.zip_data is None:
            return self._fetched(reader.raw_data)
        raw = self.dir / reader.raw_data.basename
        if not raw.is_file():
            self._fetched(reader.zip_data)
            self._ensure_raw(reader)
        return raw

    @staticmethod
    def _check_hash(path: Path, info, data, force: bool = False, label: str | None = None) -> str | None:
        """Check `data` (the file's bytes, or a memory map of it) against index.json's hash, once per process
        unless `force`; returns the algorithm used, None if index.json has none (data prepared without)."""
        from streaming.base.hashing import get_hash, is_hash

        known = sorted(a for a in info.hashes if is_hash(a))
        if not known:
            return None
        algo = SHARD_HASH if SHARD_HASH in known else known[0]
        key = _verified_key(path)
        if force or key not in _VERIFIED:
            if get_hash(algo, data) != info.hashes[algo]:
                raise _damaged(label or path, f"does not match its {algo} hash in index.json")
            _VERIFIED.add(key)
        return algo

    def _ensure_raw(self, reader) -> None:
        """The reader reads raw shard files; write one from its compressed file where missing (checked against
        index.json's size and hash first; atomically, so concurrent runs or a kill never leave a truncated raw
        shard)."""
        from streaming.base.compression import decompress

        raw, packed = self.dir / reader.raw_data.basename, self.dir / reader.zip_data.basename
        self._check_size(packed, reader.zip_data)
        packed_bytes = packed.read_bytes()
        self._check_hash(packed, reader.zip_data, packed_bytes, force=True)
        try:
            data = decompress(reader.compression, packed_bytes)
        except Exception:  # whatever the decompressor raises on bad input
            raise _damaged(packed, f"does not decompress with {reader.compression}") from None
        if len(data) != reader.raw_data.bytes:
            raise _damaged(
                packed, f"decompresses to {len(data):,} bytes where index.json says {reader.raw_data.bytes:,}"
            )
        tmp = raw.with_name(f".{raw.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, raw)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise UserError(
                f"no space left on device while decompressing '{packed}' to '{raw}'; free space there or prepare "
                "the data again without --compression."
            ) from None

    def ensure_local(self, shard: int) -> bool:
        """Remote data: have shard `shard`'s file in the node's cache now (True if it was fetched now, not
        already there). Local data: nothing to do."""
        if self.mirror is None:
            return False
        reader = self.readers[shard]
        present = (self.dir / reader.raw_data.basename).is_file()
        self._raw_file(reader)
        return not present

    def verify_shard(self, shard: int) -> str | None:
        """Hash shard `shard`'s files now (the compressed one too, if it is there); the algorithm, or None if
        index.json records no hash (only sizes are checked then)."""
        reader = self.readers[shard]
        algo = None
        if self.mirror is not None:
            self._raw_file(reader)  # (fetched and checked, the compressed file too)
        if reader.zip_data is not None:
            packed = self.dir / reader.zip_data.basename
            if packed.is_file():  # (it may have been deleted to save space once the raw file was written)
                self._check_size(packed, reader.zip_data)
                algo = self._check_hash(packed, reader.zip_data, packed.read_bytes(), force=True)
        raw = self.dir / reader.raw_data.basename
        self._check_size(raw, reader.raw_data)
        return self._check_hash(raw, reader.raw_data, np.memmap(raw, dtype=np.uint8, mode="r"), force=True) or algo

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

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
        path = self._raw_file(reader)
        self._check_size(path, reader.raw_data)  # again: it may have changed since the split was opened
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        self._check_hash(path, reader.raw_data, mm)  # reads the file once (it is in the page cache after)
        offsets = np.frombuffer(mm, np.uint32, count=reader.samples + 1, offset=4)
        self._maps[shard] = (mm, offsets)
        expected = reader.get_item(0)
        got = self._views(shard, 0)
        if any(not np.array_equal(got[k], expected[k]) for k in expected):
            raise DataError(f"'{self.dir}' uses an MDS layout this dist_clm cannot read; prepare the data again.")
        return mm, offsets

    def shard_of(self, i: int) -> tuple[Path, int]:
        """Chunk i's shard file and its sample number in it (for messages)."""
        shard, j = self._locate(i)
        name = self.readers[shard].raw_data.basename
        return (self.dir / name if self.mirror is None else f"{self.mirror.url}/{self.dir.name}/{name}"), j

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
        self.chunk_tokens = manifest["chunk_tokens"]  # every chunk but the last holds exactly this many
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
        return bad_token_error(self.chunks, (start + at) // self.chunk_tokens, int(tokens[at]), self.limit)

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
            k, lo = divmod(start + filled, self.chunk_tokens)
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
        bounds = {0} | {-(-e * stream.chunk_tokens // block_size) for e in stream.chunks.ends[:-1]}
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


@dataclass
class Source:
    """One prepared directory in the training mixture (weight 0: validation only)."""

    name: str
    path: str
    manifest: dict
    weight: float = 1.0


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
        """`stages`: the mixture over the run (mixture.plan); None: the sources' weights throughout."""
        train = [s for s in sources if s.weight > 0]
        self.names = [s.name for s in train]
        streams = [TokenStream(s.path, "train", s.manifest) for s in train]
        # a source of preference pairs is shuffled pair by pair: its units are two blocks (chosen, rejected)
        self.blocks = [
            PackedBlocks(t, block_size * (2 if t.paired else 1), shuffle, seed + 1000 * i, s.name, window)
            for i, (s, t) in enumerate(zip(train, streams, strict=True))
        ]
        # the largest id each source may hold: a larger one is damage, which the model would turn into an
        # IndexError (on a GPU a device-side assert while the other ranks hang)
        self.limits = np.array([b.stream.limit for b in self.blocks], dtype=np.int64)
        self.smallest_limit = int(self.limits.min())
        self.mixture = StagedMixture(stages or [Stage(0, tuple(s.weight for s in train))])
        self.block_size, self.document_mask = block_size, document_mask
        self.masked = [b.stream.masked for b in self.blocks]
        # preference pairs with the reference model's values (prepare-reference): (offsets, values) per source
        self.references = [load_values(s.path, "train") if t.paired else None
                           for s, t in zip(train, streams, strict=True)]  # fmt: skip
        self.with_reference = any(r is not None for r in self.references)
        self.labelled = document_mask or any(self.masked)  # labels differ from the ids

    def __len__(self) -> int:  # endless: epochs follow each other
        raise TypeError("MixedBlocks is endless")

    def offset(self, i: int, k: int) -> int:
        """Stream offset of block k of training source i (of a source of pairs: member k % 2 of pair k // 2)."""
        blocks = self.blocks[i]
        if blocks.stream.paired:
            return blocks.position(k // 2) + (k % 2) * self.block_size
        return blocks.position(k)

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        return {k: torch.as_tensor(v[0]) for k, v in self.__getitems__([g]).items()}

    def __getitems__(self, gs: list[int]) -> dict[str, np.ndarray]:
        """A whole micro batch at once (the DataLoader calls this): rows filled in place, one array per key.

        numpy, not torch: from a loader worker, arrays travel pickled through the pipe, ~7x faster here than
        tensors, which torch moves through a new shared-memory segment each (TrainLoader converts them)."""
        n, size = len(gs), self.block_size
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
            at = self.offset(i, k)
            starts = blocks.stream.read_into(at, ids[row], self.document_mask, mask)
            if self.with_reference and self.references[i] is not None:
                offsets, values = self.references[i]
                lo, hi = np.searchsorted(offsets, [at, at + size])
                reference[row, : hi - lo] = values[lo:hi]
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
                raise self.blocks[i].stream.bad_token(self.offset(i, k), ids[bad[0]])
        batch = {"input_ids": ids, "source": source, "labels": labels if self.labelled else ids}
        if self.with_reference:
            batch["reference"] = reference
        return batch | ({"position_ids": positions} if self.document_mask else {})


def bad_token_error(store: ChunkStore, chunk: int, value: int, limit: int) -> DataError:
    """A token id above the manifest's `max_token_id` in chunk `chunk` of `store`: the shard is damaged."""
    path, j = store.shard_of(chunk)
    return DataError(
        f"shard file '{path}' holds token id {value} in chunk {chunk} (its sample {j}), above {limit}, the largest "
        "id its manifest allows, so it was damaged after prepare; prepare the data again."
    )


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


def document_positions(length: int, starts: np.ndarray) -> np.ndarray:
    """Positions that restart at 0 at every document start (a block's first token starts one too)."""
    begin = np.zeros(length, dtype=np.int64)
    begin[starts] = starts
    return np.arange(length, dtype=np.int64) - np.maximum.accumulate(begin)


class RankShareSampler(Sampler[int]):
    """Global block indices of this rank, from `start`: its contiguous share of each step's blocks."""

    def __init__(self, rank: int, world: int, blocks_per_rank_step: int, start: int = 0):
        self.rank, self.world, self.per_rank, self.start = rank, world, blocks_per_rank_step, start

    def __iter__(self) -> Iterator[int]:
        base = self.start + self.rank * self.per_rank
        while True:
            yield from range(base, base + self.per_rank)
            base += self.world * self.per_rank


# Worker processes of the loaders made here. They ignore SIGTERM (see preemption.py), so multiprocessing's own exit
# handler, which terminates and joins them, would wait forever for one still running: any left at exit are killed
# first (atexit runs the later registration first, and multiprocessing.util is imported above). Tracked as
# processes, not iterators: an iterator caught in a reference cycle (a traceback) can lose its queues to the
# garbage collector before its own cleanup runs, and then its workers never hear that they should stop.
_WORKERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _kill_leftover_workers() -> None:
    for worker in list(_WORKERS):
        if worker.is_alive():
            worker.kill()
            worker.join()


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
    ):
        """`position`: the data's order settings and where to start (order.DataPosition, which this loader moves
        on at each step_done); None: at the start of the order `block_size`, `shuffle_window` (tokens per window
        of the two-level shuffle; 0: a global shuffle) and `stages` (data.stages) make. `prefetch_steps`: how many
        steps ahead the shards of remote sources are fetched into the node's cache; `pin_memory`: batches in
        page-locked memory (for a GPU)."""
        if position is None:
            from dist_clm.data.order import DataPosition

            position = DataPosition(sources, block_size=block_size, global_batch=world * micro_batch * grad_accum,
                                    shuffle_window=shuffle_window, stages=stages)  # fmt: skip
        if world * micro_batch * grad_accum != position.global_batch:
            raise ValueError(f"{world} x {micro_batch} x {grad_accum} blocks per step, not {position.global_batch}")
        self.position, self.names, self.stages = position, position.names, position.stages
        self.global_blocks_per_step = position.global_batch
        self.block_size = block_size = position.block_size
        shuffle_window = position.shuffle_window
        self.start = position.blocks_consumed
        window = max(1, shuffle_window // block_size) if shuffle_window else 0
        self.blocks = MixedBlocks(sources, block_size, shuffle, seed, document_mask, window, self.stages)
        self.prefetcher = None
        if prefetch_steps and any(is_remote(s.path) for s in sources if s.weight > 0):
            self.prefetcher = Prefetcher(
                MixedBlocks(sources, block_size, shuffle, seed, document_mask, window, self.stages),
                rank=rank, world=world, per_rank=micro_batch * grad_accum, start=self.start, steps=prefetch_steps,
            )  # fmt: skip
        self.loader = DataLoader(
            _ErrorsAsData(self.blocks),
            batch_size=micro_batch,
            sampler=RankShareSampler(rank, world, micro_batch * grad_accum, self.start),
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            collate_fn=_as_is,
            worker_init_fn=ignore_stop_signals,  # a signal to the process group is for the main process
            # its own generator for the workers' base seed: making an iterator leaves torch's global one alone,
            # so a resumed run's random streams continue whenever the loader is made
            generator=torch.Generator().manual_seed(seed),
        )
        self.steps_done = 0  # optimizer steps taken since `start`
        self.pin_memory = pin_memory

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        sources: list[Source],
        position: DataPosition | None = None,
        *,
        rank: int,
        world: int,
        grad_accum: int,
        pin_memory: bool = False,
    ) -> TrainLoader:
        """The loader a run's config means (data.* and the batch and seed of train.*), for this rank, from
        `position` (None: the start)."""
        d, t = cfg.data, cfg.train
        return cls(
            sources, position, block_size=d.block_size, shuffle_window=d.shuffle_window, stages=d.stages,
            micro_batch=t.micro_batch_size, grad_accum=grad_accum, rank=rank, world=world,
            shuffle=d.shuffle, seed=t.seed, num_workers=d.num_workers, prefetch_steps=d.prefetch_steps,
            document_mask=d.document_mask, pin_memory=pin_memory,
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
        """Stop the loader's worker processes now (they ignore SIGTERM, see preemption.py, so they must be told)."""
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
