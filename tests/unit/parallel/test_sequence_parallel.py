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


def test_the_long_context_config_divides_on_one_8_gpu_node():
    """configs/llama-1b-32k.yaml, dry: its model config (no weights) and DeepSpeed config for 8 ranks pass every
    check a run makes before it starts, and each rank holds 4K tokens of a block."""
    from dist_clm.config import load_config
    from dist_clm.models.build import Shape, max_positions, preset_config
    from dist_clm.parallel.engine import deepspeed_config, resolve_grad_accum
    from dist_clm.parallel.fit import check_sequence_parallel, check_world
    from dist_clm.parallel.sequence_parallel import SequenceParallel

    cfg = load_config(REPO / "configs" / "llama-1b-32k.yaml", ["data.path=corpus"])
    m, world, size = cfg.model, 8, cfg.distributed.sequence_parallel_size
    config = preset_config(m.preset, m.overrides, 32000, rope=(m.rope_theta, m.rope_scaling))
    check_world(size, world)
    check_sequence_parallel(Shape.of(config), size, cfg.data.block_sizes())
    assert max_positions(config) >= max(cfg.data.block_sizes()) == 32768
    rank, dp_world = SequenceParallel(size, 3).dp(3, world)
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
