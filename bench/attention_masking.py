"""What document masking costs in one block, side by side in one run, on this machine's CPU: the attention paths
`model.attention` chooses between, through the model as dist_clm trains it (build_model_with; the block's
documents given as restarting position ids, as the loader makes them with data.document_mask=true).

    causal only            no document mask (SDPA's causal kernel): the reference
    sdpa, document mask    transformers builds a dense B x 1 x L x L mask from the position ids; SDPA attends
                           over every pair and masks (what the CPU trains with)
    flex, document mask    FlexAttention's block-sparse mask: blocks of 128 x 128 pairs that lie across
                           documents are skipped. torch 2.14 has no FlexAttention backward on the CPU, so this
                           row has the forward pass only; on a GPU, bench/gpu_throughput.py times it in training

Every row times one forward pass (no gradients) after a first untimed one (which compiles FlexAttention's
kernel), then one forward + backward pass (a training step's share).

Model: `tiny-llama` widened to hidden 256, 4 heads, 2 layers (the attention is what grows with L); one block
of L tokens in documents of --doc tokens. Each row runs in a fresh process; peak is the process's peak
resident memory above what it held before the training pass.

    python bench/attention_masking.py [--markdown] [--lengths 2048,8192] [--doc 128]
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

VARIANTS = {"causal": "causal only", "sdpa": "sdpa, document mask", "flex_attention": "flex, document mask"}


class _Vocabulary:
    """What build_model reads of a tokenizer: its size and special ids."""

    bos_token_id, eos_token_id = 0, 1

    def __len__(self) -> int:
        return 4096


def child(variant: str, length: int, doc: int) -> None:
    import torch

    from dist_clm.models.attention import build_model_with

    torch.manual_seed(0)
    attention = ["sdpa" if variant == "causal" else variant]  # (model.attention's choice on a GPU: flex)
    overrides = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 688,
                 "max_position_embeddings": length}  # fmt: skip
    model = build_model_with(attention, "tiny-llama", "", overrides, _Vocabulary())
    ids = torch.randint(2, 4096, (1, length))
    inputs = {"input_ids": ids, "labels": ids}
    if variant != "causal":
        inputs["position_ids"] = (torch.arange(length) % doc)[None]  # documents of `doc` tokens
    backward = variant != "flex_attention"
    with torch.no_grad():  # a first call (it compiles FlexAttention's kernel), then a timed one
        model(**inputs, use_cache=False)
        t0 = time.perf_counter()
        model(**inputs, use_cache=False)
        forward = time.perf_counter() - t0
    before = psutil.Process().memory_info().rss
    seconds = None
    if backward:
        t0 = time.perf_counter()
        model(**inputs, use_cache=False).loss.backward()
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"forward": forward, "seconds": seconds, "peak": max(0, peak - before),
                      "attention": model.config._attn_implementation}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--doc", type=int, default=128, help="tokens per document")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        results = {}
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--child", variant, str(length), str(args.doc)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["no output"])[-1][:80]
                rows.append([str(length), VARIANTS[variant], f"failed: {last}", "-", "-", "-"])
                continue
            res = results[variant] = json.loads(r.stdout.strip().splitlines()[-1])
            base = results.get("causal")
            trained = res["seconds"] is not None
            rows.append([str(length), VARIANTS[variant], f"{res['forward']:.2f}",
                         f"{res['seconds']:.2f}" if trained else "- (no CPU backward)",
                         f"{res['seconds'] / base['seconds']:.2f}" if trained and base else "-",
                         f"{res['peak'] / 2**30:.2f}" if trained else "-"])  # fmt: skip
    print(f"machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores; documents of "
          f"{args.doc} tokens; tiny-llama at hidden 256, 4 heads, 2 layers")  # fmt: skip
    head = ["L", "attention", "forward s", "forward + backward s", "vs causal", "peak GiB (fwd + bwd)"]
    print(render(head, rows, args.markdown))


if __name__ == "__main__":
    main()
