"""`dist-clm prepare`: documents -> token ids (+EOS) -> MDS shards of fixed-size chunks + manifest.

Layout of a prepared directory:

    manifest.json   written last; its presence (under the final name) marks the directory complete
    tokenizer/      the tokenizer that produced the ids (save_pretrained), so training needs nothing else
    train/, val/    MDS shards (mosaicml-streaming's MDSWriter): one sample = one chunk of the token stream

Each split's token stream is its documents in corpus order, each followed by EOS, cut into chunks of exactly
`chunk_tokens` tokens (the last one shorter). A chunk stores its tokens and `doc_bounds`: the offsets where
documents start inside it, then its length. Chunks rather than documents are the samples because streaming's
per-sample overhead (~0.1 ms) would dominate with short documents; the block size is chosen at train time.
Documents go to the validation split by a hash of their text, so the split is the same on every run.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from dist_clm import __version__
from dist_clm.data import sources
from dist_clm.data.tokenizer import fingerprint, load_tokenizer, vocab_size
from dist_clm.errors import UserError
from dist_clm.fsutil import atomic_dir, refuse_non_empty

MANIFEST = "manifest.json"
FORMAT = "dist_clm.prepared/1"
SPLITS = ("train", "val")


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0
    chunks: int = 0


class ChunkWriter:
    """Accumulates a split's token stream and writes it to MDS as fixed-size chunks with document starts."""

    def __init__(self, out: Path, dtype: np.dtype, chunk_tokens: int, compression: str | None, shard_bytes: int):
        from streaming import MDSWriter

        self.dtype, self.chunk_tokens = dtype, chunk_tokens
        columns = {"tokens": f"ndarray:{dtype.name}", "doc_bounds": "ndarray:uint32"}
        self.writer = MDSWriter(out=str(out), columns=columns, compression=compression, size_limit=shard_bytes)
        self.pending: list[np.ndarray] = []  # documents (with EOS) not yet written, in order
        self.pending_tokens = 0
        self.starts: list[int] = []  # stream offsets of the documents that start in `pending`
        self.written = 0  # stream offset of the first pending token
        self.stats = SplitStats()

    def add(self, ids: np.ndarray) -> None:
        self.starts.append(self.written + self.pending_tokens)
        self.pending.append(ids)
        self.pending_tokens += len(ids)
        self.stats.documents += 1
        self.stats.tokens += len(ids)
        if self.pending_tokens >= self.chunk_tokens:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.pending:
            return
        stream = np.concatenate(self.pending)
        starts = np.asarray(self.starts, dtype=np.int64) - self.written
        cut = len(stream) if final else len(stream) // self.chunk_tokens * self.chunk_tokens
        for lo in range(0, cut, self.chunk_tokens):
            hi = min(lo + self.chunk_tokens, cut)
            inside = starts[(starts >= lo) & (starts < hi)] - lo
            bounds = np.append(inside, hi - lo).astype(np.uint32)  # never empty: MDS can't store empty arrays
            self.writer.write({"tokens": stream[lo:hi], "doc_bounds": bounds})
            self.stats.chunks += 1
        self.starts = [int(s) + self.written for s in starts if s >= cut]
        self.written += cut
        self.pending = [stream[cut:]] if cut < len(stream) else []
        self.pending_tokens = len(stream) - cut

    def close(self) -> SplitStats:
        self._flush(final=True)
        self.writer.finish()
        return self.stats


def is_val(text: str, val_fraction: float) -> bool:
    """A document's split depends only on its text: the same corpus always splits the same way."""
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return h / 2**64 < val_fraction


def _batches(items: Iterable[str], n: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


def prepare(
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    inputs: list[str] | None = None,
    val_fraction: float = 0.05,
    chunk_tokens: int = 16384,
    text_column: str = "text",
    compression: str | None = None,
    shard_bytes: int = 1 << 26,
    progress: bool = True,
) -> dict:
    """Tokenize a corpus once into MDS shards; returns the manifest (also written as manifest.json, last)."""
    from tqdm.auto import tqdm

    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}.")
    if chunk_tokens < 2:
        raise UserError(f"--chunk-tokens must be at least 2, got {chunk_tokens}.")
    out = Path(out_dir)
    refuse_non_empty(out)
    files = sources.resolve_inputs(inputs) if inputs else sources.default_corpus_files()
    tok = load_tokenizer(tokenizer_dir)
    n_vocab = vocab_size(tok)
    dtype = np.dtype(np.uint16 if n_vocab <= 2**16 else np.uint32)
    eos = tok.eos_token_id
    empty = 0
    start = time.time()
    with atomic_dir(out) as tmp:
        tok.save_pretrained(str(tmp / "tokenizer"))
        writers = {s: ChunkWriter(tmp / s, dtype, chunk_tokens, compression, shard_bytes) for s in SPLITS}
        docs = sources.iter_documents(files, text_column)
        bar = tqdm(total=len(files), unit="file", desc="prepare", disable=not progress)
        for batch in _batches(docs, 256):
            texts = [t for t in batch if t]
            empty += len(batch) - len(texts)
            encodings = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
            for text, enc in zip(texts, encodings, strict=True):
                ids = np.array(enc.ids + [eos], dtype=dtype)
                writers["val" if is_val(text, val_fraction) else "train"].add(ids)
            bar.n = min(len(files), bar.n + len(batch)) if len(files) > 1 else 1
            bar.refresh()
        bar.close()
        stats = {s: w.close() for s, w in writers.items()}
        total_docs = sum(s.documents for s in stats.values())
        if total_docs == 0:
            raise UserError("the corpus holds no non-empty document; point prepare at files that contain text.")
        for s in SPLITS:
            if stats[s].documents == 0:
                raise UserError(
                    f"the {s} split got no document ({total_docs} in all with --val-fraction {val_fraction}); "
                    "use a larger corpus or change --val-fraction."
                )
        manifest = {
            "format": FORMAT,
            "dist_clm_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tokenizer": {
                "fingerprint": fingerprint(tok),
                "vocab_size": n_vocab,
                "eos_id": eos,
                "bos_id": tok.bos_token_id,
                "source": str(tokenizer_dir),
            },
            "token_dtype": dtype.name,
            "chunk_tokens": chunk_tokens,
            "val_fraction": val_fraction,
            "splits": {s: vars(stats[s]) for s in SPLITS},
            "empty_documents_skipped": empty,
            "sources": {
                "inputs": list(inputs) if inputs else ["<python standard library>"],
                "files": len(files),
                "text_column": text_column,
            },
            "seconds": round(time.time() - start, 2),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a complete prepared directory, or one clear sentence why it isn't one."""
    d = Path(data_dir)
    if not d.is_dir():
        raise UserError(f"data directory '{d}' does not exist; create it with `dist-clm prepare --out {d}`.")
    m = d / MANIFEST
    if not m.is_file():
        raise UserError(
            f"'{d}' has no {MANIFEST}, so it is not a complete prepared dataset; rerun `dist-clm prepare` into it."
        )
    manifest = json.loads(m.read_text())
    if manifest.get("format") != FORMAT:
        raise UserError(f"'{d}' was written in format {manifest.get('format')!r}, this dist_clm reads {FORMAT!r}.")
    return manifest
