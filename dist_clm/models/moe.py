"""What a Mixture-of-Experts decoder adds to training: which modules are its sparse blocks (ZeRO-3 gathers each
one whole), its router settings, and the router's load as the run logs it.

transformers' MoE families (Qwen3-MoE, Mixtral, Qwen2-MoE, OLMoE) route each token to the top k of a layer's
experts and, when called with `output_router_logits=True`, add `router_aux_loss_coef` x the load-balancing loss
(Switch Transformer's: E x sum over experts of the share of tokens sent there x the mean router probability) to
the loss they return. `RouterLoad` asks for that in training forwards only (those with gradients), so
validation, evaluation and the export's forward compute the plain next-token loss, and records per micro batch
the auxiliary loss and the tokens each expert of each layer received. None of these families has a router z-loss.

Under ZeRO-3 an expert that no token of a rank's batch reaches is skipped by transformers' block forward, so ranks
would gather different parameters and wait for each other for ever, and dist_clm's sync-free forward
(moe_experts.py) reads every expert's weights without calling the expert modules, whose own hooks would gather
them; the sparse blocks are therefore DeepSpeed leaf modules (`zero_optimization.leaf_module`): their parameters
are gathered together on entering the block, and the gradients of idle experts are zeros.
"""

from __future__ import annotations

import math

import torch

SPARSE_BLOCK = "SparseMoeBlock"  # the class-name suffix of transformers' MoE blocks (MixtralSparseMoeBlock, ...)


def is_moe(config) -> bool:
    return bool(getattr(config, "num_experts_per_tok", 0)) and num_experts(config) > 0


def num_experts(config) -> int:
    return int(getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0)


def top_k(config) -> int:
    return int(config.num_experts_per_tok)


def sparse_blocks(model) -> list[torch.nn.Module]:
    """The model's MoE blocks (router and experts), in layer order; none in a dense model."""
    return [m for m in model.modules() if type(m).__name__.endswith(SPARSE_BLOCK) and hasattr(m, "experts")]


def leaf_classes(model) -> list[str]:
    """The class names DeepSpeed's ZeRO-3 must treat as leaf modules (zero_optimization.leaf_module.classes)."""
    return sorted({type(m).__name__ for m in sparse_blocks(model)})


def apply_router_settings(model, aux_loss_coef: float | None) -> None:
    """model.router_aux_loss_coef on an MoE model and its config (None: the model's own coefficient)."""
    if aux_loss_coef is None:
        return
    if not is_moe(model.config):
        from dist_clm.errors import UserError

        raise UserError(f"config key 'model.router_aux_loss_coef' is set, but {model.config.model_type} models have no "
                        "router (it applies to Mixture-of-Experts models); remove it.")  # fmt: skip
    model.config.router_aux_loss_coef = model.router_aux_loss_coef = float(aux_loss_coef)


class RouterLoad:
    """Hooks on an MoE model: its training forwards return the router's logits (and so add the load-balancing
    loss), and each records, on the device, the auxiliary loss and the tokens routed to each expert of each layer.
    `take()` hands over the sums since the last call (for the log window's one all-reduce), `scalars` names them."""

    def __init__(self, model):
        config = model.config
        self.layers, self.experts, self.k = len(sparse_blocks(model)), num_experts(config), top_k(config)
        self.sums: torch.Tensor | None = None  # [aux loss, micro batches, idle experts, tokens per (layer, expert)]
        model.register_forward_pre_hook(self._ask, with_kwargs=True)
        model.register_forward_hook(self._record)

    @staticmethod
    def _ask(module, args, kwargs):
        if torch.is_grad_enabled():  # (training forwards: DPO's run in eval mode, without dropout)
            kwargs["output_router_logits"] = True
        return args, kwargs

    def _record(self, module, args, output) -> None:
        logits = getattr(output, "router_logits", None)
        if not torch.is_grad_enabled() or not logits:
            return
        with torch.no_grad():
            # each token's top-k experts, layer by layer (layers x tokens·k); counted without a one-hot tensor
            chosen = torch.stack([x.detach() for x in logits]).topk(self.k, dim=-1).indices.flatten(1)
            tokens = torch.zeros(len(logits), self.experts, device=chosen.device)
            tokens.scatter_add_(1, chosen, torch.ones(chosen.shape, device=chosen.device))
            aux = getattr(output, "aux_loss", None)
            aux = aux.detach().float().reshape(1) if aux is not None else tokens.new_zeros(1)
            one = torch.cat([aux, tokens.new_ones(1), (tokens == 0).sum().float().reshape(1), tokens.flatten()])
        self.sums = one if self.sums is None else self.sums + one

    def take(self) -> list:
        """The sums since the last call (a device tensor, or zeros), and start again."""
        sums = self.sums if self.sums is not None else [0.0] * (3 + self.layers * self.experts)
        self.sums = None
        return sums

    def scalars(self, sums: list[float], steps: int) -> dict[str, float]:
        """From `take()`'s sums over a window of `steps` steps and all ranks: the mean auxiliary loss and idle
        experts per micro batch and rank, and per layer the tokens per step of its least and most loaded expert and
        the entropy of its load over the experts (1: even, 0: one expert takes every token)."""
        aux, micro, idle, *tokens = sums
        if not micro:
            return {}
        out = {"moe/aux_loss": aux / micro, "moe/idle_experts": idle / micro}
        for layer in range(self.layers):
            load = tokens[layer * self.experts : (layer + 1) * self.experts]
            total = sum(load)
            entropy = -sum(n / total * math.log(n / total) for n in load if n) / math.log(self.experts)
            out |= {f"moe/layer_{layer}/tokens_min": min(load) / max(steps, 1),
                    f"moe/layer_{layer}/tokens_max": max(load) / max(steps, 1),
                    f"moe/layer_{layer}/load_entropy": entropy}  # fmt: skip
        return out
