"""Activation memory per rank against block length under sequence parallelism (distributed.sequence_parallel_size
1, 2, 4), and the longest block that trains within a fixed memory budget, side by side in one run.

Each size runs under torchrun with that many ranks (gloo on the CPU; NCCL on GPUs): a Llama-style model (hidden
256, 4 layers, 8 heads, 4 key/value heads, no document masking) through dist_clm's own sequence-parallel install
(parallel/sequence_parallel.py) and a DeepSpeed ZeRO-2 engine, one micro batch of one row per length, forward and
backward. A rank's figure is its peak memory during the pass above what it held just before: on the CPU its peak
resident memory (the allocator's free memory returned to the system first, and the kernel's high-water mark reset
through /proc/self/clear_refs), on a GPU torch's peak allocated memory. A warm-up pass allocates DeepSpeed's
buffers first. The table shows the largest rank's. The longest block within the budget
is found by doubling the length until a pass needs more, then halving the step between the last that fitted and
the first that did not (to 1/8 of it). Target: at SP=4, at least 3.5x the longest block at SP=1.

    python bench/sequence_parallel_memory.py [--markdown] [--sizes 1,2,4] [--lengths 1024,2048,4096,8192]
                                             [--budget-mib 512]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from tables import render

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, hidden_size=256,
             intermediate_size=688, vocab_size=1024, tie_word_embeddings=False)  # fmt: skip


def worker(size: int, lengths: list[int], budget: int) -> None:
    """One rank: its peak per length (ascending), then the budget search; rank 0 prints JSON."""
    import deepspeed
    import psutil
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dist_clm.models import loss_head
    from dist_clm.models.attention import no_padding
    from dist_clm.parallel import sequence_parallel
    from dist_clm.parallel.process_group import init

    env = init()
    gpu = env.device != "cpu"
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", max_position_embeddings=1 << 20, **MODEL)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    loss_head.install(model)
    mpu = sequence_parallel.groups(size) if size > 1 else None
    if mpu is not None:
        sequence_parallel.install(model, size, mpu)  # (ZeRO-2: no loss scale, see fit_reduction)
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}, "bf16": {"enabled": gpu},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}  # fmt: skip
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds, mpu=mpu)

    libc = ctypes.CDLL("libc.so.6")

    def resident() -> int:
        libc.malloc_trim(0)  # (glibc keeps freed memory resident otherwise: the baseline would creep up)
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark (VmHWM) from now
        return psutil.Process().memory_info().rss

    def high_water() -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    def peak(length: int) -> int:
        """Bytes above the baseline at the peak of one forward and backward pass of one row (the same on every
        rank of the result: the largest rank's)."""
        ids = torch.randint(0, MODEL["vocab_size"], (1, length), device=env.device)
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = resident()
        inputs = {"input_ids": ids, "attention_mask": no_padding(ids)}  # (what the training step gives the model)
        loss = engine(**inputs, labels=ids, use_cache=False).loss
        engine.backward(loss)
        engine.zero_grad()  # (no update: the weights stay as they were for the next length)
        used = (torch.cuda.max_memory_allocated() if gpu else high_water()) - before
        worst = torch.tensor([max(used, 0)], device=env.device)
        torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
        return int(worst.item())

    peak(min(lengths))  # warm-up: DeepSpeed's buffers and the allocator's first pools
    table = {length: peak(length) for length in sorted(lengths)}
    fits, length = 0, max(lengths)
    while peak(length) <= budget:
        fits, length = length, length * 2
    step = (length - fits) // 2
    while step >= max(lengths) // 8 and step % size == 0:
        if peak(fits + step) <= budget:
            fits += step
        step //= 2
    if env.is_main:
        print("RESULT " + json.dumps({"size": size, "peaks": table, "longest": fits}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--sizes", default="1,2,4")
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--budget-mib", type=int, default=512)
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    budget = args.budget_mib * 2**20
    if args.worker:
        worker(args.worker, lengths, budget)
        return
    results = {}
    for size in (int(x) for x in args.sizes.split(",")):
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(size), "--master_port",
               str(29400 + size), __file__, "--worker", str(size), "--lengths", args.lengths, "--budget-mib",
               str(args.budget_mib)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // size))}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode or not line:
            sys.exit(f"SP={size} failed:\n{r.stderr[-3000:]}")
        got = json.loads(line[0][len("RESULT ") :])
        results[size] = got
    sizes = sorted(results)
    head = ["block length", *(f"SP={s} MiB/rank" for s in sizes), *(f"SP=1 / SP={s}" for s in sizes[1:])]
    rows = []
    for length in lengths:
        peaks = [results[s]["peaks"][str(length)] for s in sizes]
        rows.append([str(length), *(f"{p / 2**20:.0f}" for p in peaks), *(f"{peaks[0] / p:.2f}x" for p in peaks[1:])])
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(
        f"activation memory per rank (the largest rank's), {platform.machine()} {device}, Llama-style hidden 256 x 4 "
        "layers, one row, forward + backward, ZeRO-2"
    )
    print(render(head, rows, args.markdown))
    longest = [results[s]["longest"] for s in sizes]
    print(f"\nlongest block within {args.budget_mib} MiB per rank")
    print(render(["SP", "longest block", "vs SP=1"],
                 [[str(s), str(n), f"{n / longest[0]:.2f}x"] for s, n in zip(sizes, longest, strict=True)],
                 args.markdown))  # fmt: skip
    if 4 in results:
        ratio = results[4]["longest"] / results[sizes[0]]["longest"]
        print(
            f"\ntarget: SP=4 trains a block >= 3.5x SP=1's within the budget: {ratio:.2f}x "
            f"({'met' if ratio >= 3.5 else 'NOT met'})"
        )


if __name__ == "__main__":
    main()
