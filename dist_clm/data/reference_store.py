"""Where DPO's reference values live beside prepared preference data, local or in object storage.

    DATA/reference/reference.json          the record: the model, its weights fingerprint, per split the array
                                           file's name, size and hash (prepare's shard hash: xxh3_64),
                                           and its conversation count
    DATA/reference/{split}-{hash}.npy      (2, n) float64: each learned conversation's stream offset and value

The arrays are named by their content hash and never overwritten, and the record is written last (locally
fsynced and renamed over the old one; in a bucket, one PUT, which replaces an object whole). So a record always
names arrays that exist and hold what it says, whatever moment a `prepare-reference` is killed at, and a rerun
with another model leaves the old record valid until the new one replaces it. Each array is checked against
its size and hash when a run loads it (bit rot, a truncated copy: one sentence). Locally one writer at a time
(a lock; a second is refused) and arrays no record names are removed after the record is written; in a bucket
the old arrays stay (a few bytes per pair).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dist_clm.data.remote import is_remote, mirror, upload_last
from dist_clm.errors import DataError, UserError
from dist_clm.fsutil import atomic_write_text, fsync_dir, fsync_file

DIR, RECORD = "reference", "reference.json"


def _digest(path: Path, algo: str) -> str:
    """streaming's hash of a file, the one prepare records for shards (the arrays are small: read whole)."""
    from streaming.base.hashing import get_hash

    return get_hash(algo, path.read_bytes())


def read_record(data: str | Path) -> dict | None:
    """The reference record of a prepared directory or URL, or None where `prepare-reference` has not run."""
    if is_remote(data):
        try:
            path = mirror(str(data)).file(f"{DIR}/{RECORD}", fresh=True)
        except FileNotFoundError:
            return None
    else:
        path = Path(data) / DIR / RECORD
        if not path.is_file():
            return None
    try:
        record = json.loads(path.read_text())
        record["splits"]  # noqa: B018 (a record without it is not one this version wrote)
    except (ValueError, KeyError, TypeError):
        raise DataError(
            f"'{data}/{DIR}/{RECORD}' is not a readable reference record; run `dist-clm prepare-reference` again."
        ) from None
    return record


def load_values(data: str | Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(offsets, values) of one split's learned conversations, checked against the record; None without one."""
    record = read_record(data)
    if record is None:
        return None
    entry = record["splits"][split]
    name = entry["file"]

    def check(path: Path) -> None:
        size = path.stat().st_size
        if size != entry["bytes"] or _digest(path, entry["hash"]) != entry["digest"]:
            raise DataError(
                f"the reference values '{data}/{DIR}/{name}' do not match their size and hash in {RECORD} (damaged "
                "or cut short); run `dist-clm prepare-reference` again."
            )

    if is_remote(data):
        try:
            path = mirror(str(data)).file(f"{DIR}/{name}", check=check)
        except FileNotFoundError:
            raise DataError(f"'{data}/{DIR}/{name}' named by {RECORD} is missing; run `dist-clm prepare-reference` "
                            "again.") from None  # fmt: skip
    else:
        path = Path(data) / DIR / name
        if not path.is_file():
            raise DataError(f"'{path}' named by {RECORD} is missing; run `dist-clm prepare-reference` again.")
    check(path)
    offsets, values = np.load(path)
    return offsets.astype(np.int64), values


def values_in(reference: tuple[np.ndarray, np.ndarray], at: int, size: int) -> np.ndarray:
    """The values of the learned conversations that start in tokens [at, at + size) of the stream, in order
    (`reference`: load_values' (offsets, values))."""
    offsets, values = reference
    lo, hi = np.searchsorted(offsets, [at, at + size])
    return values[lo:hi]


@contextmanager
def claim(data: str | Path) -> Iterator[None]:
    """Hold a local prepared directory's reference values for one writer while the block runs (a second is
    refused with one sentence); `write` runs inside it. A bucket has no lock: the last record uploaded wins, and
    every record names its own arrays."""
    if is_remote(data):
        yield
        return
    where = Path(data) / DIR
    where.mkdir(exist_ok=True)
    with open(where / ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another prepare-reference is writing '{where}'; wait for it or stop it first.") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write(data: str | Path, arrays: dict[str, np.ndarray], record: dict) -> dict:
    """Store `arrays` (split -> (2, n) array) and `record` with the data: the arrays, then the record (inside
    `claim(data)`); returns the record written."""
    if is_remote(data):  # staged here, then uploaded: the arrays, the record last
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / DIR
            staged.mkdir()
            record = {**record, "splits": {split: _save(staged, split, a) for split, a in arrays.items()}}
            (staged / RECORD).write_text(json.dumps(record, indent=2))
            names = [f"{DIR}/{s['file']}" for s in record["splits"].values()]
            upload_last(Path(tmp), str(data), names, f"{DIR}/{RECORD}", rerun="run the same prepare-reference again")
        return record
    where = Path(data) / DIR
    record = {**record, "splits": {split: _save(where, split, a) for split, a in arrays.items()}}
    fsync_dir(where)
    atomic_write_text(where / RECORD, json.dumps(record, indent=2))
    named = {s["file"] for s in record["splits"].values()}
    for old in [*where.glob("*.npy"), *where.glob(".*.tmp-*")]:  # older values; a killed writer's copies
        if old.name not in named:
            old.unlink()
    fsync_dir(where)
    return record


def _save(where: Path, split: str, array: np.ndarray) -> dict:
    """One split's array, fsynced and renamed to a name holding its hash; its entry in the record."""
    from dist_clm.data.format import shard_hash

    part = where / f".{split}.npy.tmp-{os.getpid()}"
    with open(part, "wb") as f:
        np.save(f, array)
    fsync_file(part)
    algo = shard_hash()
    digest = _digest(part, algo)
    name = f"{split}-{digest}.npy"
    size = part.stat().st_size
    os.replace(part, where / name)  # (a file of that name already there holds these very bytes)
    return {"file": name, "bytes": size, "hash": algo, "digest": digest, "conversations": int(array.shape[1])}
