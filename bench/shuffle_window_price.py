"""The statistical price of the two-level shuffle (data.shuffle_window), side by side in one run.

The quick-start run (dist_clm.quickstart.TRAIN_SETTINGS: the tiny GPT-2, 1000 steps of 8 x 128 tokens, on the
quick-start corpus with its 4096-token BPE) is trained with the global shuffle (data.shuffle_window=0) under
two seeds, which measures the noise between runs, and with windows of decreasing size. A window of W tokens
makes a rank read W / block_size consecutive blocks of the stream, in a random order, before the next window
(itself at a random place): the smaller the window, the less mixed a stretch of steps. Reported: validation
loss at each evaluation (every 250 steps, on the same 32 validation blocks) and the difference to the global
shuffle of the same seed.

    python bench/shuffle_window_price.py [--markdown] [--work DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent
WINDOWS = (0, 262144, 65536, 16384)  # tokens; 0 = the global shuffle


def dist_clm(*args: str) -> None:
    subprocess.run([str(BIN / "dist-clm"), *args], check=True, stdout=subprocess.DEVNULL)


def val_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}


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
    if not (data / "manifest.json").exists():  # as quickstart prepares it
        dist_clm("prepare", "--tokenizer", str(tok), "--out", str(data), "--chunk-tokens", "8192", "--quiet")
    tokens = json.loads((data / "manifest.json").read_text())["splits"]["train"]["tokens"]

    results = {}
    for seed, window in [(1234, w) for w in WINDOWS] + [(4321, 0)]:
        run = work / f"run_w{window}_s{seed}"
        if not (run / "metrics.jsonl").exists():
            print(f"window {window}, seed {seed}", file=sys.stderr)
            dist_clm("train", *TRAIN_SETTINGS, f"data.path={data}", f"run.dir={run}", f"train.max_steps={args.steps}",
                     f"data.shuffle_window={window}", f"train.seed={seed}", "run.progress_bar=false",
                     "run.tensorboard=false", "train.save_every=0")  # fmt: skip
        results[seed, window] = val_losses(run)

    base = results[1234, 0]
    steps = [s for s in sorted(base) if s > 0]
    head = ["shuffle", "seed", *(f"val loss @{s}" for s in steps), f"vs global @{steps[-1]}"]
    lines = [" | ".join(head)]
    for (seed, window), losses in results.items():
        what = "global" if not window else f"window {window // 1024}K tokens ({100 * window / tokens:.1f}% of corpus)"
        delta = losses[steps[-1]] - base[steps[-1]]
        lines.append(" | ".join([what, str(seed), *(f"{losses[s]:.4f}" for s in steps), f"{delta:+.4f}"]))
    if args.markdown:
        lines.insert(1, " | ".join("---" for _ in head))
        lines = [f"| {line} |" for line in lines]
    print("\n".join(lines))
    print(f"\ncorpus: {tokens / 1e6:.2f} M training tokens; {args.steps} steps of 8 x 128 tokens")


if __name__ == "__main__":
    main()
