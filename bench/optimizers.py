"""AdamW against Muon on the quick-start model, side by side in one run (a benchmark, not a test).

The quick start's data (a 4096-token BPE on the embedded corpus, prepared once) and its training settings
(dist_clm.quickstart.TRAIN_SETTINGS: the tiny GPT-2, 1000 steps of 8 x 128 tokens, cosine schedule, ZeRO-2), each
variant trained by dist_clm.training.loop.train in a fresh process of its own:

    adamw           the quick start as it is (optim.lr 3e-3, optim.grad_clip 1)
    adamw, no clip  the same without gradient clipping (Muon runs without it)
    muon            train.optimizer=muon, optim.grad_clip=0: Muon at optim.muon_lr (0.02) for the hidden matrices,
                    AdamW at optim.lr for embeddings, head, norms and biases

Columns: validation loss at each evaluation (the same 32 blocks for every variant), and seconds per step (the
median over log windows of 8 x 128 tokens over train/tokens_per_s; the first window, with Muon's compilation,
left out).

    python bench/optimizers.py [--work DIR] [--steps N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "adamw": [],
    "adamw, no clip": ["optim.grad_clip=0"],
    "muon": ["train.optimizer=muon", "optim.grad_clip=0"],
}


def prepared(work: Path) -> Path:
    """The quick start's tokenizer and data, made once under `work`."""
    from dist_clm.data import sources
    from dist_clm.data.prepare import prepare
    from dist_clm.data.tokenizer import train_bpe

    data = work / "data"
    if not (data / "manifest.json").is_file():
        files = sources.default_corpus_files()
        train_bpe(sources.iter_documents(files), work / "tokenizer", vocab_size=4096)
        prepare(work / "tokenizer", data, None, val_fraction=0.05, chunk_tokens=8192, progress=False)
    return data


def one(data: Path, run: Path, overrides: list[str]) -> dict:
    """Train one variant in this process; its validation losses and seconds per step."""
    from dist_clm.config import load_config
    from dist_clm.quickstart import TRAIN_SETTINGS
    from dist_clm.training.loop import train

    cfg = load_config(None, [f"data.path={data}", f"run.dir={run}", *TRAIN_SETTINGS, "run.progress_bar=false",
                             "checkpoint.save_every=0", *overrides])  # fmt: skip
    train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r][1:]
    tokens = cfg.train.micro_batch_size * cfg.data.block_size
    return {
        "val": {r["step"]: r["val/loss"] for r in rows if "val/loss" in r},
        "s_per_step": tokens / statistics.median(rates),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=1000, help="training steps (the quick start's 1000)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="optimizers_"))
    work.mkdir(parents=True, exist_ok=True)
    steps = [f"train.max_steps={args.steps}", f"train.eval_every={args.steps // 4}"]
    if args.one:
        result = one(work / "data", work / "runs" / args.one.replace(", ", "_"), [*steps, *VARIANTS[args.one]])
        (work / "result.json").write_text(json.dumps(result))
        return
    prepared(work)
    results = {}
    for name in VARIANTS:  # each in a fresh process (DeepSpeed's process group, compile caches)
        cmd = [sys.executable, __file__, "--work", str(work), "--steps", str(args.steps), "--one", name]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        results[name] = json.loads((work / "result.json").read_text())
    evals = sorted(int(s) for s in results["adamw"]["val"])
    head = ["variant", *(f"val loss @{s}" for s in evals), "s/step", "vs adamw"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    base = results["adamw"]["s_per_step"]
    for name, r in results.items():
        cells = [name, *(f"{r['val'][str(s)]:.4f}" for s in evals),
                 f"{r['s_per_step']:.3f}", f"{r['s_per_step'] / base:.2f}"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
