"""A split's shard files, ready to read: local, or fetched from object storage into the node's cache, and checked
against what prepare recorded in index.json (format.py) in one place: every file's size when the split is
opened, its hash once per process (a compressed file's before it is decompressed; a fetched file's as it
arrives), its decompression into the raw file the readers map (atomically, so concurrent runs or a kill never
leave a truncated raw shard). Damage is a DataError naming the file.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dist_clm.data.format import SHARD_HASH, damaged, read_index
from dist_clm.errors import DataError, UserError

if TYPE_CHECKING:
    from dist_clm.data.remote import Mirror

# shard files whose hash this process has checked: (path, device, inode, size, mtime); a changed file is new
_VERIFIED: set[tuple] = set()


def _verified_key(path: Path) -> tuple:
    """A file as _VERIFIED knows it: its path and what changes when it is rewritten."""
    st = path.stat()
    return (str(path.absolute()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


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
                self._ensure_raw(reader)

    @staticmethod
    def _check_size(path: Path, info, label: str | None = None) -> None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise DataError(f"shard file '{label or path}' is missing; prepare the data again.") from None
        if size != info.bytes:
            raise damaged(label or path, f"has {size:,} bytes where index.json says {info.bytes:,}")

    def _fetched(self, info) -> Path:
        """A remote shard file in the node's cache: downloaded if missing, its size and hash checked first."""
        label = f"{self.mirror.url}/{self.dir.name}/{info.basename}"

        checked: list[Path] = []

        def check(part: Path) -> None:
            self._check_size(part, info, label)
            self.check_hash(part, info, np.memmap(part, dtype=np.uint8, mode="r"), force=True, label=label)
            checked.append(part)

        path = self.mirror.shard(self.dir.name, info.basename, info.bytes, check)
        if checked:  # hashed as it arrived: the renamed file (same inode) is not hashed again when mapped
            _VERIFIED.add(_verified_key(path))
        return path

    def raw_file(self, reader) -> Path:
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
    def check_hash(path: Path, info, data, force: bool = False, label: str | None = None) -> str | None:
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
                raise damaged(label or path, f"does not match its {algo} hash in index.json")
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
        self.check_hash(packed, reader.zip_data, packed_bytes, force=True)
        try:
            data = decompress(reader.compression, packed_bytes)
        except Exception:  # whatever the decompressor raises on bad input
            raise damaged(packed, f"does not decompress with {reader.compression}") from None
        if len(data) != reader.raw_data.bytes:
            raise damaged(
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

    def raw(self, shard: int) -> Path:
        """Shard `shard`'s raw file, ready to map: fetched and decompressed if need be, its size checked now."""
        reader = self.readers[shard]
        path = self.raw_file(reader)
        self._check_size(path, reader.raw_data)
        return path

    def ensure_local(self, shard: int) -> bool:
        """Remote data: have shard `shard`'s file in the node's cache now (True if it was fetched now, not
        already there). Local data: nothing to do."""
        if self.mirror is None:
            return False
        reader = self.readers[shard]
        present = (self.dir / reader.raw_data.basename).is_file()
        self.raw_file(reader)
        return not present

    def verify_shard(self, shard: int) -> str | None:
        """Hash shard `shard`'s files now (the compressed one too, if it is there); the algorithm, or None if
        index.json records no hash (only sizes are checked then)."""
        reader = self.readers[shard]
        algo = None
        if self.mirror is not None:
            self.raw_file(reader)  # (fetched and checked, the compressed file too)
        if reader.zip_data is not None:
            packed = self.dir / reader.zip_data.basename
            if packed.is_file():  # (it may have been deleted to save space once the raw file was written)
                self._check_size(packed, reader.zip_data)
                algo = self.check_hash(packed, reader.zip_data, packed.read_bytes(), force=True)
        raw = self.dir / reader.raw_data.basename
        self._check_size(raw, reader.raw_data)
        return self.check_hash(raw, reader.raw_data, np.memmap(raw, dtype=np.uint8, mode="r"), force=True) or algo
