"""Prepare throughput, side by side, in one run (a benchmark, not a test).

    (a) raw `tokenizers` encode_batch over the corpus held in memory: the ceiling
    (b) the run_clm.py recipe: load_dataset + map(tokenize, batched, num_proc) + group_texts
    (c) `dist-clm prepare` as a user runs it (the whole command, start-up included)

on two corpora: the Python standard library's .py files (~31 MB) and a >= 300 MB corpus made of the same
files repeated in ten different orders. One 32k byte-level BPE (trained on the first corpus) is used
throughout. Prints a table; `--markdown` prints it for docs/PERFORMANCE.md.

    python bench/prepare_throughput.py [--quick] [--markdown] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def make_corpora(work: Path, quick: bool) -> dict[str, Path]:
    """Corpus directories of .txt files (one document each)."""
    small = work / "stdlib"
    if not small.exists():
        small.mkdir(parents=True)
        for i, f in enumerate(stdlib_files()):
            (small / f"{i:05d}.txt").write_text(f.read_text(errors="replace"))  # a few test files are latin-1
    corpora = {"stdlib .py (31 MB)": small}
    if quick:
        return corpora
    big = work / "big"
    if not big.exists():
        big.mkdir()
        files = sorted(small.iterdir())
        for rep in range(10):
            order = files[:]
            random.Random(rep).shuffle(order)
            for i, f in enumerate(order):
                (big / f"{rep:02d}_{i:05d}.txt").write_bytes(f.read_bytes())
    corpora["stdlib x10 (315 MB)"] = big
    return corpora


def corpus_mb(d: Path) -> float:
    return sum(f.stat().st_size for f in d.iterdir()) / 1e6


def tokenizer(work: Path, corpus: Path) -> Path:
    out = work / "bpe32k"
    if not out.exists():
        subprocess.run(
            [
                str(BIN / "dist-clm"),
                "tokenizer",
                "train",
                str(corpus),
                "--out",
                str(out),
                "--vocab-size",
                "32000",
                "--quiet",
            ],
            check=True,
        )
    return out


def run_a(corpus: Path, tok_dir: Path) -> tuple[int, float]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    docs = [f.read_text(errors="replace") for f in sorted(corpus.iterdir())]
    t = time.perf_counter()
    n = sum(len(e.ids) + 1 for e in tok.encode_batch(docs, add_special_tokens=False))
    return n, time.perf_counter() - t


def run_b(corpus: Path, tok_dir: Path, work: Path, num_proc: int, block: int = 1024) -> tuple[int, float]:
    """run_clm.py's recipe, with a fresh datasets cache so nothing is reused."""
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    cache = work / "hf_cache_b"
    shutil.rmtree(cache, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    t = time.perf_counter()
    files = [str(f) for f in sorted(corpus.iterdir())]
    raw = datasets.load_dataset("text", data_files={"train": files}, sample_by="document", cache_dir=str(cache))

    def tokenize(batch):
        return tok(batch["text"])

    ids = raw.map(tokenize, batched=True, num_proc=num_proc, remove_columns=["text"])

    def group_texts(examples):
        concatenated = {k: sum(examples[k], []) for k in examples}
        total = len(concatenated["input_ids"]) // block * block
        result = {k: [v[i : i + block] for i in range(0, total, block)] for k, v in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    grouped = ids.map(group_texts, batched=True, num_proc=num_proc)
    elapsed = time.perf_counter() - t
    n = sum(len(x) for x in ids["train"]["input_ids"])
    del grouped
    shutil.rmtree(cache, ignore_errors=True)
    return n, elapsed


def run_c(corpus: Path, tok_dir: Path, work: Path, num_proc: int) -> tuple[int, float, float]:
    out = work / "prepared"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        str(BIN / "dist-clm"),
        "prepare",
        str(corpus),
        "--tokenizer",
        str(tok_dir),
        "--out",
        str(out),
        "--quiet",
        "--num-proc",
        str(num_proc),
    ]
    t = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:  # the whole process tree's resident memory, sampled
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.1)
    elapsed = time.perf_counter() - t
    assert proc.returncode == 0, "dist-clm prepare failed"
    m = json.loads((out / "manifest.json").read_text())
    n = sum(s["tokens"] for s in m["splits"].values())
    shutil.rmtree(out)
    return n, elapsed, peak / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the 31 MB corpus")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="prepare_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    corpora = make_corpora(work, args.quick)
    tok_dir = tokenizer(work, next(iter(corpora.values())))
    rows = []
    for name, corpus in corpora.items():
        n_a, s_a = run_a(corpus, tok_dir)
        n_b, s_b = run_b(corpus, tok_dir, work, cores)
        n_c, s_c, rss = run_c(corpus, tok_dir, work, cores)
        n_c1, s_c1, rss1 = run_c(corpus, tok_dir, work, 1)
        a, b, c, c1 = n_a / s_a, n_b / s_b, n_c / s_c, n_c1 / s_c1
        rows.append((name, corpus_mb(corpus), n_a, a, b, c, c / a, c / b, rss, c1, c1 / a, rss1))
        print(
            f"{name}: a {a / 1e6:.3f} b {b / 1e6:.3f} c {c / 1e6:.3f} c1 {c1 / 1e6:.3f} M tok/s, "
            f"peak RSS (c) {rss:.2f} GiB",
            file=sys.stderr,
        )
    machine = (
        f"{platform.processor() or platform.machine()}, {cores} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}"
    )
    head = [
        "corpus",
        "MB",
        "tokens",
        "(a) ceiling M tok/s",
        "(b) run_clm M tok/s",
        "(c) dist-clm M tok/s",
        "(c)/(a)",
        "(c)/(b)",
        "(c) peak RSS GiB",
        "(c) --num-proc 1 M tok/s",
        "its /(a)",
        "its RSS GiB",
    ]
    lines = [" | ".join(head)]
    for r in rows:
        lines.append(
            f"{r[0]} | {r[1]:.0f} | {r[2] / 1e6:.1f} M | {r[3] / 1e6:.3f} | {r[4] / 1e6:.3f} | "
            f"{r[5] / 1e6:.3f} | {r[6]:.2f} | {r[7]:.2f} | {r[8]:.2f} | {r[9] / 1e6:.3f} | {r[10]:.2f} | "
            f"{r[11]:.2f}"
        )
    if args.markdown:
        lines.insert(1, " | ".join("---" for _ in head))
        print("\n".join(f"| {line} |" for line in lines))
        print(f"\nmachine: {machine}; 32k byte-level BPE; num_proc = {cores} for (b) and (c) unless noted")
    else:
        print("\n".join(lines))
        print(f"machine: {machine}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
