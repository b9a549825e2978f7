"""Loader throughput, side by side, in one run (a benchmark, not a test): packed tokens/s handed to the model.

    (a) nanoGPT's get_batch: the prepared train split written once as one flat uint16 file, opened as an
        np.memmap, random batches of `block` tokens (ix = rng.integers, np.stack, torch.from_numpy): the ceiling
    (b) plain `streaming.StreamingDataset` (shuffle off) through a torch DataLoader (batch 64), one sample per
        document (a per-document MDS copy of the split, made here) and no packing: the usual anchor
    (c) dist_clm's TrainLoader as training runs it: micro batch 8, one rank, shuffled, packed on the fly from
        the prepared chunks; 0 and 2 loader workers, blocks of 1024 and 2048, and document masking at 2048

on two corpora: the Python standard library's .py files (long documents, ~4.6K tokens each) and the same text
cut into pieces of ~1200 characters at line ends (short documents, ~300 tokens each, like web text). One 32k
byte-level BPE (trained on the first corpus) is used throughout; each corpus is prepared once with
`dist-clm prepare` and read from its train split.

Each measurement runs for a fixed wall time after a warm-up (the first batch, which includes worker start-up,
and a short run after it are not counted). Tokens are batches x batch x block for (a) and (c), and the sum of
the sample lengths for (b), whose epochs follow one another (workers persist) when the corpus is short.
Columns: `M tok/s` (millions of tokens per second, one process = one rank), `/(a)` (that rate over (a) at the
same block; (b) is set against (a) at 1024), `target` (the loader's: >= 8 M tok/s per rank with 0 workers,
scaling with workers, >= 0.25 x (a)). (b) runs in a fresh subprocess per measurement (its own TMPDIR, stale
shared memory cleaned first), since streaming keeps a registry of local directories in shared memory.

    python bench/loader_throughput.py [--quick] [--markdown] [--work DIR] [--seconds S] [--only local|remote]

A second table, the remote rows (bench/loader_remote.py), follows in the same run: the quick-start training
run reading its data from a local directory vs from s3:// on the project's local S3 server, cold and warm
cache, 50 ms added per request, with and without prefetch: its data wait and throughput.

With --work the corpora, the tokenizer and the prepared data are kept there, so a rerun only measures.
--quick uses ~5 MB of each corpus and 2 s per measurement (about two minutes in all).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil

BIN = Path(sys.executable).parent
MICRO_BATCH = 8  # (a) and (c)
SD_BATCH = 64  # (b)
BLOCKS = (1024, 2048)
WORKERS = (0, 2)


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def pieces(text: str, size: int = 1200) -> Iterator[str]:
    """`text` cut at line ends into pieces of at least `size` characters (the last one may be shorter)."""
    piece: list[str] = []
    n = 0
    for line in text.splitlines(keepends=True):
        piece.append(line)
        n += len(line)
        if n >= size:
            yield "".join(piece)
            piece, n = [], 0
    if "".join(piece).strip():
        yield "".join(piece)


def write_jsonl(path: Path, docs: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    os.replace(tmp, path)


def make_corpora(work: Path, quick: bool) -> dict[str, Path]:
    """One .jsonl file per corpus ({"text": ...} a line): whole stdlib files, and the same text in pieces."""
    tag = "_quick" if quick else ""
    long, short = work / f"stdlib{tag}.jsonl", work / f"stdlib_pieces{tag}.jsonl"
    if not (long.exists() and short.exists()):
        files = stdlib_files()
        if quick:  # a random ~5 MB of the files, so the subset is not one corner of the library
            random.Random(0).shuffle(files)
        docs, size = [], 0
        for f in files:
            text = f.read_text(errors="replace")  # a few test files are latin-1
            if not text.strip():
                continue
            docs.append(text)
            size += len(text.encode())
            if quick and size >= 5e6:
                break
        write_jsonl(long, docs)
        write_jsonl(short, [p for d in docs for p in pieces(d)])
    return {"stdlib .py (long docs)": long, "stdlib in 1200-char pieces (short docs)": short}


def dist_clm(*args: str) -> None:
    subprocess.run([str(BIN / "dist-clm"), *args, "--quiet"], check=True, stdout=subprocess.DEVNULL)


def tokenizer(work: Path, corpus: Path, quick: bool) -> Path:
    out = work / ("bpe32k_quick" if quick else "bpe32k")
    if not out.exists():
        dist_clm("tokenizer", "train", str(corpus), "--out", str(out), "--vocab-size", "32000")
    return out


def prepared(work: Path, corpus: Path, tok_dir: Path) -> Path:
    """`dist-clm prepare` of the corpus (once), its per-document MDS copy for (b), its flat uint16 file for (a)."""
    from streaming import MDSWriter

    from dist_clm.data.format import read_manifest
    from dist_clm.data.stream import TokenStream

    out = work / "prepared" / corpus.stem
    if not (out / "manifest.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        dist_clm("prepare", str(corpus), "--tokenizer", str(tok_dir), "--out", str(out))
    flat, per_doc = out.with_name(out.name + ".train.u16"), out.with_name(out.name + ".per_doc")
    if flat.exists() and per_doc.exists():
        return out
    stream = TokenStream(out, "train", read_manifest(out))
    tokens, starts = stream.read(0, stream.tokens, with_starts=True)
    tokens = tokens.astype(np.uint16)
    tmp = flat.with_name(f".{flat.name}.tmp")
    tokens.tofile(tmp)
    os.replace(tmp, flat)
    tmp = per_doc.with_name(f".{per_doc.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    bounds = np.append(starts, len(tokens))  # each document's ids + EOS, as prepare wrote them
    with MDSWriter(out=str(tmp), columns={"tokens": "ndarray:uint16"}) as writer:
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            writer.write({"tokens": tokens[lo:hi]})
    shutil.rmtree(per_doc, ignore_errors=True)
    os.replace(tmp, per_doc)
    return out


def timed(batches: Iterator, count: Callable[[object], int], seconds: float, warm: float) -> float:
    """Tokens/s over `seconds` of batches, after the first batch and `warm` seconds more."""
    next(batches)
    end = time.perf_counter() + warm
    while time.perf_counter() < end:
        next(batches)
    n, t0 = 0, time.perf_counter()
    while True:
        n += count(next(batches))
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return n / elapsed


def run_a(flat: Path, block: int, seconds: float, warm: float) -> float:
    import torch

    mm = np.memmap(flat, dtype=np.uint16, mode="r")
    n = len(mm)
    rng = np.random.default_rng(0)

    def get_batch() -> Iterator[torch.Tensor]:
        while True:
            ix = rng.integers(0, n - block, MICRO_BATCH)
            yield torch.from_numpy(np.stack([mm[i : i + block].astype(np.int64) for i in ix]))

    return timed(get_batch(), lambda x: x.numel(), seconds, warm)


def list_collate(samples: list) -> list:
    return samples


def streaming_child(local: str, workers: int, seconds: float, warm: float) -> None:
    """(b), in its own process: prints {"tok_s": ...}."""
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory
    from torch.utils.data import DataLoader

    clean_stale_shared_memory()
    ds = StreamingDataset(local=local, shuffle=False, batch_size=SD_BATCH)
    loader = DataLoader(
        ds, batch_size=SD_BATCH, num_workers=workers, collate_fn=list_collate, persistent_workers=workers > 0
    )

    def epochs(loader: DataLoader) -> Iterator[list]:
        while True:
            yield from loader

    batches = epochs(loader)
    tok_s = timed(batches, lambda b: sum(len(s["tokens"]) for s in b), seconds, warm)
    batches.close()  # ends the epoch's iterator, which stops the workers
    del batches, loader, ds
    gc.collect()
    print(json.dumps({"tok_s": tok_s}), flush=True)


def run_b(per_doc: Path, work: Path, workers: int, seconds: float, warm: float) -> float:
    """(b) in a subprocess of its own session, so that a stuck worker can be killed with it."""
    tmp = work / "tmp" / uuid.uuid4().hex
    tmp.mkdir(parents=True)
    cmd = [sys.executable, __file__, "--streaming-child", str(per_doc), str(workers), str(seconds), str(warm)]
    try:
        with (tmp / "out.json").open("w") as out:
            proc = subprocess.Popen(cmd, env={**os.environ, "TMPDIR": str(tmp)}, stdout=out, start_new_session=True)
            try:
                rc = proc.wait(timeout=10 * seconds + 120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise RuntimeError(f"StreamingDataset with {workers} workers did not finish") from None
        if rc != 0:
            raise RuntimeError(f"StreamingDataset with {workers} workers failed (exit status {rc})")
        return json.loads((tmp / "out.json").read_text().strip().splitlines()[-1])["tok_s"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_c(prep: Path, block: int, workers: int, seconds: float, warm: float, document_mask: bool = False) -> float:
    from dist_clm.data.format import read_manifest
    from dist_clm.data.loader import TrainLoader
    from dist_clm.data.order import Source

    loader = TrainLoader(
        [Source(prep.name, str(prep), read_manifest(prep))],
        block_size=block,
        micro_batch=MICRO_BATCH,
        grad_accum=1,
        rank=0,
        world=1,
        shuffle=True,
        seed=0,
        num_workers=workers,
        document_mask=document_mask,
    )

    def steps(loader: TrainLoader) -> Iterator[dict]:
        for batch in loader:
            yield batch
            loader.step_done()

    batches = steps(loader)
    tok_s = timed(batches, lambda b: b["input_ids"].numel(), seconds, warm)
    batches.close()  # drops the DataLoader iterator, which stops the workers
    del batches, loader
    gc.collect()
    return tok_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~5 MB of each corpus, 2 s per measurement")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--work", default=None, help="scratch directory, kept for reruns (default: a temporary one)")
    ap.add_argument("--seconds", type=float, default=None, help="timed seconds per measurement (default 5, quick 2)")
    ap.add_argument("--only", choices=("local", "remote"), help="one of the two tables (default: both)")
    ap.add_argument("--streaming-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.streaming_child:
        local, workers, seconds, warm = args.streaming_child
        streaming_child(local, int(workers), float(seconds), float(warm))
        return
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    warm = min(1.0, seconds / 4)
    work = Path(args.work or tempfile.mkdtemp(prefix="loader_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.only != "remote":
        local_table(args, work, seconds, warm)
    if args.only != "local":
        from loader_remote import remote_rows
        from tables import render

        head, rows, note = remote_rows(work, args.quick)
        print(f"\nremote rows (data wait of the quick-start training run):\n\n{render(head, rows, args.markdown)}")
        print(f"\n{note}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def local_table(args: argparse.Namespace, work: Path, seconds: float, warm: float) -> None:
    cores = os.cpu_count() or 1
    corpora = make_corpora(work, args.quick)
    tok_dir = tokenizer(work, next(iter(corpora.values())), args.quick)

    from dist_clm.data.format import read_manifest

    rows: list[tuple[str, str, int, int | None, float, float, str]] = []

    def row(label: str, loader: str, workers: int, block: int | None, tok_s: float, ceiling: float, target: str = ""):
        rows.append((label, loader, workers, block, tok_s, tok_s / ceiling, target))
        print(f"{label} | {loader} | {workers} workers | block {block}: {tok_s / 1e6:.2f} M tok/s", file=sys.stderr)

    def target(tok_s: float, ceiling: float, base: float | None = None) -> str:
        """The loader's targets: >= 8 M tok/s with 0 workers (else: scaling over 0 workers), >= 0.25 x (a)."""
        first = f">= 8 M: {'yes' if tok_s >= 8e6 else 'NO'}" if base is None else f"x{tok_s / base:.2f} vs 0 workers"
        return f"{first}, >= 0.25(a): {'yes' if tok_s >= 0.25 * ceiling else 'NO'}"

    for name, corpus in corpora.items():
        prep = prepared(work, corpus, tok_dir)
        train = read_manifest(prep)["splits"]["train"]
        label = f"{name}: {train['tokens'] / 1e6:.1f} M tokens, {train['tokens'] / train['documents']:.0f} tok/doc"
        flat, per_doc = prep.with_name(prep.name + ".train.u16"), prep.with_name(prep.name + ".per_doc")
        a = {block: run_a(flat, block, seconds, warm) for block in BLOCKS}
        for block in BLOCKS:
            row(label, "(a) nanoGPT memmap get_batch", 0, block, a[block], a[block])
        for w in WORKERS:
            row(label, "(b) StreamingDataset, 1 sample/doc", w, None, run_b(per_doc, work, w, seconds, warm), a[1024])
        for block in BLOCKS:
            c = {w: run_c(prep, block, w, seconds, warm) for w in WORKERS}
            for w in WORKERS:
                base = None if w == 0 else c[0]
                row(label, "(c) dist_clm TrainLoader", w, block, c[w], a[block], target(c[w], a[block], base))
        dm = run_c(prep, 2048, 0, seconds, warm, document_mask=True)
        row(label, "(c) dist_clm TrainLoader, document_mask", 0, 2048, dm, a[2048], target(dm, a[2048]))

    import streaming
    import torch

    machine = (
        f"{platform.processor() or platform.machine()}, {cores} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, "
        f"torch {torch.__version__}, mosaicml-streaming {streaming.__version__}"
    )
    head = ["corpus (train split)", "loader", "workers", "block", "M tok/s", "/(a)", "target"]
    lines = [" | ".join(head)]
    for r in rows:
        lines.append(f"{r[0]} | {r[1]} | {r[2]} | {r[3] or '-'} | {r[4] / 1e6:.2f} | {r[5]:.2f} | {r[6]}")
    if args.markdown:
        lines.insert(1, " | ".join("---" for _ in head))
        print("\n".join(f"| {line} |" for line in lines))
        print(
            f"\nmachine: {machine}; 32k byte-level BPE; micro batch {MICRO_BATCH} for (a) and (c), batch {SD_BATCH} "
            f"for (b); {seconds:g} s per measurement after warm-up{'; --quick (~5 MB corpora)' if args.quick else ''}"
        )
    else:
        print("\n".join(lines))
        print(f"machine: {machine}")


if __name__ == "__main__":
    main()
