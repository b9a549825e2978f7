"""A language-model loss head that never holds the full logits nor a second weight-sized tensor: the output
projection and the cross-entropy, fused and computed a chunk of the vocabulary at a time.

The plain head computes logits = hidden @ W.T for every token (N x V, upcast to fp32 for the loss: 8 GiB at a
128K vocabulary and 8 x 2048 tokens), then their softmax and, in the backward pass, a gradient of the same
size, and the weight's gradient (V x H, the weights' dtype). Here the vocabulary goes through in chunks of
`chunk` columns. The forward pass makes each chunk's logits for all N tokens, folds them into each token's
log-sum-exp and picks the target's logit, then drops them; it keeps what the backward needs and nothing
weight-sized: the hidden states, the weight itself (a parameter, held anyway), the labels and the N log-sum-exps.
The backward pass recomputes each chunk's logits (the one extra matrix product per chunk this costs) and turns
them at once into the gradients (softmax minus the one-hot target): the weight's rows for that chunk, in one
product over all tokens as the plain head makes them, written straight into the weight's gradient; the hidden
states' gradient summed over the chunks in fp32 (N x H). Extra memory is a few N x chunk tensors and N x H, never
V x H: at 4096 tokens, hidden 8192 and a 128K vocabulary (a 70B-class model, bf16) this one peaks at half the
plain head's peak, mostly its own weight gradient (~4 against ~8.6 GiB, bench/loss_head_memory.py). Chunking
the vocabulary rather than the tokens is what makes that possible: chunks of tokens would each add to every row
of the weight's gradient, a sum that needs a V x H fp32 buffer (or rounds to bf16 once per chunk).

The matrix products run in the weights' dtype, as the plain head's do (bf16 on tensor cores; fp32 on TF32
tensor cores where train.tf32 allows); the logits and softmax are fp32 whatever the weights' dtype, as the plain
head's loss is. This is what liger-kernel's fused linear cross-entropy does with Triton kernels on a GPU; this
one is plain PyTorch, so it runs wherever the model runs (CPU included).

It runs as the output projection module's own forward (install), so under ZeRO-3 DeepSpeed gathers the weight
around the forward and again, through the hook it puts on the module's output, before the backward that
recomputes with it, as it does for the plain head's saved weight.

`causal_lm_loss(hidden, weight, labels)` is the drop-in for transformers' causal-LM loss: labels shifted by
one, -100 ignored, the mean over the predicted tokens.
"""

from __future__ import annotations

import torch

from dist_clm.models.build import PLAIN_HEADS, chunk_columns

IGNORE = -100


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cut: slice) -> torch.Tensor:
    """fp32 logits of every row against the vocabulary columns `cut`; the forward and the backward make them by
    the same call, so the backward's softmax matches the forward's log-sum-exp."""
    logits = (h @ weight[cut].T).float()
    if bias is not None:
        logits += bias[cut].float()
    return logits


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T (+ bias), labels); the backward recomputes the logits.
    With a process `group`, `weight` is this rank's rows of a vocabulary split over the group (the first being
    vocabulary id `offset`): the log-sum-exps and the targets' logits are combined over the group, and so is the
    hidden states' gradient; every rank returns the whole loss."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk, group=None, offset=0):
        h, vocab = hidden.to(weight.dtype), weight.shape[0]
        keep = labels != IGNORE
        target = torch.where(keep, labels - offset, -1)  # (-1: no column here, ignored or another rank's)
        lse = torch.full(labels.shape, -torch.inf, dtype=torch.float32, device=hidden.device)
        picked = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
        for start in range(0, vocab, chunk):
            logits = _logits(h, weight, bias, slice(start, start + chunk))
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
            column = (target - start).clamp(0, logits.shape[1] - 1)
            here = (target >= start) & (target < start + logits.shape[1])
            picked = torch.where(here, logits.gather(1, column[:, None]).squeeze(1), picked)
        if group is not None:
            lse, picked = _combine(lse, picked, group)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk, ctx.group, ctx.offset = chunk, group, offset
        return ((lse - picked) * keep).sum()

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad
        h, vocab = hidden.to(weight.dtype), weight.shape[0]
        keep = labels != IGNORE
        target = torch.where(keep, labels - ctx.offset, -1)
        scale = (grad_total * keep)[:, None]  # d total / d row's loss: 0 on ignored rows
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if needs[0] else None
        grad_weight = torch.empty_like(weight) if needs[1] else None
        grad_bias = torch.empty_like(bias) if bias is not None and needs[2] else None
        for start in range(0, vocab, ctx.chunk):
            cut = slice(start, start + ctx.chunk)
            logits = _logits(h, weight, bias, cut)
            # d(sum of losses)/d(logits) = softmax - one_hot(target), scaled; in place on `logits`
            grad = logits.sub_(lse[:, None]).exp_()
            column = (target - start).clamp(0, grad.shape[1] - 1)
            here = (target >= start) & (target < start + grad.shape[1])
            grad.scatter_add_(1, column[:, None], -here[:, None].float())  # (a scatter: no host sync on GPUs)
            grad *= scale
            if grad_bias is not None:
                grad_bias[cut] = grad.sum(0)
            grad = grad.to(weight.dtype)  # the products in the weights' dtype (tensor cores), as the plain head's
            if grad_weight is not None:  # these rows' whole sum over the tokens in one product, as the plain head's
                torch.mm(grad.T, h, out=grad_weight[cut])
            if grad_hidden is not None:  # the sum over the chunks in fp32
                if grad.dtype == torch.float32:
                    grad_hidden.addmm_(grad, weight[cut])
                else:
                    grad_hidden += (grad @ weight[cut]).float()
        if grad_hidden is not None and ctx.group is not None:  # (each rank's rows give their share of it)
            torch.distributed.all_reduce(grad_hidden, group=ctx.group)
        grad_hidden = None if grad_hidden is None else grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _combine(lse: torch.Tensor, picked: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole vocabulary's log-sum-exps from each rank's over its rows (a max, then a sum of exponentials
    relative to it: no overflow), and the targets' logits from the one rank that holds each."""
    import torch.distributed as dist

    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    total = (lse - top).exp()
    dist.all_reduce(total, group=group)
    dist.all_reduce(picked, group=group)
    return top + total.log(), picked


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
    chunk: int | None = None, group=None, offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(sum of the per-row cross-entropies, number of rows counted) for rows of `hidden` (N x H) against the
    output projection `weight` (V x H) and `labels` (N; -100 ignored); `chunk` vocabulary columns at a time
    (default: chunk_columns for N tokens). With a process `group`: `weight` is this rank's rows of the vocabulary
    from id `offset` on, the other rows the group's other ranks' (tensor parallelism)."""
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    chunk = chunk or chunk_columns(labels.shape[0], weight.shape[0])
    total = _FusedLinearCrossEntropy.apply(hidden, weight, bias, labels, chunk, group, offset)
    return total, (labels != IGNORE).sum()


def causal_lm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
    chunk: int | None = None, num_items: torch.Tensor | float | None = None, group=None, offset: int = 0,
) -> torch.Tensor:  # fmt: skip
    """transformers' causal-LM loss (token t predicts label t+1, -100 ignored, mean over predicted tokens)
    from the final hidden states (B x L x H), without the B x L x V logits. With `num_items` (transformers'
    num_items_in_batch), the sum over predicted tokens divided by it instead. `group`, `offset`: a vocabulary
    split over ranks (fused_linear_cross_entropy)."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
    total, count = fused_linear_cross_entropy(hidden, weight, shifted, bias, chunk, group, offset)
    return total / (count.clamp(min=1) if num_items is None else num_items)


def fits(config) -> bool:
    """Whether a model of `config` computes its logits as a plain projection of its last hidden state (the fused
    head computes the same loss then)."""
    return config.model_type in PLAIN_HEADS and not getattr(config, "final_logit_softcapping", None)


def install(model, chunk: int | None = None, group=None) -> bool:
    """Make `model(input_ids, labels=..., ...)` compute its loss with the fused head (its output's logits are
    None); calls without labels (generation, logits for evaluation) are unchanged. The head's loss runs as the
    output projection module's own forward, so ZeRO-3 gathers its weight around it, and again before its
    backward (which recomputes the logits with it), as for the plain head. With a process `group` (collective):
    the output projection holds this rank's consecutive rows of a vocabulary split over the group, in rank order
    (tensor parallelism).
    False (nothing changed) for a model whose logits are not a plain projection of its last hidden state."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if not fits(model.config):
        return False
    head, base = model.get_output_embeddings(), model.base_model
    project, whole = head.forward, model.forward
    offset = _first_row(head.weight, group) if group is not None else 0

    def head_forward(hidden, labels=None, num_items=None, shift_labels=None):
        if shift_labels is not None:  # (sequence parallelism: labels shifted over the whole row; the sum returned)
            return fused_linear_cross_entropy(hidden, head.weight, shift_labels, head.bias, chunk)[0]
        if labels is None:
            return project(hidden)
        return causal_lm_loss(hidden, head.weight, labels, head.bias, chunk, num_items, group, offset)

    def forward(input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None:
            return whole(input_ids=input_ids, **kwargs)
        kwargs["use_cache"] = False
        hidden = base(input_ids=input_ids, **kwargs).last_hidden_state
        return CausalLMOutputWithPast(loss=head(hidden, labels=labels, num_items=num_items_in_batch))

    head.forward, model.forward = head_forward, forward
    head.fused_loss = True  # (attention.feed_documents calls the head with labels too)
    return True


def _first_row(weight, group) -> int:
    """Collective: the vocabulary id of this rank's first row of an output projection split over `group`."""
    import torch.distributed as dist

    rows = (getattr(weight, "ds_shape", None) or weight.shape)[0]  # (ZeRO-3 keeps an empty stand-in)
    mine = torch.tensor([rows], device=weight.device)  # (on the weight's device: NCCL reduces GPU tensors only)
    sizes = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    return int(sum(sizes[: dist.get_rank(group)]))
