"""`dist-clm data inspect`: what a prepared directory holds, in figures and a few decoded documents, and with
`--verify` whether it is still what prepare wrote.

Neither reads or writes a shard file before every split's index.json has been checked to name only plain
files inside its split directory. `verify` raises a DataError (one sentence naming the file) at the first
problem; it returns only when every check of every split passed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dist_clm import console
from dist_clm.data.format import read_manifest, token_limit
from dist_clm.data.reference_store import load_values, read_record
from dist_clm.data.remote import local_dir, mirror_of


def inspect(data_dir: str | Path, samples: int = 3, tokens: int = 60) -> str:
    from dist_clm.data.format import read_index
    from dist_clm.data.stream import ChunkStore
    from dist_clm.data.tokenizer import load_tokenizer

    m = read_manifest(data_dir)
    d, mirror = local_dir(data_dir), mirror_of(data_dir)  # (remote data: this node's cached copy)
    for split in m["splits"]:
        read_index(d / split)  # names checked in every split, though only train is read here
    t = m["tokenizer"]
    lines = [
        f"{data_dir}: {m['format']}, written {m['created']} by dist_clm {m['dist_clm_version']}",
        f"tokenizer: fingerprint {t['fingerprint']}, vocabulary {t['vocab_size']}, eos {t['eos_id']}, "
        f"bos {t['bos_id']}; tokens stored as {m['token_dtype']}, {m['chunk_tokens']} per chunk",
        f"source: {m['sources']}",
        f"skipped: {m.get('empty_documents_skipped', 0)} empty, {m.get('duplicates_removed') or 0} duplicate, "
        f"{m.get('undecodable_documents', 0)} with undecodable bytes (kept)",
    ]
    tuned = m.get("fine_tuning")
    if tuned:
        lines.append(f"fine-tuning data: format {tuned['format']}, objective {tuned['objective']}, whole conversations "
                     f"packed into blocks of {tuned['block_size']} tokens")  # fmt: skip
        if tuned.get("pairs"):
            lines.append(_reference_line(data_dir))
    for split, s in m["splits"].items():
        if tuned:
            what = "pairs" if tuned.get("pairs") else "conversations"
            lines.append(f"{split}: {s['conversations']:,} {what} ({s['truncated']:,} truncated, "
                         f"{s['dropped']:,} dropped), {s['learned_tokens']:,} learned tokens, "
                         f"{s['padding_tokens']:,} padding tokens")  # fmt: skip
        lines.append(
            f"{split}: {s['documents']:,} documents, {s['tokens']:,} tokens, {console.count(s['chunks'], 'chunk')}, "
            f"{s['tokens'] / max(1, s['documents']):,.0f} tokens per document"
        )
        hist = s.get("length_histogram", [])
        if hist:
            peak = max(c for _, _, c in hist)
            for lo, hi, c in hist:
                lines.append(f"  {lo:>8,}-{hi:<8,} {c:>9,} {'#' * max(1, round(30 * c / peak))}")
    tok = load_tokenizer(d / "tokenizer")
    ds = ChunkStore(d / "train", mirror)
    shown = 0
    for i in range(len(ds)):
        chunk = ds.arrays(i)
        for start in chunk["doc_bounds"][:-1]:
            if shown == samples:
                break
            ids = chunk["tokens"][start : start + tokens]
            lines.append(f"--- train document starting in chunk {i} at {start}:\n{tok.decode(ids.tolist())}")
            if tuned:  # what of it is learned
                learned = ids[chunk["loss_mask"][start : start + tokens] == 1].tolist()
                lines.append(f"--- of which learned:\n{tok.decode(learned)}")
            shown += 1
        if shown == samples:
            break
    return "\n".join(lines)


def verify(data_dir: str | Path) -> list[str]:
    """Check every shard of every split against its index.json (names, sizes, hashes) and the manifest (chunk
    and token counts, chunk lengths, token ids up to `max_token_id`); one line per split, or a DataError."""
    from dist_clm.data.format import read_index
    from dist_clm.data.stream import ChunkStore, bad_token_error
    from dist_clm.errors import DataError

    m = read_manifest(data_dir)
    d, mirror = local_dir(data_dir), mirror_of(data_dir)  # (remote data: every shard is fetched, then checked)
    for split in m["splits"]:
        read_index(d / split)  # every split's names before any split's files are opened
    limit, size = token_limit(m), m["chunk_tokens"]
    lines = []
    for split, info in m["splits"].items():
        store = ChunkStore(d / split, mirror)  # sizes (and compressed files' hashes) checked here
        algos = {store.files.verify_shard(s) for s in range(len(store.readers))}
        if len(store) != info["chunks"]:
            raise DataError(
                f"'{d / split}' holds {len(store):,} chunks but '{d / 'manifest.json'}' says {info['chunks']:,}, "
                "so the directory was changed after prepare; prepare the data again."
            )
        total, top = 0, -1
        last = set(np.cumsum([c for c, _ in info.get("parts") or [[info["chunks"], 0]]]) - 1)  # each part's last
        for i in range(len(store)):
            chunk = store.arrays(i)
            ids, bounds = chunk["tokens"], chunk["doc_bounds"]
            if not (0 < len(ids) <= size if i in last else len(ids) == size):
                raise _changed(store, i, f"holds {len(ids):,} tokens where the manifest says {size:,} per chunk")
            if "fine_tuning" in m and len(chunk.get("loss_mask", ())) != len(ids):
                raise _changed(store, i, f"has no loss mask of its {len(ids):,} tokens")
            if not len(bounds) or bounds[-1] != len(ids):
                raise _changed(store, i, f"records document bounds that do not end at its length, {len(ids):,}")
            peak = int(ids.max())
            if peak > limit:
                raise bad_token_error(store, i, peak, limit)
            total, top = total + len(ids), max(top, peak)
        if total != info["tokens"]:
            raise DataError(
                f"'{d / split}' holds {total:,} tokens but '{d / 'manifest.json'}' says {info['tokens']:,}, "
                "so the directory was changed after prepare; prepare the data again."
            )
        reference = ""
        if m.get("fine_tuning", {}).get("pairs") and read_record(data_dir) is not None:
            offsets, _ = load_values(data_dir, split)  # its size and hash checked
            reference = f", reference values of {len(offsets):,} conversations (size, hash)"
            if len(offsets) and (offsets.max() >= total or offsets.min() < 0):
                raise DataError(f"the reference values of '{data_dir}' name conversations outside its {split} split; "
                                "run `dist-clm prepare-reference` again.")  # fmt: skip
        hashes = " and ".join(sorted(a for a in algos if a)) or "no"
        note = "" if None not in algos else " (index.json records no hash for some shards: sizes only there)"
        lines.append(
            f"{split}: ok: {len(store.readers)} shards (names, sizes, {hashes} hashes){note}, "
            f"{len(store):,} chunks, {total:,} tokens, token ids <= {limit} (largest {top}){reference}"
        )
    return lines


def _reference_line(data_dir) -> str:
    record = read_record(data_dir)
    if record is None:
        return "reference values (dpo): none yet; compute them with `dist-clm prepare-reference DATA --model START`"
    counts = ", ".join(f"{split} {s['conversations']:,}" for split, s in record["splits"].items())
    return f"reference values (dpo): of {record['model']} (weights {record['weights']}), {counts} conversations"


def _changed(store, i: int, what: str):
    from dist_clm.errors import DataError

    path, j = store.shard_of(i)
    return DataError(
        f"chunk {i} of '{store.dir}' (sample {j} of shard file '{path}') {what}, so it was changed after prepare; "
        "prepare the data again."
    )
