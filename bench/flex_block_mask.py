"""What building FlexAttention's document BlockMask costs on this machine's CPU, per row of L tokens, for the two
builders side by side in one run:

    create_block_mask    torch's eager builder given the same-document causal rule (what sequence parallelism's
                         core used): it evaluates the rule at every pair of tokens, an L x L mask, then sums tiles
    document_block_mask  dist_clm's (models/attention.py): the tiles from each tile's first and last document

Peak is the most bytes torch's CPU allocator held at once during the build, above what it held before (its
allocations and frees in time order, from torch's profiler); time is one build's wall clock after a first
untimed one at a small length. One row of L tokens in documents of --doc tokens (they cross tile bounds).

    python bench/flex_block_mask.py [--markdown] [--lengths 2048,8192,16384,131072] [--old-up-to 16384]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

from tables import render


def measure(build) -> tuple[float, int]:
    """(seconds, peak bytes) of one call of `build`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = time.perf_counter()
        build()
        seconds = time.perf_counter() - start
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    records.sort(key=lambda e: e.start_ns())
    held, peak = 0, 0
    for record in records:
        held += record.nbytes()
        peak = max(held, peak)
    return seconds, peak


def builders(length: int, doc_tokens: int):
    """The two builders, each a call that makes one row's BlockMask."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    from dist_clm.models.attention import document_block_mask

    positions = (torch.arange(length) % doc_tokens)[None]
    doc = (positions == 0).cumsum(1)

    def rule(b, h, q, kv):
        return (q >= kv) & (doc[b, q] == doc[b, kv])

    return {
        "create_block_mask": lambda: create_block_mask(rule, 1, None, length, length, device="cpu"),
        "document_block_mask": lambda: document_block_mask(doc),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--lengths", default="2048,8192,16384,131072")
    ap.add_argument("--old-up-to", type=int, default=16384, help="longest L for create_block_mask (~10 L^2 bytes)")
    ap.add_argument("--doc", type=int, default=1000, help="tokens per document")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    for build in builders(256, args.doc).values():  # (first calls: lazy imports and set-up)
        build()
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        for name, build in builders(length, args.doc).items():
            if name == "create_block_mask" and length > args.old_up_to:
                rows.append([str(length), name, "- (not run)", "-", "-"])
                continue
            seconds, peak = measure(build)
            rows.append([str(length), name, f"{seconds:.3f}", f"{peak / 2**20:.2f}", f"{peak / length**2:.4f}"])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; one row, documents of "
          f"{args.doc} tokens")  # fmt: skip
    print(render(["L", "builder", "seconds", "peak MiB", "peak bytes / L^2"], rows, args.markdown))


if __name__ == "__main__":
    main()
