"""Which attention implementation a run trains with, and how packed documents reach it.

With document masking (data.document_mask), a block's position ids restart at every document; each attention
path must keep every token's attention inside its own document, whatever the micro batch size:

- sdpa / eager: transformers turns the restarting positions into a dense block-diagonal causal mask
  (B x 1 x L x L) when no attention mask and no KV cache are given (training passes use_cache=False);
- flex_attention: transformers builds a block-sparse BlockMask from the same positions (masked tiles skipped);
- flash_attention_2: flash attention has no mask; it keeps documents apart only through its variable-length
  entry point, which takes the micro batch as one run of B x L tokens cut at `cu_seq_lens`. transformers
  derives those bounds from position ids only for a micro batch of one row (and its GPT-2 never passes the
  position ids to the attention at all), so without help a micro batch of 8, and every DPO / ORPO batch, would
  attend across documents without a word. `feed_documents` gives the model the bounds itself: each document,
  and each row's start, begins a sequence (`document_bounds`), passed as transformers' own FlashAttentionKwargs
  through the base model, whose layers hand them to the attention.

The choice (`attention_for`): model.attention=auto is sdpa, except with document masking on a GPU, where it is
flash_attention_2 where the flash_attn package is installed and the weights are bf16 or fp16 (the only
precisions its kernels take), else flex_attention where the model has it, else sdpa. On the CPU it is sdpa:
torch has no FlexAttention backward pass there, and flash attention no kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from dist_clm.errors import UserError
from dist_clm.models.build import build_model
from dist_clm.models.loss_head import PLAIN_HEADS  # (feed_documents runs these as base model + output projection)

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

FLASH = "flash_attention_2"
FLASH_PRECISIONS = ("bf16", "fp16")  # flash attention's kernels take no fp32


# Model types whose attention goes through transformers' AttentionInterface and whose mask comes from
# create_causal_mask (so FlexAttention's BlockMask reaches it), without declaring FlexAttention support
# (transformers 4.57's GPT-2): dist_clm switches them to flex_attention after building them with sdpa.
FLEX_THROUGH_INTERFACE = ("gpt2",)


def attention_for(choice: str, document_mask: bool, on_gpu: bool, precision: str) -> list[str]:
    """The attention implementations to try, in order, for model.attention=`choice` (the first the model
    supports is used)."""
    if choice == "flex_attention" and not on_gpu:
        raise UserError(
            "config key 'model.attention' is 'flex_attention', which has no backward pass on CPU; use sdpa (or auto) "
            "on CPU."
        )
    if choice == FLASH and precision not in FLASH_PRECISIONS:
        raise UserError(
            f"config key 'model.attention' is '{FLASH}', whose kernels take bf16 or fp16 only, but the run trains "
            f"in {precision}; set train.precision=bf16 (or fp16), or model.attention=auto."
        )
    if choice != "auto":
        return [choice]
    if not (document_mask and on_gpu):
        return ["sdpa"]
    import importlib.util

    flash = [FLASH] if precision in FLASH_PRECISIONS and importlib.util.find_spec("flash_attn") else []
    return [*flash, "flex_attention", "sdpa"]


def _with_flex(preset: str, pretrained: str, overrides: dict[str, Any], tokenizer, rope):
    """The model with FlexAttention: transformers' own where the model declares it, else the switch above."""
    try:
        model = build_model(preset, pretrained, overrides, tokenizer, "flex_attention", rope=rope)
    except ValueError:
        model = build_model(preset, pretrained, overrides, tokenizer, "sdpa", rope=rope)
        if model.config.model_type not in FLEX_THROUGH_INTERFACE:
            raise
        model.config._attn_implementation = "flex_attention"
    # transformers' flex_attention takes no dropout: the model's attention dropout would be dropped silently
    if any(getattr(model.config, key, 0.0) for key in ("attn_pdrop", "attention_dropout")):
        raise ValueError("flex_attention has no attention dropout, and this model's is above 0")
    return model


def _with_flash(preset: str, pretrained: str, overrides: dict[str, Any], tokenizer, document_mask: bool, rope):
    model = build_model(preset, pretrained, overrides, tokenizer, FLASH, rope=rope)
    if document_mask and model.config.model_type not in PLAIN_HEADS:  # (a ValueError: the next choice, if any)
        raise ValueError(
            f"flash attention keeps documents apart here only for {', '.join(PLAIN_HEADS)} models, not "
            f"{model.config.model_type}"
        )
    return model


def build_model_with(
    attention: list[str], preset: str, pretrained: str, overrides: dict[str, Any], tokenizer,
    document_mask: bool = False, rope: tuple[float, dict] = (0.0, {}),
):  # fmt: skip
    """build_model with the first of `attention` the model supports; a single choice it lacks is one sentence.
    With flash attention and `document_mask`, call feed_documents(model) once its forward is final."""
    for i, attn in enumerate(attention):
        try:
            if attn == "flex_attention":
                return _with_flex(preset, pretrained, overrides, tokenizer, rope)
            if attn == FLASH:
                return _with_flash(preset, pretrained, overrides, tokenizer, document_mask, rope)
            return build_model(preset, pretrained, overrides, tokenizer, attn, rope=rope)
        except (ValueError, ImportError) as e:  # transformers: this model or machine lacks that implementation
            if "attention" not in str(e).lower():
                raise
            if i + 1 == len(attention):
                raise UserError(
                    f"config key 'model.attention' is '{attn}', which this model or machine does not support "
                    f"({str(e).strip().splitlines()[0][:200]}); use auto or sdpa."
                ) from None
    raise AssertionError("no attention implementation to try")


def document_bounds(position_ids: torch.Tensor) -> dict[str, Any]:
    """flash attention's variable-length arguments (transformers' FlashAttentionKwargs) for a micro batch of
    packed rows (B x L position ids that restart at 0 at each document): the B x L tokens as one run cut at
    every document start and at every row's start. The longest sequence is given as L, a bound that holds for
    every micro batch: the same value each time (torch.compile does not specialize on it) and no host read
    to find it; finding the cuts reads the ids (done on the host by the training step)."""
    starts = position_ids == 0
    starts[:, 0] = True  # (a row that begins inside a document still begins a sequence)
    cuts = torch.nonzero(starts.flatten()).flatten()
    bounds = torch.cat([cuts, cuts.new_tensor([position_ids.numel()])]).to(torch.int32)
    row = position_ids.shape[1]
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": row, "max_length_k": row}


FLEX_BLOCK = 128  # FlexAttention's tile (torch's default BLOCK_SIZE for create_block_mask)


def document_block_mask(doc: torch.Tensor) -> BlockMask:
    """FlexAttention's BlockMask for packed rows: causal within each document, where `doc` (B x L) numbers each
    token's document and never decreases along a row. It is built from the tiles' bounds, never a B x L x L mask
    (torch's eager create_block_mask evaluates the rule at every pair: 16 GiB per row at 128K tokens); a tile
    below the diagonal is full (the kernel skips the rule) when its query and key tiles lie whole inside one
    document, partial (the rule decides per pair) when the query tile's first document is the key tile's last,
    and skipped otherwise; a diagonal tile is always partial. The tiles are create_block_mask's exactly."""
    from torch.nn.attention.flex_attention import BlockMask

    n = doc.shape[1]
    first, last, whole = _tile_bounds(doc, FLEX_BLOCK)
    tile = torch.arange(first.shape[1], device=doc.device)
    below, diagonal = tile[None, :, None] > tile[None, None, :], tile[None, :, None] == tile[None, None, :]
    # B x T x T from here: [row, query tile, key tile]
    full = below & (first[:, None, :] == last[:, :, None]) & (whole[:, None] & whole[None, :])
    partial = ((below & (last[:, None, :] == first[:, :, None])) | diagonal) & ~full

    def same_document(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

    return BlockMask.from_kv_blocks(
        *_ordered(partial), *_ordered(full), BLOCK_SIZE=FLEX_BLOCK, mask_mod=same_document, seq_lengths=(n, n)
    )


def _tile_bounds(doc: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each tile of `size` tokens: its first and last token's document (B x T), and whether it holds `size` real
    tokens (T; the last tile of a row whose length `size` does not divide is padded, so never full)."""
    n = doc.shape[1]
    starts = torch.arange(0, n, size, device=doc.device)
    ends = (starts + size).clamp(max=n)
    return doc[:, starts], doc[:, ends - 1], ends - starts == size


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A B x T x T tile map as BlockMask takes it (B x 1 heads): how many tiles each query tile attends, and
    their key tiles' numbers, ascending, followed by the rest (create_block_mask's order)."""
    tiles = tiles[:, None].to(torch.int32)
    order = torch.argsort(tiles, dim=-1, descending=True, stable=True)
    return tiles.sum(-1, dtype=torch.int32), order.to(torch.int32)


def no_padding(input_ids: torch.Tensor) -> torch.Tensor:
    """An all-ones padding mask for rows of one sequence each (no document masking), for sdpa: without it
    transformers 4.57 takes such rows for packed ones (its packed-sequence check finds one sequence and does
    not say none) and hands sdpa a materialized B x 1 x L x L causal mask, which rules out its fused causal
    kernels (the CPU's math path holds L x L scores per head); with it, sdpa gets is_causal."""
    return torch.ones_like(input_ids)


def feeds_documents(model) -> bool:
    return getattr(model, "_dist_clm_feeds_documents", False)


def feed_documents(model) -> None:
    """Make a flash-attention model keep packed documents apart (see the module docstring): a forward call with
    position ids and use_cache=False runs the base model with `document_bounds` (those the caller passes win:
    the training step computes them on the host, before the copy to the GPU), then the output projection:
    logits, or the loss through the fused loss head where installed (loss_head.install, which must come
    first), else transformers' own loss function. Other calls (generation) are unchanged."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if model.config.model_type not in PLAIN_HEADS:
        raise ValueError(f"feed_documents: {model.config.model_type} models are not supported")
    base, head, whole = model.base_model, model.get_output_embeddings(), model.forward

    def forward(input_ids=None, position_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        if position_ids is None or kwargs.get("use_cache", True) is not False:
            extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
            return whole(input_ids=input_ids, position_ids=position_ids, labels=labels, **kwargs, **extra)
        if "cu_seq_lens_q" not in kwargs:
            kwargs |= document_bounds(position_ids)
        hidden = base(input_ids=input_ids, position_ids=position_ids, **kwargs).last_hidden_state
        if labels is None:
            return CausalLMOutputWithPast(logits=head(hidden))
        if getattr(head, "fused_loss", False):
            return CausalLMOutputWithPast(loss=head(hidden, labels=labels, num_items=num_items_in_batch))
        logits = head(hidden)
        loss = model.loss_function(logits, labels, vocab_size=model.config.vocab_size,
                                   num_items_in_batch=num_items_in_batch)  # fmt: skip
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    model.forward = forward
    model._dist_clm_feeds_documents = True
