"""Whether the parallel settings fit the world, the model and the blocks: checks that need no torch, so that
they run before the process group forms (and again on the built model)."""

from __future__ import annotations

from dist_clm.config import DistributedConfig
from dist_clm.errors import UserError
from dist_clm.models.build import PLAIN_HEADS, TENSOR_PARALLEL_FAMILIES, Shape


def check_world(d: DistributedConfig, world: int) -> None:
    """distributed.sequence_parallel_size and tensor_parallel_size must divide the ranks."""
    for key, size in (("sequence_parallel_size", d.sequence_parallel_size),
                      ("tensor_parallel_size", d.tensor_parallel_size)):  # fmt: skip
        if world % size:
            raise UserError(f"config key 'distributed.{key}' is {size}, which does not divide the {world} ranks; use "
                            "a divisor of the number of ranks.")  # fmt: skip


def check_tensor_parallel_nodes(size: int, table: list[dict], across: bool) -> None:
    """Each tensor-parallel group (`size` consecutive ranks of the world `table`) on one node, unless `across`."""
    if size == 1 or across:
        return
    for first in range(0, len(table), size):
        nodes = sorted({r["node"] for r in table[first : first + size]})
        if len(nodes) > 1:
            raise UserError(
                f"config key 'distributed.tensor_parallel_size' is {size}, so ranks {first}-{first + size - 1} form a "
                f"tensor-parallel group, but they run on {len(nodes)} nodes ({', '.join(nodes)}), where its two "
                "all-reduces per layer would cross the network; use a size that divides the ranks per node, or set "
                "distributed.tensor_parallel_across_nodes=true."
            )


def check_layout(d: DistributedConfig, world: int, ranks_per_node: int) -> None:
    """check_world and check_tensor_parallel_nodes for `world` ranks filling nodes of `ranks_per_node` in order
    (a job not started yet: launch slurm, the memory plan)."""
    check_world(d, world)
    table = [{"rank": r, "node": f"node {r // ranks_per_node + 1}"} for r in range(world)]
    check_tensor_parallel_nodes(d.tensor_parallel_size, table, d.tensor_parallel_across_nodes)


def check_tensor_parallel(shape: Shape, size: int) -> None:
    """What tensor parallelism of `size` cannot shard in the model, in one sentence (before anything loads)."""
    if size == 1:
        return
    key = f"config key 'distributed.tensor_parallel_size' is {size}"
    if shape.experts:
        raise UserError(f"{key}, but AutoTP leaves a Mixture-of-Experts model's experts whole on every rank (it "
                        "shards their attention only); train it with ZeRO-3 and "
                        "distributed.tensor_parallel_size=1.")  # fmt: skip
    if shape.model_type not in TENSOR_PARALLEL_FAMILIES:
        raise UserError(f"{key}, but DeepSpeed's AutoTP shards {', '.join(TENSOR_PARALLEL_FAMILIES)} models, not "
                        f"{shape.model_type}; use one of those, or set distributed.tensor_parallel_size=1 (ZeRO-3 "
                        "splits any model).")  # fmt: skip
    # (a vocabulary or MLP width it does not divide is split unevenly by AutoTP, exactly; heads cannot be)
    for what, n in (("attention heads", shape.heads), ("key/value heads", shape.kv_heads)):
        if n % size:
            raise UserError(f"{key}, which does not divide the model's {n} {what} (each rank computes whole heads "
                            "of its own); use a size that does.")  # fmt: skip


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
