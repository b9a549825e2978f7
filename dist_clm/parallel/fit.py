"""Whether the parallel settings fit the world, the model and the blocks: checks that need no torch, so that
they run before the process group forms (and again on the built model)."""

from __future__ import annotations

from dist_clm.errors import UserError
from dist_clm.models.build import PLAIN_HEADS, Shape


def check_world(size: int, world: int) -> None:
    """distributed.sequence_parallel_size must divide the ranks."""
    if world % size:
        raise UserError(f"config key 'distributed.sequence_parallel_size' is {size}, which does not divide the "
                        f"{world} ranks; use a divisor of the number of ranks.")  # fmt: skip


def check_sequence_parallel(shape: Shape, size: int, block_sizes: list[int]) -> None:
    """What sequence parallelism of `size` cannot divide in the model and the blocks, in one sentence."""
    if size == 1:
        return
    heads, kv = shape.heads, shape.kv_heads
    if heads % size:
        raise UserError(f"config key 'distributed.sequence_parallel_size' is {size}, which does not divide the "
                        f"model's {heads} attention heads; use a divisor of {heads}.")  # fmt: skip
    if kv % size and size % kv:
        raise UserError(f"config key 'distributed.sequence_parallel_size' is {size}, and the model's {kv} key/value "
                        "heads neither divide it nor are divided by it; use a size that does.")  # fmt: skip
    for block in block_sizes:
        if block % size:
            raise UserError(f"data.block_size {block} is not a multiple of distributed.sequence_parallel_size {size} "
                            "(each rank trains on an equal slice of every block); change one of them.")  # fmt: skip
    if shape.model_type not in PLAIN_HEADS:
        raise UserError(f"sequence parallelism trains {', '.join(PLAIN_HEADS)} models, not {shape.model_type}; set "
                        "distributed.sequence_parallel_size=1.")  # fmt: skip


def check_positions(shape: Shape, block_sizes: list[int], block_size: int) -> None:
    """No block longer than the model's positions (`block_size`: data.block_size, to name the key)."""
    longest = max(block_sizes)
    if shape.positions is not None and longest > shape.positions:
        what = "config key 'data.block_size' is" if longest == block_size else "a block size in data.stages is"
        raise UserError(
            f"{what} {longest}, more than the model's {shape.positions} positions; lower it or raise the model's "
            "positions (model.overrides, e.g. max_position_embeddings for Llama-style models)."
        )
