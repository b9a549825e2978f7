"""The remote rows of the loader benchmark: what data in object storage costs a training run, side by side.

The quick-start run (its model and settings, dist_clm.quickstart.TRAIN_SETTINGS, on the quick-start corpus
with its 4096-token BPE) trains for a few hundred steps with `dist-clm train`, reading its prepared data

    from a local directory (the anchor), or from s3:// on the project's local S3 server (SeaweedFS), directly
    or through launchers/local_s3/slow_proxy.py adding 50 ms before every request (a distant bucket),

with a cold node cache (a fresh data.cache_dir) or a warm one (the previous run's), with and without exact
prefetch (data.prefetch_steps), unbounded or with data.cache_limit of 4 shards. Shards are small (32 KiB,
~16 K tokens) so that a few hundred steps cross many of them, and data.shuffle_window is 2 shards' worth of
tokens (a new window every ~32 steps). The figures are the run's own `train/data_wait_frac` (time waiting for
the next batch over step time) and `train/tokens_per_s` from metrics.jsonl, in its first log window (the
cold start) and over the rest, and the shard downloads from the cache's downloads.log. Target: with prefetch,
data wait <= 2% of step time after the first window.

Run by bench/loader_throughput.py (its remote table), or alone:

    python bench/loader_remote.py [--quick] [--markdown] [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from tables import render

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARD_MB = 1 / 32  # 32 KiB shards
CHUNK_TOKENS = 4096
WINDOW_TOKENS = 2 * 16384  # ~2 shards
LOG_EVERY = 10
DELAY_MS = 50


@dataclass
class Case:
    label: str
    remote: bool = True
    delay: bool = False
    prefetch: int = 2
    cache: str = "cold"  # cold: a fresh cache; warm: the previous case's
    limit_shards: int = 0
    window: int = WINDOW_TOKENS


CASES = [
    Case("local directory", remote=False),
    Case("s3 (localhost)", prefetch=0),
    Case("s3 (localhost)"),
    Case("s3 (localhost)", prefetch=0, cache="warm"),
    Case(f"s3 +{DELAY_MS} ms per request", delay=True, prefetch=0),
    Case(f"s3 +{DELAY_MS} ms per request", delay=True),
    Case(f"s3 +{DELAY_MS} ms per request", delay=True, prefetch=4),
    Case(f"s3 +{DELAY_MS} ms per request", delay=True, limit_shards=4),
    Case(f"s3 +{DELAY_MS} ms per request, global shuffle", delay=True, limit_shards=4, window=0),
]


def server() -> dict[str, str]:
    """The local S3 server's client environment (started by the project's script if it is not up)."""
    subprocess.run(["bash", str(REPO / "launchers/local_s3/start.sh")], check=True, stdout=subprocess.DEVNULL)
    env = {}
    for line in (Path(os.environ.get("DIST_CLM_S3_DIR", "/tmp/dist-clm-s3")) / "env").read_text().splitlines():
        key, value = line.removeprefix("export ").split("=", 1)
        env[key] = value.split(":-", 1)[1].rstrip("}") if value.startswith("${") else value
    os.environ.update(env)  # (boto3 here, to make the bucket)
    return env


@contextlib.contextmanager
def slow(endpoint: str, delay_ms: float):
    """The server behind the delaying proxy: yields the proxy's endpoint."""
    proxy = subprocess.Popen(
        [sys.executable, str(REPO / "launchers/local_s3/slow_proxy.py"), "--to", endpoint.removeprefix("http://"),
         "--delay-ms", str(delay_ms)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        yield proxy.stdout.readline().split()[-1]
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)


def dist_clm(*args: str, env: dict | None = None) -> None:
    subprocess.run([str(BIN / "dist-clm"), *args], check=True, stdout=subprocess.DEVNULL, env=env)


def data(work: Path, env: dict) -> tuple[Path, str]:
    """The quick-start corpus prepared once locally and once to a new prefix of the bucket."""
    import boto3

    tok, local = work / "qs_tokenizer", work / "qs_data"
    if not tok.exists():
        dist_clm("tokenizer", "train", "--out", str(tok), "--vocab-size", "4096", "--quiet")
    common = ["--tokenizer", str(tok), "--chunk-tokens", str(CHUNK_TOKENS), "--shard-mb", str(SHARD_MB), "--quiet"]
    if not (local / "manifest.json").exists():
        dist_clm("prepare", "--out", str(local), *common)
    client = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"])
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket="dist-clm-bench")
    url = f"s3://dist-clm-bench/{uuid.uuid4().hex[:8]}/quickstart"
    dist_clm("prepare", "--out", url, *common, env={**os.environ, **env})
    return local, url


def run_case(case: Case, work: Path, local: Path, url: str, env: dict, steps: int, cache: Path) -> dict:
    from dist_clm.quickstart import TRAIN_SETTINGS

    run = work / f"run_{uuid.uuid4().hex[:6]}"
    settings = [
        *TRAIN_SETTINGS, f"data.path={url if case.remote else local}", f"run.dir={run}", f"train.max_steps={steps}",
        f"train.log_every={LOG_EVERY}", "train.eval_every=0", "checkpoint.save_every=0", "run.progress_bar=false",
        "run.tensorboard=false", f"data.shuffle_window={case.window}", f"data.prefetch_steps={case.prefetch}",
        f"data.cache_dir={cache}", f"data.cache_limit={case.limit_shards * int(SHARD_MB * 2**20)}",
    ]  # fmt: skip

    def downloads() -> int:  # shard downloads in the cache's logs
        logs = [f.read_text().splitlines() for f in cache.glob("*/downloads.log")]
        return sum(1 for lines in logs for ln in lines if ln.split()[2].startswith("train/shard."))

    before = downloads()
    dist_clm("train", *settings, env={**os.environ, **env})
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "train/data_wait_frac" in r]
    rest = windows[1:]
    return {
        "first_wait": windows[0]["train/data_wait_frac"],
        "wait": sum(r["train/data_wait_frac"] for r in rest) / len(rest),
        "max_wait": max(r["train/data_wait_frac"] for r in rest),
        "tok_s": sum(r["train/tokens_per_s"] for r in rest) / len(rest),
        "downloads": downloads() - before if case.remote else None,
    }


def remote_rows(work: Path, quick: bool) -> tuple[list[str], list[list[str]], str]:
    """(header, rows, note): every case, measured in this one run."""
    steps = 100 if quick else 300
    env = server()
    local, url = data(work, env)
    manifest = json.loads((local / "manifest.json").read_text())
    n_shards = len(json.loads((local / "train" / "index.json").read_text())["shards"])
    measured, cache = [], None
    for case in CASES:
        print(f"remote: {case}", file=sys.stderr)
        if case.cache == "cold":
            cache = work / f"cache_{uuid.uuid4().hex[:6]}"
        if case.delay:
            with slow(env["S3_ENDPOINT_URL"], DELAY_MS) as endpoint:
                measured.append(run_case(case, work, local, url, {**env, "S3_ENDPOINT_URL": endpoint}, steps, cache))
        else:
            measured.append(run_case(case, work, local, url, env, steps, cache))
    base = measured[0]["tok_s"]
    head = ["storage", "cache", "prefetch", "shuffle", "data wait, first window", "data wait after (mean / max)",
            "tok/s after", "x local", "shard downloads", "target"]  # fmt: skip
    rows = []
    for case, m in zip(CASES, measured, strict=True):
        target = ""
        if case.remote and case.prefetch and case.window:
            target = f"<= 2%: {'yes' if m['wait'] <= 0.02 else 'NO'}"
        limit = f", limit {case.limit_shards} shards" if case.limit_shards else ""
        rows.append([
            case.label, "-" if not case.remote else case.cache + limit, str(case.prefetch) if case.remote else "-",
            f"window {case.window // 1024}K tokens" if case.window else "global",
            f"{100 * m['first_wait']:.1f}%", f"{100 * m['wait']:.2f}% / {100 * m['max_wait']:.2f}%",
            f"{m['tok_s']:,.0f}", f"{m['tok_s'] / base:.2f}", "-" if m["downloads"] is None else str(m["downloads"]),
            target,
        ])  # fmt: skip
    train = manifest["splits"]["train"]
    note = (
        f"quick-start model and settings, {steps} steps, log window {LOG_EVERY} steps; corpus "
        f"{train['tokens'] / 1e6:.2f} M training tokens in {n_shards} shards of {SHARD_MB * 1024:.0f} KiB; "
        "prefetch in steps; 'after' = every log window but the first"
    )
    return head, rows, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 steps per case instead of 300")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="loader_remote_"))
    work.mkdir(parents=True, exist_ok=True)
    head, rows, note = remote_rows(work, args.quick)
    print(render(head, rows, args.markdown))
    print(f"\n{note}")


if __name__ == "__main__":
    main()
