"""`dist-clm data inspect`: what a prepared directory holds, in figures and a few decoded documents."""

from __future__ import annotations

from pathlib import Path

from dist_clm.data.prepare import read_manifest


def inspect(data_dir: str | Path, samples: int = 3, tokens: int = 60) -> str:
    from dist_clm.data.loader import ChunkStore
    from dist_clm.data.tokenizer import load_tokenizer

    m = read_manifest(data_dir)
    t = m["tokenizer"]
    lines = [
        f"{data_dir}: {m['format']}, written {m['created']} by dist_clm {m['dist_clm_version']}",
        f"tokenizer: fingerprint {t['fingerprint']}, vocabulary {t['vocab_size']}, eos {t['eos_id']}, "
        f"bos {t['bos_id']}; tokens stored as {m['token_dtype']}, {m['chunk_tokens']} per chunk",
        f"source: {m['sources']}",
        f"skipped: {m['empty_documents_skipped']} empty, {m.get('duplicates_removed') or 0} duplicate, "
        f"{m.get('undecodable_documents', 0)} with undecodable bytes (kept)",
    ]
    for split, s in m["splits"].items():
        lines.append(
            f"{split}: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['chunks']:,} chunks, "
            f"{s['tokens'] / max(1, s['documents']):,.0f} tokens per document"
        )
        hist = s.get("length_histogram", [])
        if hist:
            peak = max(c for _, _, c in hist)
            for lo, hi, c in hist:
                lines.append(f"  {lo:>8,}-{hi:<8,} {c:>9,} {'#' * max(1, round(30 * c / peak))}")
    tok = load_tokenizer(Path(data_dir) / "tokenizer")
    ds = ChunkStore(Path(data_dir) / "train")
    shown = 0
    for i in range(len(ds)):
        chunk = ds[i]
        for start in chunk["doc_bounds"][:-1]:
            if shown == samples:
                break
            ids = chunk["tokens"][start : start + tokens].tolist()
            lines.append(f"--- train document starting in chunk {i} at {start}:\n{tok.decode(ids)}")
            shown += 1
        if shown == samples:
            break
    return "\n".join(lines)
