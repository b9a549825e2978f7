"""The statistical price of the two-level shuffle (data.shuffle_window), side by side in one run.

The quick-start run (dist_clm.quickstart.TRAIN_SETTINGS: the tiny GPT-2, 1000 steps of 8 x 128 tokens, on the
quick-start corpus with its 4096-token BPE) is trained with the global shuffle (data.shuffle_window=0) under
two seeds, which measures the noise between runs, and with windows of decreasing size (the larger ones
under both seeds too: a window's order is drawn from the seed). A window of W tokens
makes a rank read the blocks of about W tokens' worth of random whole shards, in a random order, before the
next window: the smaller the window, the less mixed a stretch of steps. The data is prepared
in shards of 32 KiB (~12K tokens), so the windows hold about 21, 5 and 1 random shards. Reported: validation
loss at each evaluation (every 250 steps, on the same 32 validation blocks), the difference to the global
shuffle of the same seed, and the training loss of the last 100 steps (a window's blocks are alike, so the
model fits them better than the corpus: the gap to validation grows as windows shrink). The loss-spike guard
is off (stability.spike_factor=0): a new window can raise the loss 2x its running mean, which the guard would
take for a spike and roll back.

    python bench/shuffle_window_price.py [--markdown] [--work DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tables import render

BIN = Path(sys.executable).parent
WINDOWS = (0, 262144, 65536, 16384)  # tokens; 0 = the global shuffle
SHARD_MB = 1 / 32  # 32 KiB shards (~12K tokens), so that windows hold about 21, 5 and 1 of them


def dist_clm(*args: str) -> None:
    subprocess.run([str(BIN / "dist-clm"), *args], check=True, stdout=subprocess.DEVNULL)


def losses(run: Path, steps: int) -> tuple[dict[int, float], float] | None:
    """(validation loss per evaluated step, mean training loss of the last 100 steps), None if unfinished."""
    if not (run / "metrics.jsonl").exists():
        return None
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}
    train = [r["train/loss"] for r in rows if "train/loss" in r and r["step"] > steps - 100]
    return (val, sum(train) / len(train)) if steps in val and train else None


def main() -> None:
    from dist_clm.quickstart import TRAIN_SETTINGS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=1000)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="shuffle_price_"))
    work.mkdir(parents=True, exist_ok=True)
    tok, data = work / "qs_tokenizer", work / "qs_data"
    if not tok.exists():
        dist_clm("tokenizer", "train", "--out", str(tok), "--vocab-size", "4096", "--quiet")
    if not (data / "manifest.json").exists():  # as quickstart prepares it, in shards of ~12K tokens
        dist_clm("prepare", "--tokenizer", str(tok), "--out", str(data), "--chunk-tokens", "4096", "--shard-mb",
                 str(SHARD_MB), "--quiet")  # fmt: skip
    tokens = json.loads((data / "manifest.json").read_text())["splits"]["train"]["tokens"]

    results = {}
    for seed, window in [(1234, w) for w in WINDOWS] + [(4321, w) for w in WINDOWS[:3]]:
        run = work / f"run_w{window}_s{seed}"
        if losses(run, args.steps) is None:
            print(f"window {window}, seed {seed}", file=sys.stderr)
            dist_clm("train", *TRAIN_SETTINGS, f"data.path={data}", f"run.dir={run}", f"train.max_steps={args.steps}",
                     f"data.shuffle_window={window}", f"train.seed={seed}", "run.progress_bar=false",
                     "run.tensorboard=false", "checkpoint.save_every=0", "stability.spike_factor=0",
                     "run.overwrite=true")  # fmt: skip
        results[seed, window] = losses(run, args.steps)

    base = results[1234, 0][0]
    steps = [s for s in sorted(base) if s > 0]
    head = [
        "shuffle",
        "seed",
        *(f"val loss @{s}" for s in steps),
        f"vs global, same seed, @{steps[-1]}",
        "train loss, last 100",
    ]
    rows = []
    shards = len(json.loads((data / "train" / "index.json").read_text())["shards"])
    for (seed, window), (val, train) in results.items():
        per_window = max(1, round(window * shards / tokens))  # as the loader counts them
        what = "global" if not window else f"window {window // 1024}K tokens ({per_window} of {shards} shards)"
        delta = val[steps[-1]] - results[seed, 0][0][steps[-1]]
        rows.append([what, str(seed), *(f"{val[s]:.4f}" for s in steps), f"{delta:+.4f}", f"{train:.4f}"])
    print(render(head, rows, args.markdown))
    print(f"\ncorpus: {tokens / 1e6:.2f} M training tokens in {shards} shards; {args.steps} steps of 8 x 128 tokens")


if __name__ == "__main__":
    main()
