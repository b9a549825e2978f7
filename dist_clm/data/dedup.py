"""Exact deduplication across the parts of a prepare, by a hash-partitioned exchange (no task ever holds more
than its share of the hashes):

1. hash (task I): the 16-byte hash of each of its records (the one that picks the split: _encode.digest) and the
   record's number in the task, written to parts/hash-I.bin in N sections, section J holding the hashes with
   `hash mod N == J`.
2. dedup (task J): section J of every hash-I.bin. A record whose hash was already seen earlier, in an earlier
   part or earlier in the same part, is a duplicate: the first occurrence in corpus order is kept (parts are
   cut from the corpus in order, so this keeps what one task deduplicating alone keeps). Written to
   parts/dedup-J.bin in N sections, section I holding the record numbers of part I to drop.
3. tokenize (task I): section I of every dedup-J.bin is the set of its records to leave out.
Each stage's marker (its .json, written after its .bin) holds the byte offsets of the sections.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from dist_clm.data import _encode, parts
from dist_clm.data.store import Store
from dist_clm.errors import UserError

_HASHED = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("record", "<u8")])


def record_digest(record: dict, fmt: str, text_column: str) -> bytes | None:
    """The hash prepare gives a record (None: an empty text document, which prepare skips)."""
    if fmt == "text":
        from dist_clm.data.sources import as_text

        text = as_text(record[text_column])
        return _encode.digest(text) if text else None
    import json

    return _encode.digest(json.dumps(record, sort_keys=True, default=str))


def _sections(rows: np.ndarray, key: np.ndarray, n: int) -> tuple[bytes, list[int]]:
    """`rows` grouped by `key` (0..n-1), stably: the bytes and the offsets of each group (n + 1 of them)."""
    order = np.argsort(key, kind="stable")
    rows, key = rows[order], key[order]
    counts = np.bincount(key, minlength=n)
    offsets = np.concatenate([[0], np.cumsum(counts)]) * rows.dtype.itemsize
    return rows.tobytes(), offsets.tolist()


def hash_stage(st: Store, index: int, tasks: int, records: Iterator[tuple[str, dict]], fmt: str,
               text_column: str) -> dict:  # fmt: skip
    """Stage 1 of task `index`: its records' hashes, partitioned; returns its marker."""
    hashed = []
    for n, (_, record) in enumerate(records):
        d = record_digest(record, fmt, text_column)
        if d is not None:
            hashed.append((int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little"), n))
    rows = np.array(hashed, dtype=_HASHED)
    data, offsets = _sections(rows, (rows["lo"] % tasks).astype(np.int64), tasks)
    st.write_bytes(f"parts/hash-{index:05d}.bin", data)
    return {"records": len(rows), "offsets": offsets}


def _section(st: Store, name: str, marker: dict, j: int, dtype: np.dtype) -> np.ndarray:
    lo, hi = marker["offsets"][j], marker["offsets"][j + 1]
    return np.frombuffer(st.read_bytes(name, lo, hi) if hi > lo else b"", dtype=dtype)


def _marker(st: Store, stage: str, i: int, tasks: int) -> dict:
    m = st.read_json(parts.marker(stage, i))
    if m is None:
        before = "hash" if stage == "hash" else "dedup"
        raise UserError(f"part {i} of {tasks} has not finished its {before} stage ({parts.marker(stage, i)} is missing "
                        f"under '{st.url}'); with --dedup run --stage hash for every task, then --stage dedup for "
                        "every task, then --stage tokenize.")  # fmt: skip
    return m


def dedup_stage(st: Store, index: int, tasks: int, beat: parts.Heartbeat) -> dict:
    """Stage 2 of task `index`: the duplicates among the hashes in section `index`; returns its marker."""
    pieces = []
    for i in range(tasks):
        rows = _section(st, f"parts/hash-{i:05d}.bin", _marker(st, "hash", i, tasks), index, _HASHED)
        pieces.append((np.full(len(rows), i, np.int64), rows))
        beat.advance(records=len(rows))
    part = np.concatenate([p for p, _ in pieces]) if pieces else np.zeros(0, np.int64)
    rows = np.concatenate([r for _, r in pieces]) if pieces else np.zeros(0, _HASHED)
    order = np.lexsort((rows["record"], part, rows["lo"], rows["hi"]))  # by hash, then corpus order
    same = np.zeros(len(order), bool)
    if len(order) > 1:
        h, lo = rows["hi"][order], rows["lo"][order]
        same[1:] = (h[1:] == h[:-1]) & (lo[1:] == lo[:-1])
    dropped = order[same]
    drop = np.zeros(len(dropped), dtype=np.dtype([("part", "<i8"), ("record", "<u8")]))
    drop["part"], drop["record"] = part[dropped], rows["record"][dropped]
    data, offsets = _sections(drop, drop["part"], tasks)
    st.write_bytes(f"parts/dedup-{index:05d}.bin", data)
    return {"hashes": int(len(rows)), "duplicates": int(len(dropped)), "offsets": offsets}


def dropped_records(st: Store, index: int, tasks: int) -> tuple[set[int], int]:
    """Stage 3 of task `index`: (the numbers of its records to leave out, duplicates found in all parts)."""
    out, total = set(), 0
    for j in range(tasks):
        m = _marker(st, "dedup", j, tasks)
        total += m["duplicates"]
        rows = _section(st, f"parts/dedup-{j:05d}.bin", m, index, np.dtype([("part", "<i8"), ("record", "<u8")]))
        out.update(rows["record"].tolist())
    return out, total
