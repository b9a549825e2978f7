"""Sequence parallelism: each block's tokens split over a group of ranks (DeepSpeed's Ulysses), for sequences
longer than one GPU's activations hold.

Groups: `size` consecutive ranks form a group (DeepSpeed's parallel_state_sp, passed to deepspeed.initialize as
its mpu); ZeRO still partitions over every rank. Every rank of a group reads the same micro batch (the loader
counts data-parallel ranks, rank // size of world // size: the global batch counts sequences, so the size changes
nothing in the math), and trains on its own consecutive 1/size of every row's tokens.

The forward pass (`install`): the model's forward, given the whole rows, shifts the labels over the whole row
(each slice's last target is the next slice's first token), cuts out this rank's slice of ids, positions and
shifted labels, and runs the model on it. In each attention layer DeepSpeed's UlyssesSPAttentionHF exchanges
query, key and value all-to-all over the group, so that each rank holds the whole sequence for 1/size of the
heads, calls the core attention, and exchanges the result back.

The core attention is dist_clm's (`_Core`), because DeepSpeed 0.19's wrapper drops transformers' 4-D masks and
rebuilds a plain causal one for flex attention: packed documents would attend across each other without a word.
Every rank knows the whole row's positions (its group holds the full micro batch), so the core keys documents on
them, once per forward pass: sdpa gets the dense same-document causal mask, flex attention a BlockMask of the
same, flash attention the documents' bounds (attention.document_bounds) over the whole rows.

DeepSpeed's wrapper sets each attention's num_key_value_groups to the group's local ratio of query to key/value
heads when it replicates key/value heads (more ranks than key/value heads), and leaves it there; the model's own
calls (validation, generation) repeat the key/value heads by it, so it is put back after each of the wrapper's.

The loss: a rank's is the sum of its tokens' losses over the micro batch's predicted tokens (or the objective's
num_items_in_batch), so the group's losses sum to the micro batch's, and the unsharded gradient is the sum of the
group's. DeepSpeed divides each reduced gradient by the world's size over the group's size (the groups) on every
path of ZeRO 0-2, and on ZeRO-3's all-reduced buckets; but by the world's size where ZeRO-3 reduce-scatters, which
it does to every gradient by default, and without reduce_scatter (Muon's setting) to a parameter larger than
reduce_bucket_size (or to every one with contiguous_gradients off). `fit_reduction` reads which from the engine:
the loss is scaled by the group's size where every gradient is reduce-scattered (`for_backward`), and only those
parameters' gradients where some are. `whole` is what a rank reports: its share x the size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place in sequence parallelism (size 1: none)."""

    size: int = 1
    rank: int = 0  # within its group
    scale: int = 1  # the loss's factor before backward (fit_reduction: the group's size, or 1)

    def whole(self, loss: torch.Tensor, share: bool = True) -> torch.Tensor:
        """The micro batch's loss from this rank's share of it (what the rank reports; no gradient); a loss
        every rank of the group computed whole (`share` false: the preference objectives) as it is."""
        return loss if self.size == 1 or not share else loss.detach() * self.size

    def for_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """This rank's share (or the whole loss, whose gradient reaches this rank's tokens only: `_Gather`),
        scaled so that DeepSpeed's gradient reduction gives the unsharded gradient."""
        return loss * self.scale if self.scale != 1 else loss

    def counts(self) -> bool:
        """Whether this rank counts the group's blocks and tokens in the logs (one rank per group does)."""
        return self.rank == 0


def _heads(config) -> tuple[int, int]:
    text = config.get_text_config()
    heads = text.num_attention_heads
    return heads, getattr(text, "num_key_value_heads", None) or heads


def groups(size: int):
    """Collective: DeepSpeed's sequence-parallel groups of `size` consecutive ranks; their module, the mpu that
    deepspeed.initialize takes."""
    import deepspeed.runtime.engine as engine
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    mpu._release_sequence_parallel_groups()  # (a process that set up a run before)
    mpu.initialize_sequence_parallel(size)
    # DeepSpeed 0.19 treats these groups as data parallelism (ZeRO partitions over every rank, one model-state
    # file), but writes the group's size into the checkpoint as its tensor-parallel degree, which its universal
    # converter then refuses ("model-state file count 1 does not match tp_degree=2"): record what it is
    metadata = getattr(engine, "_checkpoint_parallel_metadata", None)  # (DeepSpeed versions without it record none)
    if metadata is not None and not getattr(metadata, "dist_clm", False):

        def parallel_metadata(group_module):
            if hasattr(group_module, "initialize_sequence_parallel"):
                group_module = None  # (pipeline and tensor parallel degrees 1)
            return metadata(group_module)

        parallel_metadata.dist_clm = True
        engine._checkpoint_parallel_metadata = parallel_metadata
    return mpu


class _Documents:
    """The current micro batch's rows as the core attention needs them: set by each sharded forward pass, kept
    until the next (activation checkpointing recomputes layers in the backward pass), masks made once per pass."""

    def __init__(self):
        self.doc: torch.Tensor | None = None  # B x L: each token's document number (None: one per row)
        self.positions: torch.Tensor | None = None  # B x L: the whole rows' position ids
        self.local: torch.Tensor | None = None  # this rank's slice of them
        self._made: dict[str, Any] = {}

    def begin(self, positions: torch.Tensor, local: torch.Tensor, documents: bool) -> None:
        self.positions, self.local, self._made = positions, local, {}
        if documents:
            starts = positions == 0
            starts[:, 0] = True  # (a row that begins inside a document begins a sequence)
            self.doc = starts.cumsum(1)
        else:
            self.doc = None

    def dense_mask(self) -> torch.Tensor | None:
        """sdpa: B x 1 x L x L, true where a token may attend (its own document, not ahead); None: plain causal."""
        if self.doc is None:
            return None
        if "dense" not in self._made:
            n = self.doc.shape[1]
            causal = torch.ones(n, n, dtype=torch.bool, device=self.doc.device).tril()
            self._made["dense"] = ((self.doc[:, :, None] == self.doc[:, None, :]) & causal)[:, None]
        return self._made["dense"]

    def block_mask(self):
        """flex attention: a BlockMask of the same rule (causal within each document), built tile by tile (no
        L x L mask; one document per row without document masking)."""
        if "block" not in self._made:
            from dist_clm.models.attention import document_block_mask

            doc = self.doc if self.doc is not None else torch.zeros_like(self.positions)
            self._made["block"] = document_block_mask(doc)
        return self._made["block"]

    def flash_bounds(self) -> dict:
        """flash attention: every document (and row) of the micro batch as one run cut at their starts."""
        if "flash" not in self._made:
            from dist_clm.models.attention import document_bounds

            self._made["flash"] = document_bounds(self.positions) if self.doc is not None else {}
        return self._made["flash"]


class _Core:
    """The attention after the all-to-all (whole sequence, 1/size of the heads), documents kept apart."""

    def __init__(self, implementation: str, original, documents: _Documents):
        self.implementation, self.original, self.documents = implementation, original, documents

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        docs = self.documents
        if self.implementation == "flex_attention":
            return self.original(module, query, key, value, docs.block_mask(), scaling=scaling, **kw)
        if self.implementation == "flash_attention_2":
            kw |= docs.flash_bounds()
            return self.original(module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=True,
                                 **kw)  # fmt: skip
        mask = docs.dense_mask()  # (sdpa; GPT-2 says is_causal=False whenever it built a 4-D mask: ignored)
        return self.original(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                             is_causal=mask is None, **kw)  # fmt: skip


def install(model, size: int, mpu) -> SequenceParallel:
    """Make `model` train sequence-parallel over its group (the module docstring): its attention through
    DeepSpeed's Ulysses wrapper with dist_clm's core, its forward with labels (training) on this rank's slice of
    each row. Calls without labels, and in eval mode (validation, generation), run whole rows as before. The loss
    scale follows once the engine exists: `fit_reduction`."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    group, rank = mpu.get_sequence_parallel_group(), mpu.get_sequence_parallel_rank()
    config, documents = model.config, _Documents()
    implementation = config._attn_implementation
    original = ALL_ATTENTION_FUNCTIONS[implementation]
    text = config.get_text_config()
    heads, kv = _heads(config)
    ulysses = UlyssesSPAttentionHF(
        attn=_Core(implementation, original, documents),
        batch_size=1,  # (set per call below: micro batches and validation differ)
        attn_head_count=heads,
        attn_head_size=getattr(text, "head_dim", None) or text.hidden_size // heads,
        kv_head_count=kv,
        num_hidden_layers=text.num_hidden_layers,
        process_group=group,
        seq_length_is_variable=True,
    )
    for m in model.modules():  # (marked, not remembered by id: a later model's module may reuse a freed id)
        m._dist_clm_documents = documents

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if (
            getattr(module, "_dist_clm_documents", None) is not documents
            or not module.training
            or documents.local is None
        ):
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        _fit(ulysses, query.shape[0])
        kwargs.pop("is_causal", None)
        kwargs["position_ids"] = documents.local  # (GPT-2 passes none; the wrapper gathers them, the core keys on ours)
        own = vars(module).get("num_key_value_groups")  # (the wrapper sets its local ratio for good: put it back)
        try:
            out, weights = ulysses(module, query, key, value, None, *args, **kwargs)
        finally:
            if own is None:
                vars(module).pop("num_key_value_groups", None)
            else:
                module.num_key_value_groups = own
        return out.view(*out.shape[:2], heads, -1), weights  # (B x L x heads x dim, as every model expects)

    # process-wide, under the model's own implementation name, so that transformers' code paths that ask for it
    # still run; calls from any other model, or in eval mode, go to the original
    ALL_ATTENTION_FUNCTIONS[implementation] = attention
    base, head, whole = model.base_model, model.get_output_embeddings(), model.forward
    fused = getattr(head, "fused_loss", False)

    def forward(input_ids=None, labels=None, position_ids=None, num_items_in_batch=None, token_logps=False, **kwargs):
        if labels is None or not model.training:
            return whole(input_ids=input_ids, labels=labels, position_ids=position_ids,
                         **({} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}),
                         **kwargs)  # fmt: skip
        rows, length = input_ids.shape
        n = length // size
        cut = slice(rank * n, (rank + 1) * n)
        positions = position_ids
        if positions is None:
            positions = torch.arange(length, device=input_ids.device).expand(rows, length)
        documents.begin(positions, positions[:, cut].contiguous(), position_ids is not None)
        shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
        count = num_items_in_batch if num_items_in_batch is not None else (shifted != IGNORE).sum().clamp(min=1)
        kwargs["use_cache"] = False
        kwargs.pop("attention_mask", None)  # (the whole rows' no-padding mask: the core attends causally itself)
        hidden = base(input_ids=input_ids[:, cut], position_ids=documents.local, **kwargs).last_hidden_state
        mine = shifted[:, cut]
        if token_logps:  # (the preference objectives: B x L-1 log-probabilities, gathered from the group)
            logits = head(hidden).float()
            logp = -F.cross_entropy(logits.transpose(1, 2), mine.clamp(min=0), reduction="none")
            return CausalLMOutputWithPast(logits=_Gather.apply(logp, group, rank, size)[:, :-1])
        if fused:
            total = head(hidden, shift_labels=mine)
        else:
            logits = head(hidden).float()
            total = F.cross_entropy(logits.flatten(0, 1), mine.flatten(), ignore_index=IGNORE, reduction="sum")
        return CausalLMOutputWithPast(loss=total / count)

    model.forward = forward
    return SequenceParallel(size, rank)


def fit_reduction(sp: SequenceParallel, engine) -> SequenceParallel:
    """After deepspeed.initialize: `sp` with the loss scale that makes `engine`'s gradient reduction give the
    unsharded gradient (the module docstring), read from its ZeRO optimizer; where ZeRO-3 reduces some parameters'
    gradients one way and the rest the other, a hook scales those of the reduce-scattered ones instead."""
    if sp.size == 1 or engine.zero_optimization_stage() != 3:
        return sp  # (every path divides by the groups)
    zero = engine.optimizer  # (DeepSpeed's stage 3 optimizer: how it reduces, deepspeed/runtime/zero/stage3.py)
    if zero.reduce_scatter or not zero.contiguous_gradients:
        return replace(sp, scale=sp.size)  # (every gradient reduce-scattered: divided by every rank)
    # reduce_scatter off: a bucket of gradients up to reduce_bucket_size elements is all-reduced and divided by the
    # groups; a parameter larger than that fills a bucket alone and is reduce-scattered, divided by every rank
    size = sp.size
    for p in engine.module.parameters():
        if p.requires_grad and p.ds_numel > zero.reduce_bucket_size:
            p.register_hook(lambda grad: grad * size)  # (before the gradient accumulates: DeepSpeed's hook after)
    return sp


class _Gather(torch.autograd.Function):
    """The group's slices of a B x n tensor, concatenated along the rows. Every rank of the group computes the same
    loss from the result, so the gradient of this rank's slice is that loss's gradient at the slice: no reduction
    (DeepSpeed's gradient reduction then sums the ranks' parameter gradients)."""

    @staticmethod
    def forward(ctx, local, group, rank: int, size: int):
        import torch.distributed as dist

        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local.contiguous(), group=group)
        ctx.cut = slice(rank * local.shape[1], (rank + 1) * local.shape[1])
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, ctx.cut], None, None, None


def _fit(ulysses, batch: int) -> None:
    """The wrapper checks shapes against the micro batch it was built for: make it this call's."""
    if ulysses.batch_size != batch:
        ulysses.batch_size = batch
        q, kv, c = ulysses.required_query_shape, ulysses.required_key_value_shape, ulysses.required_context_shape
        ulysses.required_query_shape = torch.Size([q[0], batch, *q[2:]])
        ulysses.required_key_value_shape = torch.Size([kv[0], batch, *kv[2:]])
        ulysses.required_context_shape = torch.Size([c[0], batch, *c[2:]])
