"""The on-disk contract of prepared data, which the writer (prepare.py) and every reader share:

    manifest.json   written last; its presence (under the final name) marks the directory complete. It names
                    the format, the tokenizer (its fingerprint), the token dtype, the chunk size, and each
                    split's documents, tokens and chunks (read_manifest; the largest token id: token_limit)
    tokenizer/      the tokenizer that produced the ids (save_pretrained)
    train/, val/    MDS shards (mosaicml-streaming's MDSWriter): one sample = one chunk of the split's token
                    stream (its `tokens`, its `doc_bounds`: where documents start inside it, then its length;
                    fine-tuning data also a `loss_mask`); index.json lists every shard file with its size and
                    its hash (`shard_hash()`, the one algorithm; read_index)

A reader takes a directory only if its manifest is there, and every name index.json gives must be a plain file
name inside its split (read_index checks that before any file is opened). Damage is a DataError naming the file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from dist_clm.errors import DataError, UserError

MANIFEST = "manifest.json"
FORMAT = "dist_clm.prepared/1"
SPLITS = ("train", "val")
# xxh3_64 hashes a 64 MB shard in a few ms (xxhash is a dependency of streaming); sha1 where it is missing
SHARD_HASH, FALLBACK_HASH = "xxh3_64", "sha1"
_MANIFEST_KEYS = ("tokenizer", "token_dtype", "chunk_tokens", "splits")


def shard_hash() -> str:
    """The hash algorithm prepare records for every shard file (one streaming supports here)."""
    from streaming.base.hashing import is_hash

    return SHARD_HASH if is_hash(SHARD_HASH) else FALLBACK_HASH


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a complete prepared directory (local, or remote: read in the node's mirror of it), or
    one clear sentence why it isn't one."""
    from dist_clm.data.remote import local_dir

    d = local_dir(data_dir)
    if not d.is_dir():
        raise UserError(f"data directory '{d}' does not exist; create it with `dist-clm prepare --out {d}`.")
    m = d / MANIFEST
    if not m.is_file():
        raise UserError(
            f"'{d}' has no {MANIFEST}, so it is not a complete prepared dataset; rerun `dist-clm prepare` into it."
        )
    try:
        manifest = json.loads(m.read_bytes())
    except (OSError, ValueError):  # not JSON, not UTF-8, unreadable
        manifest = None
    if not isinstance(manifest, dict):
        raise DataError(f"'{m}' is not a readable manifest (damaged or changed); prepare the data again.")
    if manifest.get("format") != FORMAT:
        raise UserError(f"'{d}' was written in format {manifest.get('format')!r}, this dist_clm reads {FORMAT!r}.")
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise DataError(f"'{m}' has no {', '.join(missing)} entry (damaged or changed); prepare the data again.")
    return manifest


def token_limit(manifest: dict) -> int:
    """The largest token id a prepared directory may hold (the largest prepare wrote)."""
    return int(manifest["max_token_id"])


def plain_name(name: object) -> bool:
    """Whether a file name is a plain name inside its directory (it is joined to it as a path)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\\0")
        and not os.path.isabs(name)
    )


def inside_name(name: object) -> bool:
    """Whether an index.json file name stays inside its split: a plain name, or a merged dataset's
    `part-NNNNN/NAME` (one folder of plain name, then a plain name)."""
    if not isinstance(name, str):
        return False
    *folder, file = name.split("/")
    if folder and not (len(folder) == 1 and re.fullmatch(r"part-\d{5}", folder[0])):
        return False
    return plain_name(file)


def read_index(split_dir: str | Path) -> list[dict]:
    """The shard entries of a split's index.json, checked to be MDS entries with plain file names (streaming
    joins its names to the directory unchecked; nothing here reads or writes a file before this check)."""
    d = Path(split_dir)
    index = d / "index.json"
    if not index.is_file():
        raise DataError(f"'{d}' has no index.json, so it holds no MDS shards; prepare the data again.")
    return read_index_bytes(index.read_bytes(), index)


def read_index_bytes(data: bytes, index: str | Path) -> list[dict]:
    """read_index of index.json's bytes (`index`: where they come from, for messages)."""
    d = Path(index).parent
    try:
        shards = json.loads(data)["shards"]
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
            if info is not None and not inside_name(info.get("basename")):
                raise DataError(
                    f"'{index}' names the shard file {info.get('basename')!r}, which is not a plain file name "
                    f"inside '{d}'; prepare the data again."
                )
    return shards


def _file_entry(info: object) -> bool:
    return isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("hashes"), dict)


def damaged(path: Path, what: str) -> DataError:
    return DataError(f"shard file '{path}' {what}, so it was damaged or changed after prepare; prepare the data again.")
