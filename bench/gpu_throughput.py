"""Training throughput on one GPU, side by side, in one run (a benchmark, not a test): dist_clm's training path
beside a plain PyTorch loop on the same model and the same batches.

    plain, eager          the usual hand-written loop: the HF model built by dist_clm.models.build.build_model, fp32
                          weights on the GPU, torch.autocast("cuda", bfloat16), loss.backward(),
                          clip_grad_norm_(optim.clip(...)), torch.optim.AdamW(param_groups(...), fused=True),
                          the same LambdaLR schedule (scheduler_factory), zero_grad(set_to_none=True)
    plain, torch.compile  the same loop over torch.compile(model)
    dist_clm, eager       dist_clm's own training loop, run as it is: dist_clm.training.loop.train(cfg) (a world of
                          one; DeepSpeed ZeRO-2, bf16 weights, fp32 master copy, torch's fused AdamW), timed
                          through its on_step callback. Every step is train_step (the micro batches, the
                          step's one agreement, the loss guard, backward, engine.step), the loader's and the
                          train state's bookkeeping, and the every-10-steps log (one all_reduce; lr, grad norm,
                          tok/s, MFU, memory; metrics.jsonl). Validation runs once before the first step (one
                          block); TensorBoard, the progress bar and periodic checkpoints are off, and the
                          callback ends the run after the last timed step (no final validation or checkpoint)
    dist_clm, compile     the same with train.compile=true (engine.compile())
    ..., plain loss head  the same with train.loss_head=plain: the logits of the whole micro batch, then the
                          cross-entropy (dist_clm's default is the fused, chunked head of dist_clm/models/loss_head.py)
    ..., document mask    dist_clm compiled with data.document_mask=true (attention stays inside each packed
                          document): on SDPA (model.attention=sdpa: a dense 4-D mask), on FlexAttention's
                          block-sparse mask (model.attention=flex_attention), and on what model.attention=auto
                          picks (on a GPU flash_attention_2 fed the documents' bounds where flash_attn is
                          installed, else flex_attention; the row names it): flash against flex side by side

Models (--models): GPT-2 124M (preset gpt2-124m) at seq 1024 x batch 32 and the Llama-style 468M (preset
llama-468m: hidden 1024, 24 layers, 16 heads, MLP 4096) at seq 2048 x batch 16. Data: the default corpus of
`dist-clm prepare` (300 files of the Python standard library, ~5 MB), tokenized once with a 32000-token
byte-level BPE (`dist-clm tokenizer train --vocab-size 32000`) and prepared once into MDS shards (`dist-clm
prepare --tokenizer TOK --out DIR`, no inputs); both models read that directory. Each model's embedding table
is set by `model.overrides.vocab_size` to its own vocabulary: 50257 for GPT-2 (GPT-2's, so the model is the
124M of the reference; the data's ids are all below 32000) and 32000 for the 468M (the BPE may stop a little
short of 32000 tokens on 5 MB). All variants take their batches from the same TrainLoader (dist_clm's
streaming packer over the prepared shards, shuffled, 0 workers, micro batch = batch, one rank, built by
TrainLoader.from_config), so each pays the same data cost, and each starts from the same weights
(torch.manual_seed(train.seed) before build_model, and transformers' initialization from the seed again after
it, parallel/partitioned.initialize, as train() does).

Every variant runs in a fresh subprocess (`--one VARIANT`) so that compile caches, CUDA memory and the process
group do not carry over from one to the next. Each runs W warm-up steps (they include torch.compile's
compilation), then N timed steps between two torch.cuda.synchronize() calls (W >= 1). A child's output goes to
WORK/logs/MODEL_VARIANT.log, with timestamped set-up phases; a child that fails or outlives --timeout becomes a
"failed" row (the end of its log is printed), and the others still run. Each result is also printed to stderr
as it comes, and --json rewrites FILE after every row, so a run cut short keeps what it measured.

Columns:
    model           the preset, and its parameter count (count_params, embeddings included; a Mixture-of-Experts
                    model's active ones per token beside it)
    seq x batch     tokens per block x blocks per step (one micro batch, no accumulation)
    variant         one of the above
    tok/s           N x batch x seq / the timed seconds
    MFU             tok/s x flops_per_token(config, active params, seq) / the GPU's peak dense bf16 FLOP/s
                    (observability.metrics.peak_flops: 989e12 for H100/H200); '-' where the peak is unknown (CPU)
    vs plain compile  tok/s over that of "plain, torch.compile" for the same model in this run (the target
                    for dist_clm: >= 1.00 at both sizes)
    peak GPU GiB    torch.cuda.max_memory_allocated over the whole subprocess (compilation included); on CPU
                    the column is "peak RSS GiB", the process's peak resident memory
    start-up s      wall time from the variant's set-up to the end of its W warm-up steps: the model on the
                    device, optimizer and loader (plain), or everything train() does before its first step
                    (dist_clm: engine, loader, one validation block); compilation for the compiled variants
    loss            mean training loss over the timed steps: a check that both loops train the same thing. They
                    start from the same weights and see the same blocks with the same schedule, so the two eager
                    rows of a model should nearly agree, and the two compiled rows (which warm up longer, so
                    they time later blocks); in fp32 on CPU they agree to the last digit

On CPU (`--cpu`, or when CUDA is not available) the same comparison runs on the `tiny` preset with a 4096-token
BPE, seq 128 x batch 8, fp32 (train.precision auto -> fp32; no autocast, AdamW without fused) and few steps.

    python bench/gpu_throughput.py [--quick] [--markdown] [--models gpt2-124m,llama-468m] [--variants ...]
                                   [--work DIR] [--cpu] [--warmup W] [--steps N] [--timeout S] [--json FILE]

Default steps: 10 warm-up (15 for compiled variants) + 30 timed; --quick: 3 (5) + 10. Needs deepspeed and
mosaicml-streaming importable; dist_clm is imported from this checkout (no install needed).

On a GPU machine whose image has torch and transformers but not the rest (from the repo root, with the wheels
of deepspeed, mosaicml-streaming and their dependencies in .whl/): install the wheels to a side directory, then
run (~5-8 min, mostly cold torch.compile):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site-packages .whl/*.whl
    PYTHONPATH=/tmp/site-packages python3 bench/gpu_throughput.py --markdown --work /tmp/gbench --json $OUT/g.jsonl

bench/gpu_suite.py runs this table's rows with --quick's steps in its own process (measure(), one row at a time),
after and between the correctness checks, within a time budget.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout where dist_clm is not installed (the GPU machine)
    sys.path.insert(0, str(ROOT))

# name -> preset, the model's vocabulary (model.overrides.vocab_size), seq, batch
MODELS = {
    "gpt2-124m": dict(preset="gpt2-124m", vocab=50257, seq=1024, batch=32),
    "llama-468m": dict(preset="llama-468m", vocab=32000, seq=2048, batch=16),
    "tiny": dict(preset="tiny", vocab=4096, seq=128, batch=8),
    # a Mixture-of-Experts model beside a dense one of its active size (the same attention; one SwiGLU MLP as wide
    # as the top-k experts together): what sparsity costs per token
    "moe-1b": dict(preset="moe-1b", vocab=32000, seq=2048, batch=8),
    "moe-1b-dense": dict(
        preset="llama-468m",
        vocab=32000,
        seq=2048,
        batch=8,
        overrides=dict(num_hidden_layers=16, num_key_value_heads=4, intermediate_size=2304),
    ),
    "tiny-moe": dict(preset="tiny-moe", vocab=4096, seq=128, batch=8),
    "tiny-moe-dense": dict(preset="tiny-llama", vocab=4096, seq=128, batch=8, overrides=dict(intermediate_size=192)),
}
GPU_MODELS, CPU_MODELS = ("gpt2-124m", "llama-468m"), ("tiny",)
TOKENIZER_VOCAB = {"gpu": 32000, "cpu": 4096}
VARIANTS = {  # name -> row label; the table's order
    "plain": "plain, eager",
    "plain-compile": "plain, torch.compile",
    "dist_clm": "dist_clm ZeRO-2, eager",
    "dist_clm-compile": "dist_clm ZeRO-2, engine.compile",
    "dist_clm-compile-plain-head": "dist_clm ZeRO-2, engine.compile, plain loss head",
    "dist_clm-compile-docmask-sdpa": "dist_clm ZeRO-2, engine.compile, document mask on SDPA",
    "dist_clm-compile-docmask-flex": "dist_clm ZeRO-2, engine.compile, document mask on flex_attention",
    "dist_clm-compile-docmask": "dist_clm ZeRO-2, engine.compile, document mask on model.attention=auto",
}
# the target's pair first; the plain loss head (train.loss_head=plain) beside the fused default; document
# masking on SDPA's dense mask and on what model.attention=auto picks (block-sparse on a GPU)
RUN_ORDER = ("plain-compile", "dist_clm-compile", "dist_clm", "plain", "dist_clm-compile-plain-head",
             "dist_clm-compile-docmask-sdpa", "dist_clm-compile-docmask-flex", "dist_clm-compile-docmask")  # fmt: skip
REFERENCE = (
    "reference figures (H200, plain loop): 124M 379 K tok/s compiled (33% MFU), 207 K eager; DeepSpeed ZeRO-2 "
    "249 K eager, 306 K engine.compile; 468M 121 K compiled (42% MFU), 87 K eager. "
    "Target: dist_clm >= 1.00 x the compiled plain loop at both sizes."
)


# ----------------------------------------------------------------------------------------------------------
# the parent: data once, one subprocess per variant, the table


def child_env(work: Path) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor_cache"),
    }


def prepared(work: Path, vocab: int) -> Path:
    """The stdlib corpus tokenized with a `vocab`-token BPE into MDS shards, made once under `work` (in this process:
    what `dist-clm tokenizer train` and `dist-clm prepare` with no inputs run)."""
    from dist_clm.data import sources
    from dist_clm.data.prepare import prepare
    from dist_clm.data.tokenizer import train_bpe

    tok, out = work / f"bpe{vocab}", work / f"stdlib_bpe{vocab}"
    if not (out / "manifest.json").is_file():
        t = time.perf_counter()
        if not (tok / "tokenizer.json").is_file():
            shutil.rmtree(tok, ignore_errors=True)
            train_bpe(sources.iter_documents(sources.default_corpus_files()), tok, vocab_size=vocab)
        shutil.rmtree(out, ignore_errors=True)
        prepare(tok, out, None, progress=False)
        print(f"data: {out} prepared in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return out


def run_child(args: argparse.Namespace, work: Path, data: Path, model: str, variant: str) -> dict:
    """One variant in a fresh process; its JSON result, or {"error": ...} with the tail of its log."""
    compiled = "compile" in variant
    if args.warmup is not None:
        warmup = args.warmup
    else:
        warmup = (5 if compiled else 3) if args.quick else (15 if compiled else 10)
    steps = args.steps or (10 if args.quick else 30)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    log, result = logs / f"{model}_{variant}.log", logs / f"{model}_{variant}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", variant, "--models", model, "--data", str(data)]
    cmd += ["--warmup", str(warmup), "--steps", str(steps), "--result", str(result), "--work", str(work)]
    cmd += ["--cpu"] if args.cpu else []
    t = time.perf_counter()
    with log.open("w") as f:
        # in this process's session (a kill of this one reaches it); a stuck child goes with its compile workers
        env = child_env(work) | ({"CUDA_VISIBLE_DEVICES": ""} if args.cpu else {})  # train() picks the GPU
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            import psutil

            tree = [proc, *psutil.Process(proc.pid).children(recursive=True)]
            for p in reversed(tree):
                with contextlib.suppress(psutil.Error, ProcessLookupError):
                    p.kill()
            proc.wait()
            rc = f"killed after {args.timeout:.0f} s"
    wall = time.perf_counter() - t
    if rc == 0 and result.is_file():
        out = json.loads(result.read_text())
        print(
            f"{model} | {VARIANTS[variant]}: {out['tok_s'] / 1e3:.1f} K tok/s"
            + (f", MFU {out['mfu']:.1%}" if out["mfu"] else "")
            + f", peak {out['peak_gib']:.2f} GiB, start-up {out['startup_s']:.0f} s, loss {out['loss']:.3f} "
            f"({wall:.0f} s in all)",
            file=sys.stderr,
        )
        return {**out, "wall_s": wall}
    status = f"exit status {rc}" if isinstance(rc, int) else rc
    tail = log.read_text(errors="replace").splitlines()[-25:]
    print(f"{model} | {VARIANTS[variant]}: FAILED ({status}); last lines of {log}:", file=sys.stderr)
    print("\n".join("    " + line for line in tail), file=sys.stderr)
    return {"model": model, "variant": variant, "error": f"{status}, see {log.relative_to(work)}", "wall_s": wall}


def machine_line(cpu: bool) -> str:
    import torch
    import transformers

    from dist_clm.parallel.process_group import use_cpu_accelerator_if_no_gpu

    use_cpu_accelerator_if_no_gpu()
    try:
        import deepspeed

        ds = deepspeed.__version__
    except Exception as e:  # noqa: BLE001 (reported, not fatal: the plain rows still run)
        ds = f"not importable ({type(e).__name__})"
    where = "CPU" if cpu else torch.cuda.get_device_name(0)
    return (
        f"{where}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores; Python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"deepspeed {ds}"
    )


def table(rows: list[dict], cpu: bool, markdown: bool) -> list[str]:
    mem = "peak RSS GiB" if cpu else "peak GPU GiB"
    head = ["model", "seq x batch", "variant", "tok/s", "MFU", "vs plain compile", mem, "start-up s", "loss"]
    lines = [" | ".join(head)]
    base = {r["model"]: r["tok_s"] for r in rows if r["variant"] == "plain-compile" and "error" not in r}
    order = {v: i for i, v in enumerate(VARIANTS)}
    for r in sorted(rows, key=lambda r: (list(MODELS).index(r["model"]), order[r["variant"]])):
        m = MODELS[r["model"]]
        active = f", {r['active'] / 1e6:.0f} M active" if r.get("active", r.get("params")) != r.get("params") else ""
        name = r["model"] + (f" ({r['params'] / 1e6:.0f} M{active})" if "params" in r else "")
        masked = "docmask" in r["variant"] and "attention" in r
        label = VARIANTS[r["variant"]] + (f" ({r['attention']})" if masked else "")
        cells = [name, f"{m['seq']} x {m['batch']}", label]
        if "error" in r:
            cells += [f"failed: {r['error']}", "-", "-", "-", "-", "-"]
        else:
            ratio = f"{r['tok_s'] / base[r['model']]:.2f}" if r["model"] in base else "-"
            cells += [
                f"{r['tok_s'] / 1e3:.1f} K",
                f"{r['mfu']:.1%}" if r["mfu"] else "-",
                ratio,
                f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-",
                f"{r['startup_s']:.1f}",
                f"{r['loss']:.3f}",
            ]
        lines.append(" | ".join(cells))
    if markdown:
        lines.insert(1, " | ".join("---" for _ in head))
        lines = [f"| {line} |" for line in lines]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps: 3 warm-up (5 compiled) + 10 timed")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="the CPU comparison (tiny model); default without CUDA")
    ap.add_argument("--models", default=None, help=f"comma-separated, of {', '.join(MODELS)} (default: per device)")
    ap.add_argument("--variants", default=",".join(RUN_ORDER), help="comma-separated, run in this order")
    ap.add_argument("--work", default=None, help="scratch directory, kept for reruns (default: a temporary one)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 10, compiled 15)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 30, --quick 10)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per variant before it is killed (300)")
    ap.add_argument("--json", default=None, help="also write the rows to this file (one JSON object a line)")
    ap.add_argument("--one", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    args.cpu = args.cpu or not torch.cuda.is_available()
    if args.warmup is not None and args.warmup < 1:
        raise SystemExit("--warmup must be at least 1 (the timing starts at the end of a warm-up step)")
    if args.one:
        one(args)
        return
    models = args.models.split(",") if args.models else list(CPU_MODELS if args.cpu else GPU_MODELS)
    variants = args.variants.split(",")
    if args.cpu and args.variants == ap.get_default("variants"):  # (FlexAttention has no backward on the CPU)
        variants.remove("dist_clm-compile-docmask-flex")
    for name, known in (("model", MODELS), ("variant", VARIANTS)):
        bad = [x for x in (models if name == "model" else variants) if x not in known]
        if bad:
            raise SystemExit(f"unknown {name} {bad[0]!r}; choose from {', '.join(known)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = prepared(work, TOKENIZER_VOCAB["cpu" if args.cpu else "gpu"])
    rows = []
    for model in models:
        for variant in variants:
            rows.append(run_child(args, work, data, model, variant))
            if args.json:
                Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("\n".join(table(rows, args.cpu, args.markdown)))
    steps = rows[0].get("steps", "?") if rows else "?"
    print(
        f"\nmachine: {machine_line(args.cpu)}; {steps} timed steps per row{' (--quick)' if args.quick else ''}; "
        f"{time.perf_counter() - t0:.0f} s in all"
    )
    if not args.cpu:
        print(REFERENCE)
    if not args.work:
        if any("error" in r for r in rows):
            print(f"kept {work} for the failed variants' logs", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# a child: one variant of one model


START = time.perf_counter()


def phase(what: str) -> None:
    """A timestamped line in the child's log (logs/MODEL_VARIANT.log under --work): where set-up time goes."""
    print(f"[{time.perf_counter() - START:7.1f} s] {what}", file=sys.stderr, flush=True)


DOCMASK_ATTENTION = {"sdpa": "sdpa", "flex": "flex_attention"}  # the document-mask rows that name their attention


def variant_overrides(model: str, variant: str, data: str | Path, run_dir: str | Path, warmup: int, steps: int):
    """The training config of one variant, as `dist-clm train` overrides."""
    m = MODELS[model]
    return [
        f"run.dir={run_dir}",
        "run.tensorboard=false",
        "run.progress_bar=false",
        f"data.path={data}",
        f"data.block_size={m['seq']}",
        f"model.preset={m['preset']}",
        f"model.overrides.vocab_size={m['vocab']}",
        *(f"model.overrides.{k}={v}" for k, v in m.get("overrides", {}).items()),
        f"train.micro_batch_size={m['batch']}",
        f"train.max_steps={warmup + steps}",
        f"optim.warmup_steps={min(warmup, 30)}",
        f"train.compile={'true' if 'compile' in variant else 'false'}",
        f"train.loss_head={'plain' if variant.endswith('plain-head') else 'auto'}",
        f"data.document_mask={'true' if 'docmask' in variant else 'false'}",
        f"model.attention={DOCMASK_ATTENTION.get(variant.rsplit('-', 1)[-1], 'auto')}",
        "train.eval_every=0",
        "train.eval_blocks=1",
        "checkpoint.save_every=0",
    ]


def one(args: argparse.Namespace) -> None:
    """A child: one variant of one model, its result written to --result (and printed)."""
    out = measure(args.models, args.one, args.data, Path(args.work), args.warmup, args.steps, args.cpu, fresh=True)
    Path(args.result).write_text(json.dumps(out))
    phase("done")
    print(json.dumps(out))


def measure(model_name: str, variant: str, data: str | Path, work: Path, warmup: int, steps: int, cpu: bool,
            fresh: bool = False) -> dict:  # fmt: skip
    """One row of the table, in this process: `variant` of `model_name`, W warm-up then N timed steps. Peak
    memory: the GPU's over this row (its counters reset first); on the CPU the process's peak resident memory
    when the process is `fresh` (ran this row alone), else None (a process's peak says nothing of one row)."""
    import torch

    from dist_clm.config import load_config
    from dist_clm.data.run_data import run_tokenizer, training_sources
    from dist_clm.models.attention import attention_for, build_model_with
    from dist_clm.models.build import active_params, build_model, count_params, flops_per_token
    from dist_clm.observability.metrics import peak_flops
    from dist_clm.parallel.engine import resolve_precision
    from dist_clm.parallel.partitioned import initialize

    m = MODELS[model_name]
    run_dir = work / "runs" / f"{model_name}_{variant}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(None, variant_overrides(model_name, variant, data, run_dir, warmup, steps))
    device = "cpu" if cpu else "cuda:0"
    if not cpu:
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    sources = training_sources(cfg.data)
    tok = run_tokenizer(sources)
    torch.manual_seed(cfg.train.seed)
    if variant.startswith("dist_clm"):  # train() builds its own; this one is only counted
        precision = resolve_precision(cfg.train.precision, device != "cpu")
        attention = attention_for(cfg.model.attention, cfg.data.document_mask, device != "cpu", precision)
        with torch.device("meta"):  # (with the attention train() picks, to name it)
            model = build_model_with(attention, cfg.model.preset, cfg.model.pretrained, cfg.model.overrides, tok,
                                     cfg.data.document_mask)  # fmt: skip
        res = dist_clm_loop(cfg, device, warmup, steps)
    else:
        model = build_model(cfg.model.preset, cfg.model.pretrained, cfg.model.overrides, tok)
        if not cfg.model.pretrained:
            initialize(model, cfg.train.seed)  # (transformers' initialization from the seed again, as train() does)
        phase("model built")
        res = plain_loop(cfg, model, sources, device, warmup, steps)
    n_params, n_active = count_params(model), active_params(model)
    flops = flops_per_token(model.config, n_active, cfg.data.block_size)

    tok_s = steps * m["batch"] * m["seq"] / res["seconds"]
    peak = peak_flops(device)
    if device == "cpu":
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 if fresh else None  # KiB on Linux
    else:
        mem = max(res.get("peak_gib", 0.0), torch.cuda.max_memory_allocated(torch.device(device)) / 2**30)
    return {
        "model": model_name,
        "variant": variant,
        "preset": m["preset"],
        "seq": m["seq"],
        "batch": m["batch"],
        "params": n_params,
        "active": n_active,
        "flops_per_token": flops,
        "warmup": warmup,
        "steps": steps,
        "startup_s": res["startup_s"],
        "seconds": res["seconds"],
        "tok_s": tok_s,
        "mfu": tok_s * flops / peak if peak else None,
        "peak_gib": mem,
        "loss": sum(res["losses"]) / len(res["losses"]),
        "losses": res["losses"],
        "device": "cpu" if device == "cpu" else torch.cuda.get_device_name(torch.device(device)),
        "attention": model.config._attn_implementation,
    }


def sync(device: str) -> None:
    import torch

    if device != "cpu":
        torch.cuda.synchronize(torch.device(device))


def plain_loop(cfg, model, sources, device: str, warmup: int, steps: int) -> dict:
    """The hand-written loop: fp32 weights, autocast bf16 (on GPU), fused AdamW, clip, LambdaLR."""
    import torch

    from dist_clm.data.loader import TrainLoader
    from dist_clm.parallel.engine import param_groups, resolve_precision, scheduler_factory

    start = time.perf_counter()
    t, o = cfg.train, cfg.optim
    on_gpu = device != "cpu"
    if on_gpu:
        torch.cuda.set_device(torch.device(device))
    bf16 = resolve_precision(t.precision, on_gpu) == "bf16"
    model = model.to(device=device, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(
        param_groups(model, o.weight_decay),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        **({"fused": True} if on_gpu else {}),
    )
    sched = scheduler_factory(o, t.max_steps)(opt)
    fwd = torch.compile(model) if t.compile else model
    batches = iter(TrainLoader.from_config(cfg.data, t, sources, rank=0, world=1, grad_accum=1))
    losses = []

    def step() -> torch.Tensor:
        batch = next(batches)
        batch.pop("source")
        inputs = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device_type="cuda" if on_gpu else "cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = fwd(**inputs, use_cache=False).loss
        loss.backward()
        if o.clip(cfg.train.optimizer):
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip(cfg.train.optimizer))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().float()

    phase("set up; warm-up steps")
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    phase("warmed up; timed steps")
    for _ in range(steps):
        losses.append(step())  # kept on the device: no host sync inside the timed steps
    sync(device)
    seconds = time.perf_counter() - t0
    return {"startup_s": t0 - start, "seconds": seconds, "losses": [float(x) for x in losses]}


class TimedStepsDone(Exception):
    """Raised by the on_step callback after the last timed step: the run ends there."""


def dist_clm_loop(cfg, device: str, warmup: int, steps: int) -> dict:
    """dist_clm's train() itself, timed from the end of warm-up step W to the end of step W + N."""
    import torch

    from dist_clm.training.loop import train

    start, marks, losses, peak = time.perf_counter(), {}, [], [0.0]

    def on_step(state, result) -> None:
        if device != "cpu":  # (the log window resets the peak counters: the maximum is kept here)
            peak[0] = max(peak[0], torch.cuda.max_memory_allocated(torch.device(device)) / 2**30)
        if state.step == warmup:
            sync(device)
            marks["t0"] = time.perf_counter()
            phase("warmed up; timed steps")
        elif state.step > warmup:
            losses.append(result.loss)  # the step's agreed loss: already on the host
        if state.step == warmup + steps:
            sync(device)
            marks["t1"] = time.perf_counter()
            raise TimedStepsDone

    phase("train() starts")
    with contextlib.suppress(TimedStepsDone):
        train(cfg, on_step=on_step)
    return {"startup_s": marks["t0"] - start, "seconds": marks["t1"] - marks["t0"], "losses": losses,
            "peak_gib": peak[0]}  # fmt: skip


if __name__ == "__main__":
    main()
