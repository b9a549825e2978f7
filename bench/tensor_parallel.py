"""What tensor parallelism (distributed.tensor_parallel_size, DeepSpeed's AutoTP) saves in each rank's memory, and
what it costs in step time against data parallelism on the same ranks, in one run.

Memory: for each TP size, torchrun with that many ranks (one tensor-parallel group, no data parallelism) builds a
Llama-style model (the llama-468m preset shrunk through model.overrides) and its engine the way a training run
does (training/setup.py: the run's settings through dist_clm's config, parallel/engine.deepspeed_config with
ZeRO-1 and AdamW in fp32, deepspeed.initialize, then parallel/tensor_parallel.install), and trains a step on
random tokens. Each rank then counts the bytes of the tensors it holds: its parameters, its gradients (after the
last backward of the step, before the update frees them), its optimizer state (ZeRO's fp32 master copy and Adam's
two moments). Each figure is split into the sharded matrices (the modules AutoTP replaced,
tensor_parallel.sharded_modules: attention and MLP projections, the output head) and the replicated rest
(embeddings, norms). The table shows the largest rank's. Target: at each TP size the sharded matrices' bytes per
rank are within 10% of 1/TP of TP=1's.

Step time: TP=2 against DP=2 (ZeRO-1), both on 2 ranks, the same model and global batch (so a TP rank runs twice
the micro batches of a DP rank, each through half of every matrix); after warm-up steps, the median of the timed
steps (each the slowest rank's). A figure for the record, no target.

    python bench/tensor_parallel.py [--markdown] [--sizes 1,2,4] [--quick] [--no-timing] [--json OUT]

--quick: a tiny model, TP 1 and 2, one step measured, one of warm-up and two timed (the tests run it with
--no-timing: the memory table alone, its launches at once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tables import render

REPO = Path(__file__).resolve().parents[1]
PRESET = "llama-468m"
# the preset shrunk so that it builds and trains a step in seconds on a CPU; heads and key/value heads divide by 4
FULL = dict(shape=dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=4,
                       intermediate_size=1536),
            vocab=8192, block=128, micro=4, global_batch=8, warmup=2, timed=5)  # fmt: skip
QUICK = dict(shape=dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                        intermediate_size=384),
             vocab=1024, block=32, micro=2, global_batch=4, warmup=1, timed=2)  # fmt: skip


def overrides_for(spec: dict, tp: int) -> list[str]:
    """The run's settings (what `dist-clm train` would be given) for one launch."""
    shape = [f"model.overrides.{k}={v}" for k, v in spec["shape"].items()]
    return [f"model.preset={PRESET}", *shape, f"data.block_size={spec['block']}", "distributed.zero_stage=1",
            f"distributed.tensor_parallel_size={tp}", "train.optimizer=adamw", "train.precision=fp32",
            f"train.micro_batch_size={spec['micro']}", f"train.global_batch_size={spec['global_batch']}",
            f"train.max_steps={spec['warmup'] + spec['timed'] + 1}"]  # fmt: skip


def engine_for(spec: dict, tp: int, env):
    """The model and engine as training/setup.py builds them, without the data: (engine, settings, micro batches
    per step)."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from dist_clm.config import load_config
    from dist_clm.models import loss_head
    from dist_clm.models.build import Shape, preset_config
    from dist_clm.parallel import fit, partitioned, tensor_parallel
    from dist_clm.parallel.engine import deepspeed_config, param_groups, resolve_grad_accum, scheduler_factory
    from dist_clm.training.setup import output_head

    cfg = load_config(None, overrides_for(spec, tp))
    t, d, m = cfg.train, cfg.distributed, cfg.model
    fit.check_world(d, env.world_size)
    grad_accum = resolve_grad_accum(t, env.world_size // d.ranks_per_batch)
    torch.manual_seed(t.seed)
    # (build_model's path for a preset; the vocabulary is the one a tokenizer of that size would give)
    model = AutoModelForCausalLM.from_config(preset_config(m.preset, m.overrides, spec["vocab"]),
                                             attn_implementation="sdpa")  # fmt: skip
    partitioned.initialize(model, t.seed)
    fused = t.loss_head != "plain" and loss_head.fits(model.config)
    fit.check_tensor_parallel(Shape.of(model.config), d.tensor_parallel_size)
    if d.tensor_parallel_size == 1:
        output_head(model, fused, cfg.data.document_mask)
    ds_config = deepspeed_config(t, cfg.optim, d, on_gpu=False, grad_accum=grad_accum)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim.weight_decay),
        config=ds_config,
        lr_scheduler=scheduler_factory(cfg.optim, t.max_steps),
    )
    if d.tensor_parallel_size > 1:
        tp = tensor_parallel.install(engine)
        output_head(engine.module, fused, cfg.data.document_mask, tp.group)
    return engine, cfg, grad_accum


def held(engine) -> dict[str, dict[str, int]]:
    """This rank's bytes of each parameter (by name): the parameter itself, its gradient (p.grad, or ZeRO's
    reduced copy on its partition) and its optimizer state (ZeRO's fp32 master copy, Adam's moments)."""
    import torch

    names = {id(p): n for n, p in engine.module.named_parameters()}
    out = {n: {"params": p.numel() * p.element_size(), "grads": 0, "optim": 0}
           for n, p in engine.module.named_parameters()}  # fmt: skip
    out[PADDING] = {"params": 0, "grads": 0, "optim": 0}
    seen = set()
    for n, p in engine.module.named_parameters():
        if p.grad is not None:
            out[n]["grads"] += p.grad.numel() * p.grad.element_size()
            seen.add(p.grad.untyped_storage().data_ptr())
    zero = engine.optimizer  # ZeRO 1-2: each group's fp32 partition, the inner optimizer's state on it
    for i, master in enumerate(zero.single_partition_of_fp32_groups):
        state = zero.optimizer.state.get(master, {})
        optim = [master, *(v for v in state.values() if torch.is_tensor(v) and v.numel() == master.numel())]
        grads = zero.averaged_gradients.get(i) if isinstance(zero.averaged_gradients, dict) else None
        grads = [g for g in (grads if isinstance(grads, list) else [grads]) if torch.is_tensor(g)]
        grads = [g for g in grads if g.untyped_storage().data_ptr() not in seen]
        for what, tensors in (("optim", optim), ("grads", grads)):
            per_element = sum(x.numel() * x.element_size() for x in tensors) / master.numel()
            for p, n in _in_partition(zero, i).items():
                out[names[id(p)]][what] += round(n * per_element)
            padding = master.numel() - sum(_in_partition(zero, i).values())
            out[PADDING][what] += round(padding * per_element)
    return out


PADDING = "(ZeRO's alignment padding)"


def _in_partition(zero, group: int) -> dict:
    """How many elements of each parameter this rank's partition of `group` holds."""
    left, offset, found = zero.single_partition_of_fp32_groups[group].numel(), zero.first_offset[group], {}
    for p in zero.params_in_partition[group]:
        found[p] = min(left, p.numel() - offset)
        left, offset = left - found[p], 0
    return found


def worker(spec: dict, tp: int, timed: bool) -> None:
    """One rank: a step, its bytes (collected on rank 0); then, if `timed`, the warm-up and timed steps. Rank 0
    prints the result as one JSON line."""
    import torch
    import torch.distributed as dist

    from dist_clm.models.attention import no_padding
    from dist_clm.parallel.process_group import init

    env = init()
    engine, cfg, grad_accum = engine_for(spec, tp, env)
    dp_rank = env.rank // tp  # (the ranks of a tensor-parallel group read the same micro batches)
    g = torch.Generator().manual_seed(1000 + dp_rank)

    def step(measure: bool = False) -> dict | None:
        found = None
        for micro in range(grad_accum):
            ids = torch.randint(0, spec["vocab"], (spec["micro"], spec["block"]), generator=g)
            loss = engine(input_ids=ids, labels=ids, attention_mask=no_padding(ids), use_cache=False).loss
            engine.backward(loss)
            if measure and micro == grad_accum - 1:
                found = held(engine)  # (the gradients of the whole step, before the update)
            engine.step()
        return found

    grads = step(measure=True)
    mine = held(engine)  # after the first update (Adam's moments exist), with the gradients of that step
    for name, found in grads.items():
        mine[name]["grads"] = found["grads"]
    everyone = [None] * env.world_size
    dist.all_gather_object(everyone, mine)
    seconds = []
    if timed:
        for i in range(spec["warmup"] + spec["timed"]):
            dist.barrier()
            start = time.perf_counter()
            step()
            took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(took, op=dist.ReduceOp.MAX)  # (the slowest rank's)
            if i >= spec["warmup"]:
                seconds.append(took.item())
    if env.is_main:
        import deepspeed

        result = {"tp": tp, "ranks": env.world_size, "grad_accum": grad_accum, "held": everyone,
                  "sharded": sharded_names(engine.module), "seconds": seconds,
                  "versions": f"torch {torch.__version__}, DeepSpeed {deepspeed.__version__}"}  # fmt: skip
        print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()


def sharded_names(model) -> list[str]:
    """The names of the parameters of the modules AutoTP replaced (none at TP=1)."""
    from dist_clm.parallel import tensor_parallel

    sharded = {id(m) for m in tensor_parallel.sharded_modules(model)}
    return [f"{name}.{n}" for name, m in model.named_modules() if id(m) in sharded for n, _ in m.named_parameters()]


def launch(spec: dict, ranks: int, tp: int, timed: bool) -> subprocess.Popen:
    """The worker under torchrun on `ranks` ranks with tensor parallelism `tp`, started (result() waits for it)."""
    from dist_clm.parallel.process_group import free_port

    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(ranks), "--master_port",
           str(free_port()), __file__, "--worker", json.dumps({"spec": spec, "tp": tp, "timed": timed})]  # fmt: skip
    threads = str(max(1, (os.cpu_count() or 1) // ranks))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": threads}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def result(run: subprocess.Popen, what: str) -> dict:
    out, err = run.communicate(timeout=1800)
    line = [x for x in out.splitlines() if x.startswith("RESULT ")]
    if run.returncode or not line:
        sys.exit(f"{what} failed:\n{err[-4000:]}")
    return json.loads(line[0][len("RESULT ") :])


KINDS = ("params", "grads", "optim")


def per_rank(found: dict, sharded: set[str]) -> dict[str, int]:
    """Bytes per rank of each kind (params, grads, optim) in the sharded matrices and in the replicated rest, the
    largest rank's of each."""
    out = {}
    for what in KINDS:
        for kind in ("sharded", "replicated"):
            out[f"{what}_{kind}"] = max(
                sum(f[what] for name, f in rank.items() if (name in sharded) == (kind == "sharded"))
                for rank in found["held"]
            )
    return out


def sharded_bytes(f: dict) -> int:
    return sum(f[f"{what}_sharded"] for what in KINDS)


def memory_table(results: dict[int, dict]) -> tuple[list[str], list[list[str]], dict[int, float]]:
    """The memory table and, per TP size, the sharded matrices' bytes per rank against TP=1's. The sharded
    matrices are those AutoTP replaced at the sizes above 1 (at TP=1 the same parameters, whole)."""
    sharded = {name for r in results.values() for name in r["sharded"]}
    figures = {tp: per_rank(r, sharded) for tp, r in results.items()}
    mib, base = 2**20, figures[1]

    def params_and_optim(f: dict) -> int:
        return sum(f[f"{w}_{k}"] for w in ("params", "optim") for k in ("sharded", "replicated"))

    head = ["TP", "params MiB", "grads MiB", "optimizer MiB", "sharded matrices MiB", "replicated MiB",
            "sharded vs TP=1", "that x TP (ideal 1.00)", "params+optimizer vs TP=1"]  # fmt: skip
    rows, ratios = [], {}
    for tp, f in sorted(figures.items()):
        ratios[tp] = sharded_bytes(f) / sharded_bytes(base)
        replicated = sum(f[f"{w}_replicated"] for w in KINDS)
        rows.append([str(tp), *(f"{(f[w + '_sharded'] + f[w + '_replicated']) / mib:.2f}" for w in KINDS),
                     f"{sharded_bytes(f) / mib:.2f}", f"{replicated / mib:.2f}", f"{ratios[tp]:.3f}",
                     f"{ratios[tp] * tp:.3f}", f"{params_and_optim(f) / params_and_optim(base):.3f}"])  # fmt: skip
    return head, rows, ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None, help="TP sizes (default 1,2,4; --quick: 1,2)")
    ap.add_argument("--quick", action="store_true", help="a tiny model, few steps (the tests)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--no-timing", action="store_true", help="the memory table only")
    ap.add_argument("--json", help="write the figures to this file as well")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        given = json.loads(args.worker)
        worker(given["spec"], given["tp"], given["timed"])
        return
    spec = QUICK if args.quick else FULL
    sizes = sorted(int(x) for x in (args.sizes or ("1,2" if args.quick else "1,2,4")).split(","))
    if 1 not in sizes or len(sizes) < 2:
        sys.exit("--sizes must include 1 (the baseline) and a size above it")
    # memory: the launches at once (the bytes a rank holds do not depend on the time it takes)
    runs = {tp: launch(spec, tp, tp, timed=False) for tp in sizes}
    results = {tp: result(run, f"TP={tp} on {tp} ranks") for tp, run in runs.items()}
    timing = {}
    if not args.no_timing:  # step time: one launch at a time, alone on the machine
        for name, tp in (("TP=2", 2), ("DP=2", 1)):
            timing[name] = result(launch(spec, 2, tp, timed=True), f"{name} on 2 ranks")

    shape = spec["shape"]
    model = (f"Llama-style hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
             f"{shape['num_attention_heads']} heads / {shape['num_key_value_heads']} kv heads, MLP "
             f"{shape['intermediate_size']}, vocabulary {spec['vocab']}, fp32, ZeRO-1 AdamW")  # fmt: skip
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {results[1]['versions']}, gloo"
    print(f"bytes per rank (the largest rank's) after one step, DP=1; {model}; {machine}")
    head, rows, ratios = memory_table(results)
    print(render(head, rows, args.markdown))
    print("\ntarget: the sharded matrices per rank within 10% of 1/TP of TP=1's: "
          + ", ".join(f"TP={tp} {r * tp:.3f} x 1/TP ({'met' if abs(r * tp - 1) <= 0.1 else 'NOT met'})"
                      for tp, r in ratios.items() if tp > 1))  # fmt: skip
    medians = {name: statistics.median(r["seconds"]) for name, r in timing.items()}
    if timing:
        print(
            f"\nstep time on 2 ranks, global batch {spec['global_batch']} blocks of {spec['block']} tokens, micro "
            f"batch {spec['micro']}; the median of {spec['timed']} steps after {spec['warmup']} of warm-up"
        )
        step_rows = [[name, str(r["grad_accum"]), f"{medians[name]:.3f}", f"{medians[name] / medians['DP=2']:.2f}"]
                     for name, r in timing.items()]  # fmt: skip
        print(render(["layout", "micro batches per rank", "median s/step", "vs DP=2"], step_rows, args.markdown))
    if args.json:
        Path(args.json).write_text(json.dumps({"ratios": ratios, "seconds": medians}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
