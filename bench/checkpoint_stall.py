"""How long a checkpoint save stops the step loop, side by side in one run: synchronous saving
(checkpoint.async_save=false: every rank waits until its files are written and fsynced) vs background saving
(checkpoint.async_save=true, the default: the loop waits for a host copy of its share, a thread writes it).

Both runs are `dist-clm train` under torchrun with 2 ranks on this machine's CPU: GPT-2 124M (preset gpt2-124m
with GPT-2's 50257-token vocabulary), fp32, ZeRO-2, one block of 128 tokens per rank per step, a save every
--every steps and at the end. Each save's figures come from the run's own metrics.jsonl (checkpoint/blocked_s:
seconds the step loop waited for it, the completion included; checkpoint/save_s: from its start to its
completion marker). The table counts the saves inside the run (the last one, which ends the run, waits for its
files by design). Target: background saving blocks the loop at most 20% of the synchronous save's time.

    python bench/checkpoint_stall.py [--markdown] [--work DIR] [--steps N] [--every K]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gpu_throughput import child_env, prepared
from tables import render


def run(work: Path, data: Path, async_save: bool, steps: int, every: int) -> dict:
    """One training run; the in-run saves' blocked and total seconds, and the run's seconds per step."""
    out = work / f"run_async_{async_save}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "dist_clm", "train",
           "model.preset=gpt2-124m", "model.overrides.vocab_size=50257", f"data.path={data}", f"run.dir={out}",
           "data.block_size=128", "train.micro_batch_size=1", "distributed.zero_stage=2", "train.precision=fp32",
           f"train.max_steps={steps}", f"checkpoint.save_every={every}", f"checkpoint.keep_last={steps}",
           "train.log_every=1",
           "optim.warmup_steps=2", "train.eval_every=0", "train.eval_blocks=1",
           f"checkpoint.async_save={str(async_save).lower()}",
           "run.tensorboard=false", "run.progress_bar=false"]  # fmt: skip
    env = child_env(work) | {"OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"the run with checkpoint.async_save={async_save} failed (exit status {proc.returncode})")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    saves = [r for r in rows if "checkpoint/step" in r and r["checkpoint/step"] < steps]
    step_s = [2 * 128 / r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r]  # 2 ranks x 128
    return {
        "blocked": [r["checkpoint/blocked_s"] for r in saves],
        "total": [r["checkpoint/save_s"] for r in saves],
        "wall": time.perf_counter() - start,
        "step_s": statistics.median(step_s) if step_s else float("nan"),
        "size": sum(p.stat().st_size for p in sorted((out / "checkpoints").glob("step_*"))[-1].rglob("*")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--work", default="/tmp/dist_clm_ckpt_bench")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--every", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = prepared(work, 4096)
    sync = run(work, data, False, args.steps, args.every)
    bg = run(work, data, True, args.steps, args.every)
    base = statistics.mean(sync["blocked"])
    head = ["saving", "saves", "loop blocked per save s", "vs synchronous", "save to marker s", "median step s"]
    body = []
    for name, r in (("synchronous", sync), ("background", bg)):
        blocked = statistics.mean(r["blocked"])
        body.append([name, str(len(r["blocked"])), f"{blocked:.2f}", f"{blocked / base:.2f}",
                     f"{statistics.mean(r['total']):.2f}", f"{r['step_s']:.2f}"])  # fmt: skip
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; checkpoint of "
          f"{sync['size'] / 2**30:.2f} GiB per save over 2 ranks (GPT-2 124M fp32 ZeRO-2)")  # fmt: skip
    print(render(head, body, args.markdown))


if __name__ == "__main__":
    main()
