"""Peak memory and time of the loss head, side by side in one run: the plain head (logits for every token, then
cross-entropy, as transformers computes it) vs dist_clm's fused chunked head (dist_clm/models/loss_head.py), forward
and backward, at a 128K vocabulary and micro batch 4 x 1024 (hidden size 768, fp32, on this machine's CPU).

Each variant runs in a fresh process; its peak is the process's peak resident memory above what it held just
before the loss (the weight, the hidden states and their gradients' buffers excluded as far as they were
allocated before). Target: the fused head's peak at least 4x below the plain head's.

    python bench/loss_head_memory.py [--markdown] [--vocab V] [--tokens B,L] [--hidden H]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import psutil
from tables import render


def child(variant: str, vocab: int, batch: int, length: int, hidden: int) -> None:
    import torch

    from dist_clm.models.loss_head import causal_lm_loss

    torch.manual_seed(0)
    h = torch.randn(batch, length, hidden, requires_grad=True)
    w = (0.02 * torch.randn(vocab, hidden)).requires_grad_()
    labels = torch.randint(0, vocab, (batch, length))
    h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)  # (the gradients' own buffers: in the baseline)
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if variant == "plain":
        logits = (h @ w.T).float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100
        )
    else:
        loss = causal_lm_loss(h, w, labels, chunk=None if variant == "auto" else int(variant))
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak - before, "seconds": seconds, "loss": loss.item()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--vocab", type=int, default=128 * 1024)
    ap.add_argument("--tokens", default="4,1024", help="micro batch B,L")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from dist_clm.models.loss_head import chunk_rows

    batch, length = (int(x) for x in args.tokens.split(","))
    if args.child:
        child(args.child, args.vocab, batch, length, args.hidden)
        return
    runs = {}
    for variant in ("plain", "auto", "1024", "256"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", variant, "--vocab", str(args.vocab), "--tokens", args.tokens,
             "--hidden", str(args.hidden)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        runs[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    plain = runs["plain"]
    logits_gib = batch * length * args.vocab * 4 / 2**30
    head = ["loss head", "peak above baseline (GiB)", "x below plain", "forward+backward (s)", "loss", "target"]
    rows = []
    for variant, r in runs.items():
        name = {
            "plain": "plain (logits, then cross-entropy)",
            "auto": f"fused, default chunks ({chunk_rows(args.vocab)} tokens)",
        }.get(variant, f"fused, chunks of {variant} tokens")
        ratio = plain["peak"] / max(r["peak"], 1)
        target = "" if variant == "plain" else f">= 4x: {'yes' if ratio >= 4 else 'NO'}"
        rows.append(
            [name, f"{r['peak'] / 2**30:.2f}", f"{ratio:.1f}", f"{r['seconds']:.2f}", f"{r['loss']:.6f}", target]
        )
    print(render(head, rows, args.markdown))
    print(
        f"\nvocabulary {args.vocab}, micro batch {batch} x {length}, hidden {args.hidden}, fp32 (the fp32 logits "
        f"alone: {logits_gib:.2f} GiB); {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
