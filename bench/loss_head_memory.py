"""Peak memory and time of the loss head, side by side in one run: the plain head (logits for every token, then
cross-entropy, as transformers computes it) vs dist_clm's fused chunked head (dist_clm/models/loss_head.py), forward
and backward, in two regimes on this machine's CPU:

- wide vocabulary, narrow model: a 128K vocabulary, micro batch 4 x 1024, hidden 768, fp32 (the logits dominate:
  target, the fused head's peak at least 4x below the plain head's);
- a 70B-class model at one row: hidden 8192, a 128K vocabulary, 4096 tokens, bf16, every dimension divided by
  --scale (8: hidden 1024, vocabulary 16K, 512 tokens) so it runs in seconds. The weight's gradient (V x H)
  dominates here; every term of either head's peak is a product of two dimensions (tokens x V, V x H, tokens x H,
  tokens x chunk with the chunk's columns divided too, so there are as many chunks as at full size), so the
  ratios hold at full size and the GiB grow by scale^2. Target: the fused head's peak at most the plain head's.

Each variant runs in a fresh process; its peak is the process's peak resident memory above what it held just
before the loss (the weight, the hidden states and their gradients' buffers excluded as far as they were
allocated before).

    python bench/loss_head_memory.py [--markdown] [--scale S] [--only wide|70b]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil
from tables import render


@dataclass(frozen=True)
class Regime:
    name: str
    vocab: int
    batch: int
    length: int
    hidden: int
    dtype: str
    target: float  # the plain head's peak over the fused head's at its default chunks, at least


def regimes(scale: int) -> dict[str, Regime]:
    return {
        "wide": Regime("vocab 128K, 4 x 1024 tokens, hidden 768, fp32", 128 * 1024, 4, 1024, 768, "float32", 4),
        "70b": Regime(
            f"70B-class row / {scale}: vocab {128 // scale}K, {4096 // scale} tokens, hidden {8192 // scale}, bf16",
            128 * 1024 // scale, 1, 4096 // scale, 8192 // scale, "bfloat16", 1,
        ),
    }  # fmt: skip


def child(variant: str, r: Regime) -> None:
    import torch

    from dist_clm.models.loss_head import causal_lm_loss

    torch.manual_seed(0)
    dtype = getattr(torch, r.dtype)
    h = torch.randn(r.batch, r.length, r.hidden).to(dtype).requires_grad_()
    w = (torch.randn(r.vocab, r.hidden) / r.hidden**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, r.vocab, (r.batch, r.length))
    h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)  # (the gradients' own buffers: in the baseline)
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if variant == "plain":
        logits = (h @ w.T).float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, r.vocab), labels[:, 1:].reshape(-1), ignore_index=-100
        )
    else:
        loss = causal_lm_loss(h, w, labels, chunk=int(variant))
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak - before, "seconds": seconds, "loss": loss.item()}))


def measure(key: str, variant: str, scale: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", f"{key}:{variant}", "--scale", str(scale)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--scale", type=int, default=8, help="the 70B-class row's dimensions divided by this")
    ap.add_argument("--only", choices=("wide", "70b"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    table = regimes(args.scale)
    if args.child:
        key, variant = args.child.split(":")
        child(variant, table[key])
        return
    from dist_clm.models.loss_head import chunk_columns

    head = ["regime", "loss head", "peak above baseline (GiB)", "fused / plain peak", "forward+backward (s)",
            "fused / plain time", "loss", "target"]  # fmt: skip
    rows = []
    for key, r in table.items():
        if args.only and key != args.only:
            continue
        tokens = r.batch * r.length
        # the default chunk as at full size (70B row: its columns divided by the scale, as many chunks)
        default = chunk_columns(tokens, r.vocab) if key == "wide" else chunk_columns(4096, 128 * 1024) // args.scale
        plain = measure(key, "plain", args.scale)
        rows.append([r.name, "plain (logits, then cross-entropy)", f"{plain['peak'] / 2**30:.3f}", "1.00",
                     f"{plain['seconds']:.2f}", "1.00", f"{plain['loss']:.6f}", ""])  # fmt: skip
        for columns in (default, default // 4, min(4 * default, r.vocab)):
            f = measure(key, str(columns), args.scale)
            share = f["peak"] / max(plain["peak"], 1)
            ok = share * r.target <= 1
            goal = ("<= plain" if r.target == 1 else f">= {r.target:g}x below plain") + f": {'yes' if ok else 'NO'}"
            name = f"fused, {-(-r.vocab // columns)} chunks of {columns} columns" + " (default)" * (columns == default)
            rows.append([r.name, name, f"{f['peak'] / 2**30:.3f}", f"{share:.2f}", f"{f['seconds']:.2f}",
                         f"{f['seconds'] / plain['seconds']:.2f}", f"{f['loss']:.6f}", goal])  # fmt: skip
    print(render(head, rows, args.markdown))
    print(
        f"\nthe 70B-class row at full size: every GiB above x {args.scale**2}; "
        f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
