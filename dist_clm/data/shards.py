"""A split's shard files, ready to read: local, or fetched from object storage into the node's cache, and checked
against what prepare recorded in index.json (format.py) in one place: every file's size when the split is
opened, its hash once per process (a compressed file's before it is decompressed; a fetched file's as it
arrives), its decompression into the raw file the readers map (atomically, so concurrent runs or a kill never
leave a truncated raw shard). Damage is a DataError naming the file.

A shard is handed out open (`open`): a file in the node's cache comes with its lease (remote.Lease), so the
cache keeps it until the reader lets go, and what is checked or mapped is read through the descriptor, never
by its path again (a path may name another file, or none, a moment later).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from dist_clm.data.format import SHARD_HASH, damaged, read_index
from dist_clm.data.remote import Lease
from dist_clm.errors import DataError, UserError

if TYPE_CHECKING:
    from dist_clm.data.remote import Mirror

# shard files whose hash this process has checked: (device, inode, size, mtime); a changed file is new, and a
# file renamed into place (a download, a decompression) is the one checked before
_VERIFIED: set[tuple] = set()


def _stat(file: Path | BinaryIO) -> os.stat_result:
    """An open file's status through its descriptor; a path's otherwise."""
    return os.fstat(file.fileno()) if hasattr(file, "fileno") else Path(file).stat()


def _name(file: Path | BinaryIO) -> Path | str:
    """A path, or an open file's, for messages."""
    return file if isinstance(file, Path) else file.name


def _verified_key(file: Path | BinaryIO) -> tuple:
    """A file as _VERIFIED knows it: what changes when it is rewritten."""
    st = _stat(file)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ShardFiles:
    """The shard files of one split (`readers`: streaming's MDS reader of each, from index.json)."""

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
                self._ensure_raw(reader).release()

    @staticmethod
    def _check_size(file: Path | BinaryIO, info, label: str | Path | None = None) -> None:
        """`file` (a path, or an open file) has the size index.json records."""
        label = label or _name(file)
        try:
            size = _stat(file).st_size
        except FileNotFoundError:
            raise DataError(f"shard file '{label}' is missing; prepare the data again.") from None
        if size != info.bytes:
            raise damaged(label, f"has {size:,} bytes where index.json says {info.bytes:,}")

    def label(self, info) -> Path | str:
        """A shard file as messages name it: its path, or its URL."""
        return self.dir / info.basename if self.mirror is None else f"{self.mirror.url}/{self.dir.name}/{info.basename}"

    def _fetched(self, info, patient: bool = True) -> Lease:
        """A remote shard file in the node's cache, leased: downloaded if missing, its size and hash checked
        as it arrives (the renamed file, the same inode, is not hashed again when mapped)."""

        def check(part: Path) -> None:
            self._check_size(part, info, self.label(info))
            mapped = np.memmap(part, dtype=np.uint8, mode="r")
            self.check_hash(part, info, mapped, force=True, label=self.label(info))

        return self.mirror.shard(self.dir.name, info.basename, info.bytes, check, patient)

    def open(self, shard: int, patient: bool = True) -> Lease:
        """Shard `shard`'s raw file, open for reading, its size checked now (it may have changed since the split
        was opened): in the directory, or fetched into the node's cache (and decompressed there) and held there
        until the lease is released. Not `patient` (a prefetch): remote.CacheHeld where the cache is full of
        shards open for reading."""
        reader = self.readers[shard]
        if self.mirror is None:
            path = self.dir / reader.raw_data.basename
            try:
                lease = Lease(open(path, "rb"), path)  # noqa: SIM115 (the caller releases it)
            except FileNotFoundError:
                raise DataError(f"shard file '{path}' is missing; prepare the data again.") from None
        elif reader.zip_data is None:
            lease = self._fetched(reader.raw_data, patient)
        else:
            lease = Lease.take(self.dir / reader.raw_data.basename)
            if lease is None:  # (decompressed anew from the compressed file, leased while it is read)
                with self._fetched(reader.zip_data, patient) as packed:
                    lease = self._ensure_raw(reader, packed.file)
        try:
            self._check_size(lease.file, reader.raw_data, self.label(reader.raw_data))
        except DataError:
            lease.release()
            raise
        return lease

    @staticmethod
    def check_hash(
        file: Path | BinaryIO, info, data, force: bool = False, label: str | Path | None = None
    ) -> str | None:
        """Check `data` (the bytes of `file`, a path or an open file, or a memory map of it) against index.json's
        hash, once per process unless `force`; returns the algorithm used, None if index.json has none (data
        prepared without)."""
        from streaming.base.hashing import get_hash, is_hash

        known = sorted(a for a in info.hashes if is_hash(a))
        if not known:
            return None
        algo = SHARD_HASH if SHARD_HASH in known else known[0]
        key = _verified_key(file)
        if force or key not in _VERIFIED:
            if get_hash(algo, data) != info.hashes[algo]:
                raise damaged(label or _name(file), f"does not match its {algo} hash in index.json")
            _VERIFIED.add(key)
        return algo

    def _ensure_raw(self, reader, packed: BinaryIO | None = None) -> Lease:
        """The reader reads raw shard files; write one from its compressed file (`packed`, open, or the one in
        the directory) where missing (checked against index.json's size and hash first; atomically, so
        concurrent runs or a kill never leave a truncated raw shard): its lease, taken before it is in place."""
        from streaming.base.compression import decompress

        raw, label = self.dir / reader.raw_data.basename, self.label(reader.zip_data)
        if packed is None:
            packed = self.dir / reader.zip_data.basename
        self._check_size(packed, reader.zip_data, label)
        packed_bytes = packed.read_bytes() if isinstance(packed, Path) else packed.read()
        self.check_hash(packed, reader.zip_data, packed_bytes, force=True, label=label)
        try:
            data = decompress(reader.compression, packed_bytes)
        except Exception:  # whatever the decompressor raises on bad input
            raise damaged(label, f"does not decompress with {reader.compression}") from None
        if len(data) != reader.raw_data.bytes:
            raise damaged(label, f"decompresses to {len(data):,} bytes where index.json says {reader.raw_data.bytes:,}")
        tmp = raw.with_name(f".{raw.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(data)
            lease = Lease.take(tmp, raw)
            os.replace(tmp, raw)
            return lease
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise UserError(
                f"no space left on device while decompressing '{label}' to '{raw}'; free space there or prepare "
                "the data again without --compression."
            ) from None

    def ensure_local(self, shard: int) -> bool:
        """Remote data: have shard `shard`'s file in the node's cache now (True if it was fetched now, not
        already there), without waiting for readers to let go of the cache (a prefetch: remote.CacheHeld).
        Local data: nothing to do."""
        if self.mirror is None:
            return False
        present = (self.dir / self.readers[shard].raw_data.basename).is_file()
        self.open(shard, patient=False).release()
        return not present

    def verify_shard(self, shard: int) -> str | None:
        """Hash shard `shard`'s files now (the compressed one too, if it is there); the algorithm, or None if
        index.json records no hash (only sizes are checked then)."""
        reader = self.readers[shard]
        algo = None
        with self.open(shard) as raw:  # (fetched and checked, the compressed file too)
            if reader.zip_data is not None:
                try:
                    packed = open(self.dir / reader.zip_data.basename, "rb")  # noqa: SIM115
                except FileNotFoundError:  # (it may have been deleted to save space once the raw file was written)
                    packed = None
                if packed is not None:
                    with packed:
                        self._check_size(packed, reader.zip_data)
                        algo = self.check_hash(packed, reader.zip_data, packed.read(), force=True)
            mapped = np.memmap(raw.file, dtype=np.uint8, mode="r")
            return self.check_hash(raw.file, reader.raw_data, mapped, force=True, label=raw.path) or algo
