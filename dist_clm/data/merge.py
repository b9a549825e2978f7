"""`dist-clm prepare --merge OUT`: the finished parts of a prepare in parts (parts.py) joined into one prepared
dataset that every reader takes as it takes a one-machine prepare: OUT/train/index.json and OUT/val/index.json
list every part's shards in part order (a part's shard `shard.00000.mds` of train/part-00003/ is listed as
`part-00003/shard.00000.mds`: the rule streaming's own `merge_index` follows, written here because the parts'
indexes are read and checked anyway and the merged one must be durable before the manifest), OUT/tokenizer is
the parts' tokenizer, and OUT/manifest.json, written last, sums the parts' figures.

The merge refuses, in one sentence, unless every part is complete (its marker) and consistent (the same job
settings and tokenizer, shard files as the marker lists them); of two merges at once one wins and the other says
so (a local OUT: a lock; a bucket: a claim object written only if absent).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from contextlib import contextmanager

from dist_clm.data import parts
from dist_clm.data.format import FORMAT, MANIFEST, SPLITS, plain_name
from dist_clm.data.store import LocalStore, Store, store
from dist_clm.errors import UserError


def merge(out: str) -> dict:
    """Merge the parts under `out`; returns the manifest (also written, last)."""
    st = store(out)
    start = time.time()
    with _one_merge(st):
        if st.read_json(MANIFEST) is not None:
            raise UserError(f"'{st.url}' is already merged (its {MANIFEST} is there); nothing to do.")
        job = st.read_json("parts/job.json")
        if job is None:
            raise UserError(f"'{st.url}' holds no prepare in parts (no parts/job.json); run `dist-clm prepare ... "
                            f"--out {st.url} --tasks N --task-index I` for every I first.")  # fmt: skip
        n = job["tasks"]
        markers = st.map(lambda i: st.read_json(parts.marker("tokenize", i)), range(n))
        missing = [i for i, m in enumerate(markers) if m is None]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            raise UserError(f"{len(missing)} of the {n} parts of '{st.url}' are not complete (part {shown}); run their "
                            "tasks (again: complete parts are skipped), then merge.")  # fmt: skip
        _check_consistent(st, job, markers)
        for split in SPLITS:
            st.write_bytes(f"{split}/index.json", json.dumps(_merged_index(st, split, markers)).encode())
        first = parts.part_name(0)
        for f in markers[0]["tokenizer"]["files"]:
            st.write_bytes(f"tokenizer/{f}", st.read_bytes(f"parts/{first}/tokenizer/{f}"))
        manifest = _manifest(job, markers, time.time() - start)
        from dist_clm.data.prepare import SplitStats, _check_splits

        what = "conversation" if "fine_tuning" in manifest else "document"
        _check_splits({s: SplitStats(manifest["splits"][s]["documents"]) for s in SPLITS},
                      job["settings"]["val_fraction"], what)  # fmt: skip
        st.write_json(MANIFEST, manifest)  # last: the dataset is complete
    return manifest


@contextmanager
def _one_merge(st: Store):
    if isinstance(st, LocalStore):
        from dist_clm.fsutil import held

        if not (st.root / "parts").is_dir():
            raise UserError(f"'{st.url}' holds no prepare in parts (no parts/); run its tasks first.")
        with held(st.root / "parts" / "merge.lock", lambda holder: f"another merge of '{st.url}' is running "
                  f"({holder}); wait for it: the dataset is complete when it ends."):  # fmt: skip
            yield
        return
    from dist_clm.data import bucket

    claim = st.where("parts/merge.claim")
    b, key = bucket.split_url(claim)
    try:  # S3 conditional write: only one writer of an absent object succeeds
        bucket.client().put_object(Bucket=b, Key=key, Body=f"{socket.gethostname()} {os.getpid()}".encode(),
                                   IfNoneMatch="*")  # fmt: skip
    except Exception as e:  # noqa: BLE001
        code = getattr(e, "response", {}).get("Error", {}).get("Code") if hasattr(e, "response") else None
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            raise UserError(f"another merge of '{st.url}' is running or was interrupted (parts/merge.claim is "
                            f"there); wait for it, or remove {claim} if it died.") from None  # fmt: skip
        raise
    try:
        yield
    finally:
        st.remove("parts/merge.claim")


def _check_consistent(st: Store, job: dict, markers: list[dict]) -> None:
    first = markers[0]
    for i, m in enumerate(markers):
        if m.get("settings") != job["settings"] or m.get("tasks") != job["tasks"]:
            raise UserError(f"part {i} of '{st.url}' was written with other settings than the job's (parts/job.json); "
                            f"remove {st.where(parts.marker('tokenize', i))} and run its task again.")  # fmt: skip
        for key, what in (("tokenizer", "tokenizer"), ("token_dtype", "token type"), ("chunk_tokens", "chunk size")):
            ours = m[key]["fingerprint"] if key == "tokenizer" else m[key]
            theirs = first[key]["fingerprint"] if key == "tokenizer" else first[key]
            if ours != theirs:
                raise UserError(f"part {i} of '{st.url}' was written with another {what} than part 0; give every task "
                                f"the same --tokenizer, remove {st.where(parts.marker('tokenize', i))} and run its "
                                "task again.")  # fmt: skip


def _merged_index(st: Store, split: str, markers: list[dict]) -> dict:
    """One index.json: every part's shard entries in part order, their names prefixed with the part's folder."""
    per_part = st.map(lambda i: _part_entries(st, split, i, markers[i]), range(len(markers)))
    return {"version": 2, "shards": [e for entries in per_part for e in entries]}


def _part_entries(st: Store, split: str, i: int, m: dict) -> list[dict]:
    """Part i's shard entries of `split`, checked against its marker and the files there, names prefixed."""
    from dist_clm.data.format import read_index_bytes

    name = parts.part_name(i)
    where = st.where(f"{split}/{name}/index.json")
    try:
        entries = read_index_bytes(st.read_bytes(f"{split}/{name}/index.json"), where)
    except FileNotFoundError:
        raise UserError(f"'{where}' is missing though part {i} is marked complete; remove "
                        f"{st.where(parts.marker('tokenize', i))} and run its task again.") from None  # fmt: skip
    listed = {e[k]["basename"]: e[k]["bytes"] for e in entries for k in ("raw_data", "zip_data") if e.get(k)}
    present = _sizes(st, f"{split}/{name}")
    for f, size in listed.items():
        if m["shards"][split].get(f) != size or present.get(f) != size:
            redo = st.where(parts.marker("tokenize", i))
            raise UserError(f"shard file '{st.where(f'{split}/{name}/{f}')}' is missing or not as part {i} wrote "
                            f"it; remove {redo} and run its task again.")  # fmt: skip
    for e in entries:
        for k in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
            if e.get(k):
                if not plain_name(e[k]["basename"]):
                    raise UserError(f"'{where}' names {e[k]['basename']!r}, not a shard file of its folder; remove "
                                    f"{st.where(parts.marker('tokenize', i))} and run its task again.")  # fmt: skip
                e[k]["basename"] = f"{name}/{e[k]['basename']}"
    return entries


def _sizes(st: Store, folder: str) -> dict[str, int]:
    if isinstance(st, LocalStore):
        d = st.root / folder
        return {p.name: p.stat().st_size for p in d.iterdir() if p.is_file()} if d.is_dir() else {}
    from dist_clm.data import bucket

    prefix = st.where(folder) + "/"
    return {u.removeprefix(prefix): size for u, size in bucket.list_objects(prefix)}


def _manifest(job: dict, markers: list[dict], merge_seconds: float) -> dict:
    first = markers[0]
    splits = {}
    for s in SPLITS:
        total, histogram = Counter(), Counter()
        for m in markers:
            for k, v in m["splits"][s].items():
                if k == "length_histogram":
                    histogram.update({(lo, hi): c for lo, hi, c in v})
                elif isinstance(v, int | float):
                    total[k] += v
        total["parts"] = [[m["splits"][s]["chunks"], m["splits"][s]["tokens"]] for m in markers]  # (stream.py)
        splits[s] = dict(total) | ({"length_histogram": [[lo, hi, c] for (lo, hi), c in sorted(histogram.items())]}
                                   if "length_histogram" in first["splits"][s] else {})  # fmt: skip
    settings = job["settings"]
    manifest = {
        "format": FORMAT,
        "dist_clm_version": first["dist_clm_version"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer": first["tokenizer"],
        "token_dtype": first["token_dtype"],
        "max_token_id": max(m["max_token_id"] for m in markers),
        "chunk_tokens": first["chunk_tokens"],
        "val_fraction": first["val_fraction"],
        "eval_only": first["val_fraction"] >= 1,
        "splits": splits,
        "duplicates_removed": first.get("duplicates_removed") if settings["dedup"] else None,
        "undecodable_documents": sum(m.get("undecodable_documents", 0) for m in markers),
        "sources": {**job.get("sources", {}), "listing": job["inputs"], **first.get("source_fields", {})}
        | (
            {"dataset": settings["dataset"], "config": settings["dataset_config"], "split": settings["split"]}
            if settings["dataset"]
            else {}
        ),  # fmt: skip
        "shards": {"compression": settings["compression"], "bytes_limit": settings["shard_bytes"]},
        "seconds": round(sum(m["seconds"] for m in markers), 2),
        "parts": {
            "tasks": job["tasks"],
            "slowest_part_seconds": max(m["seconds"] for m in markers),
            "merge_seconds": round(merge_seconds, 2),
        },  # fmt: skip
    }
    if "fine_tuning" in first:
        manifest["fine_tuning"] = first["fine_tuning"]
    else:
        manifest["empty_documents_skipped"] = sum(m.get("empty_documents_skipped", 0) for m in markers)
        manifest["undecodable_examples"] = [e for m in markers for e in m.get("undecodable_examples", [])][:5]
    return manifest
