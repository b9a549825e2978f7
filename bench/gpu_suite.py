"""The GPU suite: what a lent GPU should measure, in one process, most valuable first, within a time budget.

    python bench/gpu_suite.py [--out DIR] [--budget SECONDS] [--cpu] [--only NAMES] [--data DIR] [--work DIR]
                              [--rtol R] [--plan]

One process builds its tokenizer and prepared data once (a 32000-token BPE over 300 files of the Python standard
library, ~5 MB, into MDS shards), then runs the items of `plan()` in order: the correctness checks of
bench/gpu_smoke.py (dist_clm's own train, resume, export, eval and generate, called in this process) and the rows
of bench/gpu_throughput.py's table (GPT-2 124M at 1024 x 32 and llama-468m at 2048 x 16; 3 warm-up steps, 5 for a
compiled row, then 10 timed). torch.compile's caches are reset before each item, so every compiled row compiles
its own model, as a fresh process would (its on-disk cache, kept under --work, still serves later compilations),
and no run falls back to eager when a function's recompilation limit is reached.

--budget S bounds the whole run's wall time, counted from the interpreter's start. Before each item the suite
estimates its cost (its figure in `plan()`, scaled up by how much slower than estimated the items so far ran)
and stops when the elapsed time plus that estimate would pass S; the items it skipped are printed and written.
A lent GPU's window is 15 minutes with the machine's start and the wheels' install in it: --budget 540 fits in
one 10-minute command.

OUT/results.jsonl (--out, default gpu_suite_out) holds one JSON object a line, each written, flushed and fsynced
the moment it exists: the plan, every check, every row, every item's seconds against its estimate, and what was
skipped. A run cut off by the window's end keeps everything it measured. OUT/summary.md (checks, table, timings)
is written at the end. Exit status 1 when a check or a row failed; skipped items are not failures.

Without a GPU it refuses in one sentence unless given --cpu; then it prints the GPU plan and runs the same items
scaled down (the `tiny` preset, a 4096-token BPE, 2 (compiled: 3) warm-up and 5 timed steps; the flex row, which
needs FlexAttention's backward, is the GPU's alone). --plan prints both plans and exits.
"""

from __future__ import annotations

import time

START = time.monotonic()  # (before the imports: the budget counts the interpreter's start-up and torch's import)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import gpu_throughput as throughput  # noqa: E402 (puts the checkout on sys.path: dist_clm imports from it)
from gpu_smoke import Smoke  # noqa: E402
from tables import render  # noqa: E402

GPU_PLAN = "on a GPU the suite runs, in this order (estimated seconds: guesses until a GPU run measures them):"
WARMUP_STEPS = {"gpu": (3, 5, 10), "cpu": (2, 3, 5)}  # (eager warm-up, compiled warm-up, timed steps) per row


@dataclass(frozen=True)
class Item:
    """One thing the suite measures: a name for --only and the records, what it runs, and its estimated seconds."""

    name: str
    gpu_s: float  # on one H100/H200 within this suite: a guess until a GPU run's results.jsonl measures it
    cpu_s: float  # on the 2-core CPU machine, --cpu, measured there (with the other items before it)
    run: Callable[[Suite], None]
    what: str
    on_cpu: bool = True  # False: the CPU cannot run it (said in `what`)


def check(method: str) -> Callable[[Suite], None]:
    return lambda suite: getattr(suite.smoke, method)()


def resume(zero: int, what: str = "", *extra: str) -> Callable[[Suite], None]:
    return lambda suite: suite.smoke.resume(zero, what, *extra)


def row(slot: int, variant: str, cpu: bool) -> Item:
    """The throughput table's row of `variant` for the device's model `slot` (the CPU has the tiny model in the
    first slot's place, and no second)."""
    model = (throughput.CPU_MODELS if cpu and slot == 0 else throughput.GPU_MODELS)[slot]
    compiled = "compile" in variant
    gpu_s = (75 if compiled else 30) * (1.25 if slot else 1)
    cpu_s, on_cpu = (40 if compiled else 3), slot == 0 and variant != "dist_clm-compile-docmask-flex"
    run = lambda suite: suite.row(slot, variant)  # noqa: E731
    return Item(f"row/{model}/{variant}", gpu_s, cpu_s, run, f"throughput: {throughput.VARIANTS[variant]}", on_cpu)


def plan(cpu: bool) -> list[Item]:
    """Every item, most valuable first: correctness before speed (a figure of a wrong run is worth nothing), the
    cheap checks that gate every later figure first, then the table's headline pair (dist_clm against the plain
    compiled loop, the open target), then the costlier checks, the larger model's pair, the open question of
    document masking (flash against flex), and the rest of the table last (the eager rows, the plain loss head,
    SDPA's dense mask: figures the pairs above already bracket)."""
    first_rest = ("dist_clm", "plain", "dist_clm-compile-plain-head", "dist_clm-compile-docmask-sdpa")
    moe, muon = ("MoE ", "model.preset=tiny-moe"), ("Muon ", "train.optimizer=muon", "optim.grad_clip=0")
    return [
        Item("data", 60, 20, lambda s: s.prepare(), "tokenizer and MDS shards of the stdlib corpus, once"),
        # training runs, resumes exactly and compiles to the same losses: what every later figure stands on
        Item("zero2-resume", 90, 25, resume(2), "train() bf16 ZeRO-2 (default compile) resumed = straight"),
        Item("compile-equals-eager", 25, 60, check("compiled_equals_eager"), "ZeRO-2 compiled losses = eager"),
        # cheap (seconds), and each guards a silent error: attention across documents, a device left unused
        Item("document-masks", 15, 25, check("document_masks"), "flex (flash) logits = SDPA's dense doc mask"),
        Item("eval-generate", 15, 3, check("inference_on_device"), "dist-clm eval and generate use the device"),
        Item("loss-head", 10, 3, check("loss_head_time"), "the fused loss head's time against the plain head's"),
        Item("watching", 20, 8, check("watching"), "time split, profile, memory snapshot, flight recorder, OOM"),
        # the headline: dist_clm's compiled loop against the plain compiled loop (target >= 1.00)
        row(0, "plain-compile", cpu),
        row(0, "dist_clm-compile", cpu),
        # ZeRO-3: its own partitioning, checkpoint and export paths
        Item("zero3-resume", 60, 12, resume(3), "train() bf16 ZeRO-3 resumed = straight"),
        Item("export", 30, 3, check("export_loads"), "the ZeRO-3 export loads in transformers, evaluates the same"),
        Item("zero3-ckpt-compile", 60, 70, check("checkpointing_compiled"), "ZeRO-3 + act. ckpt compiled = eager"),
        row(1, "plain-compile", cpu),
        row(1, "dist_clm-compile", cpu),
        # the open question of document masking: flash attention's varlen kernel against flex's block mask
        row(0, "dist_clm-compile-docmask-flex", cpu),
        row(0, "dist_clm-compile-docmask", cpu),
        # paths the CPU tests cover too (MoE's router and experts, Muon's update under ZeRO)
        Item("moe-resume", 60, 8, resume(3, *moe), "the tiny-moe preset, ZeRO-3, resumed = straight"),
        Item("muon-resume", 60, 25, resume(2, *muon), "train.optimizer=muon, ZeRO-2, resumed = straight"),
        *(row(0, v, cpu) for v in first_rest),
        *(row(1, v, cpu) for v in (*first_rest, "dist_clm-compile-docmask-flex", "dist_clm-compile-docmask")),
    ]


class Results:
    """OUT/results.jsonl: each record written, flushed and fsynced the moment it exists (a run cut off keeps
    everything before the cut), with its time since the interpreter's start."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w")
        self.records: list[dict] = []

    def write(self, kind: str, **fields) -> None:
        record = {"kind": kind, "t": round(time.monotonic() - START, 2), **fields}
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def of(self, kind: str) -> list[dict]:
        return [r for r in self.records if r["kind"] == kind]


class Suite:
    """The items' shared state: the data, the checks' runs, the results; the budget's bookkeeping."""

    def __init__(self, args: argparse.Namespace, results: Results):
        self.args, self.results, self.cpu = args, results, args.cpu
        self.work = Path(args.work)
        self.data: Path | None = Path(args.data) if args.data else None
        self.estimated = self.spent = 0.0  # over the items run so far: their estimates and their seconds
        self._smoke: Smoke | None = None

    @property
    def smoke(self) -> Smoke:
        if self._smoke is None:
            record = lambda result: self.record_check(result)  # noqa: E731
            self._smoke = Smoke(self.cpu, self.prepare(), self.work, self.args.rtol, record)
        return self._smoke

    def record_check(self, result: dict) -> None:
        print(f"{'ok  ' if result['ok'] else 'FAIL'} {result['check']}: {result['detail']}", flush=True)
        self.results.write("check", **result)

    def prepare(self) -> Path:
        if self.data is None:
            self.data = throughput.prepared(self.work, throughput.TOKENIZER_VOCAB["cpu" if self.cpu else "gpu"])
        return self.data

    def row(self, slot: int, variant: str) -> None:
        """One row of the throughput table, in this process (its own compiled model)."""
        model = (throughput.CPU_MODELS if self.cpu else throughput.GPU_MODELS)[slot]
        eager, compiled, steps = WARMUP_STEPS["cpu" if self.cpu else "gpu"]
        warmup = compiled if "compile" in variant else eager
        try:
            out = throughput.measure(model, variant, self.prepare(), self.work, warmup, steps, self.cpu)
        except Exception as e:  # noqa: BLE001 (a failed row is a row that says so; the next ones run)
            traceback.print_exc()
            out = {"model": model, "variant": variant, "error": one_line(e)}
        self.results.write("row", **out)
        said = out.get("error") or f"{out['tok_s'] / 1e3:.1f} K tok/s, start-up {out['startup_s']:.0f} s"
        print(f"row {model} | {throughput.VARIANTS[variant]}: {said}", flush=True)

    def estimate(self, item: Item) -> float:
        """The item's estimated seconds, scaled up by how much slower than estimated the items so far ran."""
        base = item.cpu_s if self.cpu else item.gpu_s
        if item.name == "data" and self.data is not None:
            return 0.0
        return base * max(1.0, self.spent / self.estimated if self.estimated else 1.0)

    def run(self, item: Item) -> None:
        """One item, timed; a check that raises is a failed check (with its traceback on stderr)."""
        import torch

        torch._dynamo.reset()  # (each item compiles its own; no function nears its recompilation limit)
        estimate, t, cpu_t = self.estimate(item), time.monotonic(), cpu_seconds()
        print(f"== {item.name}: {item.what} (~{estimate:.0f} s)", flush=True)
        try:
            item.run(self)
        except Exception as e:  # noqa: BLE001 (reported as the item's failed check; the next items run)
            traceback.print_exc()
            self.record_check({"check": item.name, "ok": False, "detail": one_line(e)})
        seconds = time.monotonic() - t
        if estimate:
            self.estimated, self.spent = self.estimated + estimate, self.spent + seconds
        self.results.write(
            "item",
            item=item.name,
            seconds=round(seconds, 2),
            estimate_s=round(estimate, 1),
            cpu_s=round(cpu_seconds() - cpu_t, 2),
        )  # (this process's and its children's)
        release_engines()
        if not self.cpu:
            torch.cuda.empty_cache()


def release_engines() -> None:
    """Destroy the DeepSpeed engines this process's train() calls left: train() leaves its engine to the process's
    end, and the gradient hooks it registers (held by torch outside Python's garbage collector) keep the engine,
    its weights and its optimizer states alive. Without this, each later row would run, and its peak memory be
    counted, on top of every earlier run's."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    for engine in [o for o in gc.get_objects() if issubclass(type(o), DeepSpeedEngine)]:  # (type: no proxy asked)
        engine.destroy()
    gc.collect()


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its waited-for children (torch.compile's workers): beside the
    wall time, what an item costs on a machine that others share."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def plan_lines(items: list[Item], cpu: bool) -> list[str]:
    total, lines = 0.0, []
    for i, item in enumerate(items, 1):
        cost = item.cpu_s if cpu else item.gpu_s
        total += cost
        lines.append(f"  {i:2d}. {item.name:<44} ~{cost:3.0f} s (by then ~{total:4.0f} s)  {item.what}")
    return lines


def selected(items: list[Item], cpu: bool, only: str | None) -> list[Item]:
    """The items this device runs (the data first, always), narrowed to --only's names."""
    here = [i for i in items if i.on_cpu or not cpu]
    if not only:
        return here
    names = only.split(",")
    unknown = [n for n in names if n not in {i.name for i in here}]
    if unknown:
        sys.exit(f"gpu_suite: no item {unknown[0]!r} on this device; --plan lists them.")
    return [i for i in here if i.name == "data" or i.name in names]


def refuse_without_gpu() -> None:
    """One sentence, exit 2, where no CUDA device is visible (and --cpu was not given)."""
    import torch

    if torch.cuda.is_available():
        return
    why = ("this torch is a CPU build" if torch.version.cuda is None else
           f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU; nvidia-smi tells whether there is "
           "none or its driver is older than that CUDA")  # fmt: skip
    print(f"gpu_suite: no GPU here ({why}); add --cpu for the scaled-down run on the CPU.", file=sys.stderr)
    sys.exit(2)


def summary(suite: Suite, skipped: list[str]) -> str:
    """The checks, the table, each item's seconds and what was skipped, as markdown."""
    r = suite.results
    checks = [[c["check"], "ok" if c["ok"] else "FAILED", c["detail"]] for c in r.of("check")]
    items = [[i["item"], f"{i['seconds']:.0f}", f"{i['estimate_s']:.0f}", f"{i['cpu_s']:.0f}"] for i in r.of("item")]
    rows = [{k: v for k, v in x.items() if k not in ("kind", "t")} for x in r.of("row")]
    parts = [render(["check", "result", "detail"], checks, True)]
    if rows:
        parts.append("\n".join(throughput.table(rows, suite.cpu, True)))
    parts.append(render(["item", "seconds", "estimated", "CPU seconds"], items, True))
    if skipped:
        parts.append(f"skipped (beyond --budget {suite.args.budget:.0f} s): {', '.join(skipped)}")
    parts.append(f"{throughput.machine_line(suite.cpu)}; {time.monotonic() - START:.0f} s in all")
    return "\n\n".join(parts) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_suite_out", help="results.jsonl and summary.md go here")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default: no limit)")
    ap.add_argument("--cpu", action="store_true", help="the scaled-down run on the CPU (without it: a GPU or refuse)")
    ap.add_argument("--only", default=None, help="comma-separated item names (--plan lists them); data always runs")
    ap.add_argument("--data", default=None, help="a directory `dist-clm prepare` wrote, instead of the suite's own")
    ap.add_argument("--work", default="/tmp/dist_clm_gpu_suite", help="scratch; the prepared data is kept for reruns")
    ap.add_argument("--rtol", type=float, default=None, help="relative tolerance of every equality check")
    ap.add_argument("--plan", action="store_true", help="print the GPU's and the CPU's plans and exit")
    args = ap.parse_args()
    if args.plan:
        print(GPU_PLAN, *plan_lines(selected(plan(False), False, None), False), "on the CPU (--cpu):",
              *plan_lines(selected(plan(True), True, None), True), sep="\n")  # fmt: skip
        return
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # (before torch starts: train() picks a visible GPU)
    else:
        refuse_without_gpu()
    from dist_clm.parallel.process_group import use_cpu_accelerator_if_no_gpu

    use_cpu_accelerator_if_no_gpu()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(args.work) / "inductor_cache"))
    items = selected(plan(args.cpu), args.cpu, args.only)
    if args.cpu:
        print(GPU_PLAN, *plan_lines(selected(plan(False), False, None), False), sep="\n")
    print(f"here ({'the CPU, scaled down' if args.cpu else 'the GPU'}), budget "
          f"{f'{args.budget:.0f} s' if args.budget else 'none'}:", *plan_lines(items, args.cpu), sep="\n")  # fmt: skip
    results = Results(Path(args.out) / "results.jsonl")
    results.write("plan", device="cpu" if args.cpu else "gpu", budget_s=args.budget, items=[i.name for i in items])
    suite = Suite(args, results)
    skipped: list[str] = []
    for n, item in enumerate(items):
        if args.budget is not None and time.monotonic() - START + suite.estimate(item) > args.budget:
            skipped = [i.name for i in items[n:]]
            elapsed = time.monotonic() - START
            results.write("skipped", items=skipped, elapsed_s=round(elapsed, 1), next_estimate_s=suite.estimate(item))
            print(f"stopped at {elapsed:.0f} s: {item.name} (~{suite.estimate(item):.0f} s) would pass --budget "
                  f"{args.budget:.0f} s; skipped: {', '.join(skipped)}", flush=True)  # fmt: skip
            break
        suite.run(item)
    text = summary(suite, skipped)
    (Path(args.out) / "summary.md").write_text(text)
    print("\n" + text)
    failed = [c for c in results.of("check") if not c["ok"]] + [r for r in results.of("row") if "error" in r]
    results.write("end", seconds=round(time.monotonic() - START, 1), failed=len(failed), skipped=len(skipped))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
