"""A Mixture-of-Experts block's experts computed without host syncs, on transformers' own parameters.

transformers' Qwen3-MoE block loops over the experts its tokens reach: a `nonzero` to find them, then per
expert a lookup and a `torch.where` for its tokens, each a read of device values by the host (1 + 2E per layer,
again in an activation-checkpoint recompute) and a graph break under torch.compile. Here the k slots of every
token are sorted by expert once (an argsort on the device), each expert's share is a count kept on the device,
and all experts' SwiGLU MLPs run as one grouped product, `torch._grouped_mm`, where torch offers it without a
host read; elsewhere as tiles of a batched product (`_tiled_mlp`). The slots are then put back in token order
and summed with the routing weights. Outputs and gradients equal transformers' loop (to fp32 rounding), and the
parameters keep their names and shapes: checkpoints and exports load in plain transformers unchanged.

Only the forward changes: `make_sync_free(model)` gives each recognised block (or its experts module) a forward
of its own; the module classes, their names (ZeRO-3's leaf modules) and the router's logits stay as they were.
"""

from __future__ import annotations

import functools
import types

import torch

# the blocks whose routing this module reproduces (softmax, top k, optional renormalisation): Qwen3-MoE's
BLOCKS = ("Qwen3MoeSparseMoeBlock",)

# torch's CPU grouped product is a composite kernel (a loop over the groups, which on the CPU reads nothing
# back from a device); torch versions without one raise NotImplementedError there
_GROUPED_ON_CPU = hasattr(torch, "_grouped_mm") and any(
    torch._C._dispatch_has_kernel_for_dispatch_key("aten::_grouped_mm", key)
    for key in ("CPU", "CompositeExplicitAutograd")
)


def make_sync_free(model) -> int:
    """Switch the model's Qwen3-MoE blocks to the sync-free experts; the number of blocks switched."""
    switched = 0
    for block in model.modules():
        if type(block).__name__ not in BLOCKS:
            continue
        experts = block.experts
        if isinstance(experts, torch.nn.ModuleList) and all(
            hasattr(e, name) for e in experts for name in ("gate_proj", "up_proj", "down_proj")
        ):
            # transformers 4.x: the block routes and returns (output, router logits); each expert is a module
            # with gate_proj, up_proj, down_proj (nn.Linear); the block's whole forward is replaced
            block.forward = types.MethodType(_block_forward, block)
        elif _fused(experts):
            # transformers 5.x: the router is a module of its own (whose logits transformers records) and the
            # experts one module with 3-D gate_up_proj [E, 2I, H] and down_proj [E, H, I] parameters, called
            # with each token's top-k experts and weights; only the experts' forward is replaced
            experts.forward = types.MethodType(_fused_experts_forward, experts)
        else:
            continue  # (a layout not seen here: transformers' own forward stays)
        switched += 1
    return switched


def _fused(experts) -> bool:
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    return (
        isinstance(gate_up, torch.nn.Parameter)
        and isinstance(down, torch.nn.Parameter)
        and gate_up.dim() == down.dim() == 3
        and not getattr(experts, "has_bias", False)
        and getattr(experts, "has_gate", True)
    )


def _block_forward(block, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A transformers 4.x Qwen3-MoE block's forward: route each token to its top k experts, run them grouped."""
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    logits = block.gate(x)
    weights, chosen = logits.softmax(dim=-1, dtype=torch.float).topk(block.top_k, dim=-1)
    if block.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(x.dtype)
    gate_up = torch.stack([torch.cat((e.gate_proj.weight, e.up_proj.weight)) for e in block.experts])
    down = torch.stack([e.down_proj.weight for e in block.experts])
    out = grouped_experts(x, chosen, weights, gate_up, down, block.experts[0].act_fn)
    return out.reshape(shape), logits


def _fused_experts_forward(experts, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """A transformers 5.x experts module's forward (its 3-D weights as they are, or transposed if it says so)."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if getattr(experts, "is_transposed", False):  # ([E, H, 2I] and [E, I, H])
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    return grouped_experts(hidden_states, top_k_index, top_k_weights, gate_up, down, experts.act_fn)


def grouped_experts(x, chosen, weights, gate_up, down, act) -> torch.Tensor:
    """sum over each token's k experts of weight x down(act(gate(x)) * up(x)), without a host read.

    x [T, H]; chosen, weights [T, k]: each token's experts and routing weights; gate_up [E, 2I, H]: the
    gate rows then the up rows of each expert (nn.Linear's [out, in]); down [E, H, I]; act: the activation.
    """
    tokens, k = chosen.shape
    slots = tokens * k
    experts_sorted, order = chosen.reshape(-1).sort(stable=True)  # slots grouped by expert, in token order
    # the end of each expert's group among the sorted slots: the per-expert counts, cumulated, on the device
    ends = torch.searchsorted(experts_sorted, torch.arange(1, gate_up.shape[0] + 1, device=x.device))
    # each slot's input row, in sorted order (the expand's backward sums a token's k slots in a fixed order)
    rows = x.unsqueeze(1).expand(tokens, k, x.shape[-1]).reshape(slots, -1)[order]
    if _groupable(rows, gate_up, down):
        out = _grouped_mlp(rows, ends, gate_up, down, act)
    else:
        out = _tiled_mlp(rows, experts_sorted, ends, gate_up, down, act)
    unsort = torch.empty_like(order).scatter_(0, order, torch.arange(slots, device=x.device))
    return (out[unsort].view(tokens, k, -1) * weights.unsqueeze(-1)).sum(dim=1)


def _groupable(rows, gate_up, down) -> bool:
    """Whether torch._grouped_mm runs these operands without reading the group offsets back to the host.

    CUDA: its CUTLASS kernels, for bf16 on compute capability 9.x and 10.x; elsewhere torch's fallback loops
    over the groups with the offsets copied to the host (a sync per product). CPU: its composite kernel, except
    under torch.compile outside bf16 (inductor lowers the grouped product for bf16 only). Both need the
    operands' rows at multiples of 16 bytes, and one dtype.
    """
    if not hasattr(torch, "_grouped_mm") or not rows.dtype == gate_up.dtype == down.dtype:
        return False
    align = 16 // rows.element_size()
    if rows.shape[-1] % align or down.shape[-1] % align:
        return False
    if rows.device.type == "cuda":
        return rows.dtype == torch.bfloat16 and _capability(rows.device.index)[0] in (9, 10)
    if rows.device.type == "cpu":
        return _GROUPED_ON_CPU and (rows.dtype == torch.bfloat16 or not torch.compiler.is_compiling())
    return False


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _grouped_mlp(rows, ends, gate_up, down, act) -> torch.Tensor:
    """Every expert's MLP on its group of the sorted rows: two grouped products, offsets on the device."""
    offsets = ends.to(torch.int32)
    gate, up = torch._grouped_mm(rows, gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    return torch._grouped_mm(act(gate) * up, down.transpose(1, 2), offs=offsets)


def _tiled_mlp(rows, experts_sorted, ends, gate_up, down, act) -> torch.Tensor:
    """Every expert's MLP on its group of the sorted rows, as tiles of a batched product with static shapes.

    Each expert's group is padded to whole tiles of `size` rows, one expert per tile, each tile multiplied by
    its expert's weights (gathered per tile). The trade-off: a capacity of the worst case per expert (every
    token: E x T rows, E/k times the work) needs no weight gather but its memory grows with E/k; tiles of
    ceil(T·k / E) rows (an even load's share) bound the padded rows by 2·T·k + a tile and the gathered weights
    by 2·E + 1 experts' (held for the backward: about twice the block's expert weights), whatever the routing.
    """
    slots, width = rows.shape
    count = gate_up.shape[0]
    size = -(-slots // count)  # rows per tile
    tiles = -(-slots // size) + count  # sum over experts of ceil(n_e / size) <= slots / size + experts
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    per_expert = (counts + size - 1) // size
    tile_ends = per_expert.cumsum(0)
    # the expert of each tile (tiles past the last expert's are zeros; any expert's weights will do)
    tile_expert = torch.searchsorted(tile_ends, torch.arange(tiles, device=rows.device), right=True)
    tile_expert = tile_expert.clamp(max=count - 1)
    # a slot's row in the padded layout: its expert's first tile row + its rank within the expert's group
    shift = (tile_ends - per_expert) * size - (ends - counts)
    where = shift[experts_sorted] + torch.arange(slots, device=rows.device)
    padded = rows.new_zeros(tiles * size, width).index_copy(0, where, rows).view(tiles, size, width)
    gate, up = torch.bmm(padded, gate_up[tile_expert].transpose(1, 2)).chunk(2, dim=-1)
    out = torch.bmm(act(gate) * up, down[tile_expert].transpose(1, 2))
    return out.reshape(tiles * size, -1)[where]
