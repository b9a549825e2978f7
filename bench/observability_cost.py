"""What watching a run costs: steps/s of dist_clm's own training loop with the time split off (its marks made no-ops),
as it ships (the time split on: every log window splits its wall time), and with the PyTorch profiler recording
every timed step (train.profile_steps), in one run, side by side (a benchmark, not a test).

Each variant runs dist_clm.training.loop.train(cfg) in a fresh subprocess (a world of one, on the GPU where there
is one, else the CPU), on the prepared data given (or a small corpus it prepares), timed through train()'s
on_step callback from the end of W warm-up steps to the end of W + N. The variants take turns (A B C A B C ...)
for R rounds, so that a drift of the machine's speed falls on all of them; the table gives each variant's median
steps/s and its ratio to the time split off.

    python bench/observability_cost.py [--data DIR] [--rounds 3] [--steps 30] [--warmup 3] [--markdown]

Variants:
    time split off   observability.timing.Phases.mark replaced by a no-op in that subprocess (the log window
                     still reduces, with zeros in the split's slots)
    time split on    train() as it is (log every 5 steps)
    profiled         the same, with train.profile_steps covering every timed step (record_shapes and
                     profile_memory on, as dist_clm sets them); the trace is written after the last one, outside
                     the timed span
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_throughput import prepared  # (the stdlib corpus, tokenized once: the GPU table's own data step)
from tables import render

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("time split off", "time split on", "profiled")
MODEL = ["model.preset=tiny", "model.overrides.n_embd=128", "model.overrides.n_layer=4", "data.block_size=128",
         "train.micro_batch_size=8"]  # fmt: skip


class TimedStepsDone(Exception):
    pass


def one(variant: str, data: str, run_dir: str, warmup: int, steps: int) -> dict:
    """In the subprocess: train() timed over steps warmup+1 .. warmup+steps."""
    from dist_clm.config import load_config
    from dist_clm.training.loop import train

    if variant == "time split off":
        from dist_clm.observability import timing

        timing.Phases.mark = lambda self, name: None
    extra = [f"train.profile_steps=[{warmup + 1}, {warmup + steps + 1}]"] if variant == "profiled" else []
    cfg = load_config(None, [*MODEL, f"data.path={data}", f"run.dir={run_dir}", f"train.max_steps={warmup + steps + 2}",
                             "train.log_every=5", "train.eval_every=0", "train.eval_blocks=1",
                             "checkpoint.save_every=0", "run.progress_bar=false", "run.loggers=[jsonl]",
                             *extra])  # fmt: skip
    marks = {}

    def on_step(progress, result) -> None:
        if progress.step == warmup:
            marks["t0"] = time.perf_counter()
        if progress.step == warmup + steps:
            marks["t1"] = time.perf_counter()
            raise TimedStepsDone

    with contextlib.suppress(TimedStepsDone):
        train(cfg, on_step=on_step)
    return {"steps_per_s": steps / (marks["t1"] - marks["t0"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="a prepared directory (default: the stdlib corpus, prepared once into --work)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "dist_clm_observability_cost"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.data, args.run_dir, args.warmup, args.steps)))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = args.data or str(prepared(work, 4096))
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in VARIANTS:
            run_dir = work / f"run_{r}_{variant.replace(' ', '_')}"
            cmd = [sys.executable, __file__, "--one", variant, "--data", data, "--run-dir", str(run_dir),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            if out.returncode:
                sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
            rates[variant].append(json.loads(out.stdout.strip().splitlines()[-1])["steps_per_s"])
            print(f"round {r + 1}, {variant}: {rates[variant][-1]:.2f} steps/s", file=sys.stderr)
    base = statistics.median(rates[VARIANTS[0]])
    rows = [[v, f"{statistics.median(rates[v]):.2f}", f"{statistics.median(rates[v]) / base:.3f}",
             " ".join(f"{x:.2f}" for x in rates[v])] for v in VARIANTS]  # fmt: skip
    import torch

    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"{where}; torch {torch.__version__}; {args.rounds} rounds of {args.steps} timed steps "
          f"(after {args.warmup}); model: {' '.join(MODEL)}")  # fmt: skip
    print(render(["variant", "steps/s (median)", "vs time split off", "each round"], rows, args.markdown))


if __name__ == "__main__":
    main()
