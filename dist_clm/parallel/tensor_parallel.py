"""Tensor parallelism: each layer's matrices split over a group of ranks (DeepSpeed's AutoTP), for models whose
parameters, gradients and optimizer state one GPU should not hold whole, without ZeRO-3's gathers at every layer.

Groups: `size` consecutive ranks (DeepSpeed's mesh puts the tensor dimension innermost), on one node unless
distributed.tensor_parallel_across_nodes says otherwise (fit.check_tensor_parallel_nodes). Every rank of a group
reads the same micro batches (the loader counts data-parallel ranks, rank // size of world // size: the global batch
counts sequences, so the size changes nothing in the math) and computes the same loss; ZeRO partitions what each
rank holds over the data-parallel ranks of its tensor-parallel position.

What AutoTP does inside deepspeed.initialize, from the model's transformers tensor-parallel plan: the query, key,
value and MLP input projections are split by output columns (each rank computes its own heads and its share of
the MLP width), the attention output and MLP down projections by input rows with one all-reduce after each; the
output head by vocabulary rows, its logits gathered whole on every rank; embeddings and norms replicated.

What dist_clm adds once the engine exists (`install`):
- A replicated parameter that acts on one rank's heads only (Qwen3's per-head query and key norms) gets from each
  rank the gradient of that rank's heads: the sum over the group is its gradient. transformers 5's plans mark such
  parameters and DeepSpeed then sums them itself; 4.57's do not, and the ranks' copies would drift apart from the
  first step. `install` sums every such gradient that DeepSpeed does not.
- The fused loss head then runs on each rank's vocabulary rows (loss_head, given the group): the log-sum-exp over
  the whole vocabulary is combined across the group, no rank ever holds the gathered logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in tensor parallelism (size 1: none)."""

    size: int = 1
    rank: int = 0  # within its group
    group: Any = None  # the group's torch.distributed process group

    def counts(self) -> bool:
        """Whether this rank counts the group's blocks, tokens and validation sums (one rank per group does)."""
        return self.rank == 0


def install(engine) -> TensorParallel:
    """After deepspeed.initialize sharded the model (distributed.tensor_parallel_size > 1): the group, with the
    partial gradients of replicated per-head parameters summed over it. (The fused loss head goes on the output
    head AutoTP made, with this group: training/setup.py's output_head.)"""
    import torch.distributed as dist
    from deepspeed.utils import groups

    group = groups.get_tensor_model_parallel_group()
    sum_partial_gradients(engine.module, group)
    return TensorParallel(dist.get_world_size(group), dist.get_rank(group), group)


def sharded_modules(model) -> list:
    """The modules AutoTP replaced by its column- or row-parallel layers."""
    from deepspeed.module_inject.layers import TensorParallel_Layer

    return [m for m in model.modules() if isinstance(m, TensorParallel_Layer)]


def partial_gradient_parameters(model) -> list:
    """The replicated parameters that act on one rank's heads only: those of a module inside an attention block
    whose projections AutoTP split (Qwen3's q_norm and k_norm), not themselves split."""
    sharded = {id(m) for m in sharded_modules(model)}
    out = []
    for name, module in model.named_modules():
        if not name.endswith(("self_attn", "attention")) or not any(id(c) in sharded for c in module.children()):
            continue
        for child in module.children():
            if id(child) not in sharded:
                out += [p for p in child.parameters() if p.requires_grad]
    return out


def sum_partial_gradients(model, group) -> int:
    """A hook on each of partial_gradient_parameters (but those DeepSpeed sums already) that sums its gradient
    over the group when it is computed, before DeepSpeed accumulates and reduces it; how many were hooked."""
    import torch.distributed as dist

    def summed(grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=group)
        return grad

    hooked = 0
    for p in partial_gradient_parameters(model):
        if getattr(p, "_ds_grad_allreduce_registered", False):  # (a plan that marks it: DeepSpeed's own hook)
            continue
        p.register_hook(summed)
        p._ds_grad_allreduce_registered = True
        hooked += 1
    return hooked
