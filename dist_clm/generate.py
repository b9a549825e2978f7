"""Sampling with temperature, top_p and top_k through transformers' own `generate`."""

from __future__ import annotations

import torch

from dist_clm.model import max_positions


def generate(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> str:
    """The continuation of `prompt` (without it). temperature 0 means greedy; the same seed gives the same text."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] == 0:  # an empty prompt starts from end-of-text, i.e. "a new document"
        ids = torch.tensor([[tokenizer.eos_token_id]])
    limit = max_positions(model.config)
    if limit is not None:
        ids = ids[:, -limit + 1 :]
        max_new_tokens = min(max_new_tokens, limit - ids.shape[1])
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    sampling = temperature > 0
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=top_k if sampling else None,
        pad_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=False)
