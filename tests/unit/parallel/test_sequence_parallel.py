"""Sequence parallelism's rules in one process (parallel/sequence_parallel.py): the document rule its core attention
shares with SDPA, and the long-context config's divisions."""

from __future__ import annotations

import torch

from tests.helpers import REPO


def test_flex_attention_gets_the_same_document_rule_as_sdpa():
    """The core's BlockMask for flex attention (its kernel runs on GPUs) allows exactly what sdpa's dense mask
    allows: causal within each document, rows beginning inside a document begin a sequence."""
    from dist_clm.parallel.sequence_parallel import _Documents

    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ([5, 11, 16], [4, 20, 8])])
    positions[1, :4] += 7  # (the second row begins inside a document)
    docs = _Documents()
    docs.begin(positions, positions[:, :16], documents=True)
    dense = docs.dense_mask()
    assert torch.equal(_allowed(docs), dense[:, 0])
    docs.begin(positions, positions[:, :16], documents=False)
    assert docs.dense_mask() is None and torch.equal(_allowed(docs), torch.ones(32, 32).tril().bool().expand(2, 32, 32))


def test_the_flex_mask_of_a_16k_row_holds_tiles_not_token_pairs():
    """The core's BlockMask for a row of 16K tokens (documents across tiles) allocates a few bytes per tile,
    nowhere near the L x L booleans (268 MB) of a mask evaluated at every pair, as torch's eager
    create_block_mask does (and every rank makes it). The measure sees torch's CPU allocations: a tensor of
    L x L/64 booleans registers."""
    from dist_clm.parallel.sequence_parallel import _Documents

    n = 16384
    positions = (torch.arange(n) % 1000)[None]
    docs = _Documents()
    docs.begin(positions, positions[:, : n // 4], documents=True)
    assert _peak_bytes(lambda: torch.ones(n, n // 64, dtype=torch.bool)) >= n * n // 64
    peak = _peak_bytes(docs.block_mask)
    assert docs.block_mask().kv_num_blocks.shape == (1, 1, n // 128)
    assert peak < n * n // 100, f"{peak / 2**20:.1f} MiB"


def _peak_bytes(make) -> int:
    """The most bytes torch's CPU allocator held at once, above what it held before, while `make()` ran (its
    allocations and frees in time order, as torch's profiler records them)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        made = make()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())  # fmt: skip
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    del made
    return peak


def test_the_long_context_config_divides_on_one_8_gpu_node():
    """configs/llama-1b-32k.yaml, dry: its model config (no weights) and DeepSpeed config for 8 ranks pass every
    check a run makes before it starts, and each rank holds 4K tokens of a block."""
    from dist_clm.config import load_config
    from dist_clm.models.build import Shape, max_positions, preset_config
    from dist_clm.parallel.engine import deepspeed_config, resolve_grad_accum
    from dist_clm.parallel.fit import check_sequence_parallel, check_world

    cfg = load_config(REPO / "configs" / "llama-1b-32k.yaml", ["data.path=corpus"])
    m, world, size = cfg.model, 8, cfg.distributed.sequence_parallel_size
    config = preset_config(m.preset, m.overrides, 32000, rope=(m.rope_theta, m.rope_scaling))
    check_world(cfg.distributed, world)
    check_sequence_parallel(Shape.of(config), size, cfg.data.block_sizes())
    assert max_positions(config) >= max(cfg.data.block_sizes()) == 32768
    rank, dp_world = 3 // cfg.distributed.ranks_per_batch, world // cfg.distributed.ranks_per_batch
    assert (rank, dp_world) == (0, 1) and cfg.data.block_size // size == 4096
    grad_accum = resolve_grad_accum(cfg.train, dp_world)
    ds = deepspeed_config(cfg.train, cfg.optim, cfg.distributed, on_gpu=True, grad_accum=grad_accum)
    assert ds["sequence_parallel_size"] == 8 and ds["gradient_accumulation_steps"] == 32
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]


def _allowed(docs) -> torch.Tensor:
    """B x L x L: where the BlockMask's rule allows attention (its mask_mod evaluated everywhere)."""
    mask = docs.block_mask()
    b, n = docs.positions.shape
    q, kv = torch.arange(n)[:, None].expand(n, n), torch.arange(n)[None, :].expand(n, n)
    return torch.stack([mask.mask_mod(torch.tensor(i), torch.tensor(0), q, kv) for i in range(b)])
