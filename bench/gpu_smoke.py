"""The correctness smoke of one device (bench/gpu_suite.sh runs it before the throughput table): dist_clm's own
commands, as a user runs them, on the `tiny` preset and the benchmark's prepared data.

    zero2 straight    `dist-clm train` bf16 ZeRO-2, 6 steps, a checkpoint at 3 (train.compile as by default:
                      on a GPU, compiled)
    zero2 resumed     a copy of it cut back to its checkpoint at 3 and resumed to 6: losses of steps 4-6 equal
                      the straight run's
    zero2 eager       the straight run with train.compile=false: losses equal the compiled run's
    zero3 resumed     the same two runs in ZeRO-3
    export            `dist-clm export` of the ZeRO-3 run: `dist-clm eval` of the export (transformers'
                      AutoModelForCausalLM.from_pretrained) equals that of the checkpoint, and transformers'
                      pipeline("text-generation") generates from it

"Equal" is to --rtol (relative, default 2e-2 on a GPU: bf16, and kernels whose reductions are not ordered the
same from run to run, such as the embedding's backward; on the CPU the resumed losses are bitwise equal and
the tolerance is 1e-6). Prints one line per check and a table; --json writes the results. Exit status 1 when
any check fails.

    python bench/gpu_smoke.py [--cpu] [--work DIR] [--json FILE] [--markdown] [--rtol R]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gpu_throughput import ROOT, TOKENIZER_VOCAB, child_env, prepared
from tables import render

STEPS, CUT = 6, 3


def dist_clm(work: Path, cpu: bool, *args: str) -> subprocess.CompletedProcess:
    env = child_env(work) | ({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})
    return subprocess.run([sys.executable, "-m", "dist_clm", *args], env=env, capture_output=True, text=True)


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def close(a: list[float], b: list[float], rtol: float) -> tuple[bool, float]:
    worst = max((abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True)), default=0.0)
    return len(a) == len(b) and worst <= rtol, worst


class Smoke:
    def __init__(self, args: argparse.Namespace, data: Path):
        self.args, self.data, self.results = args, data, []

    def train(self, name: str, zero: int, *extra: str) -> Path | None:
        run = Path(self.args.work) / "smoke" / name
        r = dist_clm(Path(self.args.work), self.args.cpu, "train", "model.preset=tiny", f"data.path={self.data}",
                     f"run.dir={run}", "data.block_size=128", "train.micro_batch_size=8", "train.precision=bf16",
                     f"train.zero_stage={zero}", f"train.max_steps={STEPS}", f"train.save_every={CUT}",
                     "train.keep_last=4", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0",
                     "train.eval_blocks=2", "run.tensorboard=false", "run.progress_bar=false", *extra)  # fmt: skip
        if r.returncode != 0:
            self.check(f"{name} trains", False, (r.stderr.strip().splitlines() or ["no output"])[-1][:200])
            return None
        return run

    def check(self, name: str, ok: bool, detail: str) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", file=sys.stderr, flush=True)
        self.results.append({"check": name, "ok": ok, "detail": detail})

    def resume(self, zero: int) -> Path | None:
        """A straight run of one ZeRO stage, then a copy of it cut back to its checkpoint at step CUT and
        resumed from there (as after a preemption); the straight run's directory."""
        straight = self.train(f"zero{zero}_straight", zero)
        if straight is None:
            return None
        cut = straight.with_name(f"zero{zero}_resumed")
        shutil.copytree(straight, cut)
        for late in (cut / "checkpoints").glob("step_*"):
            if int(late.name.split("_")[1]) > CUT:
                shutil.rmtree(late)
        (cut / "metrics.jsonl").write_text("")
        again = self.train(cut.name, zero)
        if again is None:
            return None
        a, b = losses(straight), losses(again)
        later = range(CUT + 1, STEPS + 1)
        ok, worst = close([b.get(s, float("nan")) for s in later], [a[s] for s in later], self.args.rtol)
        self.check(f"ZeRO-{zero} bf16 resumed at step {CUT} continues as the straight run", ok and sorted(b) ==
                   list(later), f"steps {CUT + 1}-{STEPS}: max relative difference {worst:.2e}")  # fmt: skip
        return straight

    def compiled_equals_eager(self, compiled: Path) -> None:
        eager = self.train("zero2_eager", 2, "train.compile=false")
        if eager is None:
            return
        a, b = losses(compiled), losses(eager)
        ok, worst = close([a[s] for s in sorted(a)], [b[s] for s in sorted(a)], self.args.rtol)
        mode = "both eager on the CPU" if self.args.cpu else "compiled vs eager"
        self.check("default train.compile equals eager", ok, f"{len(a)} steps ({mode}): max relative difference "
                   f"{worst:.2e}")  # fmt: skip

    def export_loads(self, run: Path) -> None:
        work = Path(self.args.work)
        out = work / "smoke" / "export"
        shutil.rmtree(out, ignore_errors=True)
        r = dist_clm(work, self.args.cpu, "export", str(run), "--out", str(out))
        if r.returncode != 0:
            self.check("export", False, (r.stderr.strip().splitlines() or ["no output"])[-1][:200])
            return
        args = ("--data", str(self.data), "--max-blocks", "2", "--block-size", "128", "--json")
        evals = [dist_clm(work, self.args.cpu, "eval", str(x), *args)
                 for x in (run, out)]  # the checkpoint, and the export through AutoModelForCausalLM  # fmt: skip
        code = (
            "import sys\nfrom transformers import pipeline\n"
            "print(pipeline('text-generation', model=sys.argv[1])('def ', max_new_tokens=8)[0]['generated_text'])"
        )
        env = child_env(work) | ({"CUDA_VISIBLE_DEVICES": ""} if self.args.cpu else {})
        gen = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True)
        failed = [x for x in (*evals, gen) if x.returncode != 0]
        if failed:
            last = (failed[0].stderr.strip().splitlines() or ["no output"])[-1]
            self.check("export loads in transformers", False, last[:200])
            return
        ours, theirs = (json.loads(x.stdout.strip().splitlines()[-1])["loss"] for x in evals)
        ok, worst = close([theirs], [ours], self.args.rtol)
        self.check("export loads in transformers", ok, f"validation loss {theirs:.4f} (export) vs {ours:.4f} "
                   f"(checkpoint); pipeline generated {gen.stdout.strip()[:40]!r}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="on the CPU (default without CUDA)")
    ap.add_argument("--work", default="/tmp/dist_clm_gpu_smoke")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--rtol", type=float, default=None)
    args = ap.parse_args()
    import torch

    args.cpu = args.cpu or not torch.cuda.is_available()
    args.rtol = args.rtol if args.rtol is not None else (1e-6 if args.cpu else 2e-2)
    work = Path(args.work)
    shutil.rmtree(work / "smoke", ignore_errors=True)
    start = time.perf_counter()
    smoke = Smoke(args, prepared(work, TOKENIZER_VOCAB["cpu" if args.cpu else "gpu"]))
    zero2 = smoke.resume(2)
    if zero2 is not None:
        smoke.compiled_equals_eager(zero2)
    zero3 = smoke.resume(3)
    if zero3 is not None:
        smoke.export_loads(zero3)
    rows = [[r["check"], "ok" if r["ok"] else "FAILED", r["detail"]] for r in smoke.results]
    print(render(["check", "result", "detail"], rows, args.markdown))
    print(f"\n{'CPU' if args.cpu else torch.cuda.get_device_name(0)}; {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(smoke.results, indent=2))
    sys.exit(0 if smoke.results and all(r["ok"] for r in smoke.results) else 1)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
