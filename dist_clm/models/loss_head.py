"""A language-model loss head that never holds the full logits: the output projection and the cross-entropy,
fused and computed a chunk of tokens at a time.

The plain head computes logits = hidden @ W.T for every token (B x L x V, upcast to fp32 for the loss: 8 GiB at a
128K vocabulary and 8 x 2048 tokens), then their softmax and, in the backward pass, a gradient of the same
size. Here the tokens go through in chunks of `chunk` rows: each chunk's logits are made, reduced to its loss
and turned at once into the chunk's gradients for the hidden states and the weight (softmax minus the one-hot
target), then dropped. The backward pass only scales the gradients kept from the forward pass. Peak memory is
a few chunk x V tensors, not B x L x V. The matrix products run in the weights' dtype, as the plain head's do
(bf16 on tensor cores; fp32 on TF32 tensor cores where train.tf32 allows); the weight's gradient is summed
over the chunks in fp32. This is what liger-kernel's fused linear cross-entropy does with
Triton kernels on a GPU; this one is plain PyTorch, so it runs wherever the model runs (CPU included). The
logits and softmax are computed in fp32 whatever the weights' dtype, as the plain head's loss does.

`causal_lm_loss(hidden, weight, labels)` is the drop-in for transformers' causal-LM loss: labels shifted by
one, -100 ignored, the mean over the predicted tokens.
"""

from __future__ import annotations

import torch

from dist_clm.models.build import PLAIN_HEADS, chunk_rows

IGNORE = -100


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T (+ bias), labels), the gradients made in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk):
        needs = ctx.needs_input_grad
        grad_hidden = torch.zeros_like(hidden) if needs[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs[1] else None
        grad_bias = (
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if bias is not None and needs[2] else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            logits = (h @ weight.T).float()
            if bias is not None:
                logits += bias.float()
            keep = y != IGNORE
            target = torch.where(keep, y, 0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, target[:, None]).squeeze(1)) * keep).sum()
            # d(sum of losses)/d(logits) = softmax - one_hot(target), zero on ignored rows; in place on `logits`
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(len(y), device=y.device), target] -= 1.0
            grad *= keep[:, None]
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:  # the product in the weights' dtype (tensor cores), the sum over chunks in fp32
                grad_weight += (grad.to(weight.dtype).T @ h.to(weight.dtype)).float()
            if grad_bias is not None:
                grad_bias += grad.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (
            None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * grad_total).to(w_dtype),
            None if grad_bias is None else (grad_bias * grad_total).to(b_dtype),
            None,
            None,
        )


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(sum of the per-row cross-entropies, number of rows counted) for rows of `hidden` (N x H) against the
    output projection `weight` (V x H) and `labels` (N; -100 ignored); `chunk` rows at a time (default:
    chunk_rows of the vocabulary)."""
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    total = _FusedLinearCrossEntropy.apply(hidden, weight, bias, labels, chunk or chunk_rows(weight.shape[0]))
    return total, (labels != IGNORE).sum()


def causal_lm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
    chunk: int | None = None, num_items: torch.Tensor | float | None = None,
) -> torch.Tensor:  # fmt: skip
    """transformers' causal-LM loss (token t predicts label t+1, -100 ignored, mean over predicted tokens)
    from the final hidden states (B x L x H), without the B x L x V logits. With `num_items` (transformers'
    num_items_in_batch), the sum over predicted tokens divided by it instead."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
    total, count = fused_linear_cross_entropy(hidden, weight, shifted, bias, chunk)
    return total / (count.clamp(min=1) if num_items is None else num_items)


def install(model, chunk: int | None = None) -> bool:
    """Make `model(input_ids, labels=..., ...)` compute its loss with the fused head (its output's logits are
    None); calls without labels (generation, logits for evaluation) are unchanged. The head's loss runs as the
    output projection module's own forward, so ZeRO-3 gathers its weight around it as for the plain head.
    False (nothing changed) for a model whose logits are not a plain projection of its last hidden state."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    config = model.config
    if config.model_type not in PLAIN_HEADS or getattr(config, "final_logit_softcapping", None):
        return False
    head, base = model.get_output_embeddings(), model.base_model
    project, whole = head.forward, model.forward

    def head_forward(hidden, labels=None, num_items=None, shift_labels=None):
        if shift_labels is not None:  # (sequence parallelism: labels shifted over the whole row; the sum returned)
            return fused_linear_cross_entropy(hidden, head.weight, shift_labels, head.bias, chunk)[0]
        if labels is None:
            return project(hidden)
        return causal_lm_loss(hidden, head.weight, labels, head.bias, chunk, num_items)

    def forward(input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None:
            return whole(input_ids=input_ids, **kwargs)
        kwargs["use_cache"] = False
        hidden = base(input_ids=input_ids, **kwargs).last_hidden_state
        return CausalLMOutputWithPast(loss=head(hidden, labels=labels, num_items=num_items_in_batch))

    head.forward, model.forward = head_forward, forward
    head.fused_loss = True  # (attention.feed_documents calls the head with labels too)
    return True
