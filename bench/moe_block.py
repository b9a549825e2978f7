"""One Mixture-of-Experts layer, forward and backward, side by side in one process: transformers' Qwen3-MoE block
(a Python loop over the experts its tokens reach) against dist_clm's sync-free experts
(dist_clm/models/moe_experts.py) on the same weights, by its grouped product and by its tiled one.

The shape is moe-1b's layer scaled down in width (32 experts, top 4; hidden and expert width / 4 by default) on
one micro batch of tokens. Each variant: the fastest of --repeats timed forward+backward passes (the variants
taking turns) after a warm-up; its graph breaks under torch._dynamo.explain; on a GPU also the host syncs of
one forward+backward (torch.cuda.set_sync_debug_mode's warnings).

    python bench/moe_block.py [--markdown] [--tokens 2048] [--hidden 256] [--expert-width 144] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import time
import warnings

import torch
from tables import render
from transformers import AutoConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from dist_clm.models import moe_experts


def blocks(hidden: int, width: int, device: str, dtype) -> dict[str, torch.nn.Module]:
    """transformers' block and two copies switched to the sync-free experts (grouped, tiled)."""
    config = AutoConfig.for_model("qwen3_moe", hidden_size=hidden, moe_intermediate_size=width, num_experts=32,
                                  num_experts_per_tok=4, norm_topk_prob=True)  # fmt: skip
    torch.manual_seed(0)
    theirs = Qwen3MoeSparseMoeBlock(config)
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.02)
    theirs = theirs.to(device, dtype)
    ours = copy.deepcopy(theirs)
    moe_experts.make_sync_free(ours)
    return {"transformers (loop over experts)": theirs, "sync-free, grouped": ours, "sync-free, tiled": ours}


def step(block, x) -> torch.Tensor:
    out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    out.float().square().mean().backward()
    return out


def timed(variants: dict, x, repeats: int) -> dict[str, float]:
    """The fastest forward+backward seconds of each variant (on a machine under other load, the least disturbed
    pass), the variants taking turns, after one warm-up round."""
    times = {name: [] for name in variants}
    for _ in range(repeats + 1):
        for name, block in variants.items():
            with tiled(name):
                block.zero_grad(set_to_none=True)
                if x.is_cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                step(block, x)
                if x.is_cuda:
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    return {name: min(t[1:]) for name, t in times.items()}


@contextlib.contextmanager
def tiled(name: str):
    """The tiled product for the variant that names it (on the CPU; a GPU decides by its own conditions)."""
    grouped = moe_experts._GROUPED_ON_CPU
    moe_experts._GROUPED_ON_CPU = grouped and "tiled" not in name
    try:
        yield
    finally:
        moe_experts._GROUPED_ON_CPU = grouped


def host_syncs(block, x) -> int | None:
    """The synchronizing calls of one forward+backward on a GPU (None on the CPU, where there are none)."""
    if not x.is_cuda:
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(block, x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def graph_breaks(block, x) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(block)(x).graph_break_count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--expert-width", type=int, default=144)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(1, args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    variants = blocks(args.hidden, args.expert_width, device, dtype)
    seconds = timed(variants, x, args.repeats)
    rows, base = [], seconds[next(iter(variants))]
    for name, block in variants.items():
        with tiled(name):
            syncs, breaks = host_syncs(block, x), graph_breaks(block, x)
        rows.append([name, f"{seconds[name] * 1e3:.1f}", f"{base / seconds[name]:.2f}", str(breaks),
                     "-" if syncs is None else str(syncs)])  # fmt: skip
    where = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"{args.tokens} tokens, hidden {args.hidden}, 32 experts of width {args.expert_width}, top 4; {device} "
          f"({where}), {dtype}, torch {torch.__version__}")  # fmt: skip
    head = ["MoE block", "forward+backward (ms)", "speed-up", "graph breaks", "host syncs"]
    print(render(head, rows, args.markdown))


if __name__ == "__main__":
    main()
