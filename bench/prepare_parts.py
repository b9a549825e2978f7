"""A prepare in parts against N, on this machine, in one run (a benchmark, not a test).

The corpus: the Python standard library's .py files as one JSON-lines file (~31 MB; `--quick`: a quarter), cut
between the tasks by byte ranges, and one 32k byte-level BPE trained on it (bench/prepare_throughput.py's). For
each N, the N tasks of `dist-clm prepare --tasks N --task-index I --num-proc 1` run at once as separate
processes, each on one core (RAYON_NUM_THREADS=1: the tokenizer's thread pool of one thread, as an array task
of --cpus-per-task 1 gets), then `dist-clm prepare --merge`. The anchor is the one-machine command as a user
runs it (every core of the machine). Columns: the wall time of the N tasks
together, each task's own throughput (its marker's tokens / seconds; the mean and the slowest), the aggregate
(all tokens / wall), the merge (its own seconds, and the whole command), and the ratios to the anchor. With
`--dedup`, one more row: N = 4 with the hash and dedup stages.

    python bench/prepare_parts.py [--quick] [--markdown] [--work DIR] [--tasks 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_throughput import BIN, make_corpora, tokenizer  # noqa: E402 (the same corpus and tokenizer)


def jsonl_corpus(work: Path, quick: bool) -> Path:
    out = work / ("stdlib_quarter.jsonl" if quick else "stdlib.jsonl")
    if not out.exists():
        files = sorted(make_corpora(work, quick=True)["stdlib .py (31 MB)"].iterdir())
        with open(out, "w") as f:
            for p in files[: len(files) // 4] if quick else files:
                f.write(json.dumps({"text": p.read_text(errors="replace")}) + "\n")
    return out


def cli(*args: str) -> list[str]:
    return [str(BIN / "dist-clm"), *args]


def one_machine(corpus: Path, tok: Path, work: Path) -> tuple[int, float]:
    out = work / "one"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run(cli("prepare", str(corpus), "--tokenizer", str(tok), "--out", str(out), "--quiet"), check=True,
                   capture_output=True)  # fmt: skip
    took = time.perf_counter() - t
    m = json.loads((out / "manifest.json").read_text())
    return sum(s["tokens"] for s in m["splits"].values()), took


def in_parts(corpus: Path, tok: Path, work: Path, n: int, dedup: bool, shard_mb: float = 64) -> dict:
    out = work / f"parts{n}{'_dedup' if dedup else ''}_{shard_mb:g}"
    shutil.rmtree(out, ignore_errors=True)
    base = ["prepare", str(corpus), "--tokenizer", str(tok), "--out", str(out), "--tasks", str(n), "--num-proc", "1",
            "--shard-mb", str(shard_mb), "--quiet", *(["--dedup"] if dedup else [])]  # fmt: skip
    stages = {}
    for stage in ("hash", "dedup", "tokenize") if dedup else ("tokenize",):
        t = time.perf_counter()
        procs = [subprocess.Popen(cli(*base, "--task-index", str(i), "--stage", stage), stdout=subprocess.DEVNULL,
                                  env={**os.environ, "RAYON_NUM_THREADS": "1"}) for i in range(n)]  # fmt: skip
        if any(p.wait() for p in procs):
            raise SystemExit(f"a task of N={n} failed ({stage})")
        stages[stage] = time.perf_counter() - t
    t = time.perf_counter()  # (the whole command: start-up included)
    subprocess.run(cli("prepare", "--merge", str(out)), check=True, capture_output=True)
    merge_wall = time.perf_counter() - t
    m = json.loads((out / "manifest.json").read_text())
    markers = [json.loads((out / "parts" / f"part-{i:05d}.json").read_text()) for i in range(n)]
    rates = [sum(s["tokens"] for s in k["splits"].values()) / k["seconds"] for k in markers]
    shards = sum(1 for _ in out.glob("*/part-*/shard.*"))
    return {"n": n, "label": f"{n}" + (" --dedup" if dedup else "") + (f", {shard_mb:g} MiB shards" if shard_mb != 64
            else ""), "tokens": sum(s["tokens"] for s in m["splits"].values()), "stages": stages,
            "task_mean": sum(rates) / n, "task_min": min(rates), "merge": m["parts"]["merge_seconds"],
            "merge_wall": merge_wall, "shards": shards}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--work", default="/tmp/dist_clm_bench_parts")
    ap.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--dedup", action="store_true")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = jsonl_corpus(work, a.quick)
    tok = tokenizer(work, make_corpora(work, quick=True)["stdlib .py (31 MB)"])
    tokens, took = one_machine(corpus, tok, work)
    anchor = tokens / took / 1e6
    rows = [in_parts(corpus, tok, work, n, False) for n in a.tasks]
    if a.dedup:
        rows.append(in_parts(corpus, tok, work, 4, True))
    rows.append(in_parts(corpus, tok, work, 4, False, shard_mb=1 / 64))  # many shards: what the merge costs per shard
    head = ["N", "stages (s)", "wall of the N tasks s", "per task M tok/s (mean / slowest)", "aggregate M tok/s",
            "aggregate / one machine", "merge s (its own / command)", "shards merged"]  # fmt: skip
    print(f"# {platform.machine()} {platform.processor() or ''}, {corpus.name} "
          f"({corpus.stat().st_size / 1e6:.0f} MB, {tokens / 1e6:.1f} M tokens), {os.cpu_count()} cores; one machine: "
          f"{took:.1f} s = {anchor:.3f} M tok/s")  # fmt: skip
    lines = []
    for r in rows:
        wall = sum(r["stages"].values())
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
        agg = r["tokens"] / wall / 1e6
        lines.append([r["label"], stages, f"{wall:.1f}", f"{r['task_mean'] / 1e6:.3f} / {r['task_min'] / 1e6:.3f}",
                      f"{agg:.3f}", f"{agg / anchor:.2f}", f"{r['merge']:.2f} / {r['merge_wall']:.1f}",
                      str(r["shards"])])  # fmt: skip
    if a.markdown:
        print("| " + " | ".join(head) + " |")
        print("| " + " | ".join("---" for _ in head) + " |")
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        for line in [head, *lines]:
            print("  ".join(f"{c:>14}" for c in line))


if __name__ == "__main__":
    main()
