"""Sampling through transformers' own `generate`: one prompt streams to the terminal token by token;
several prompts run as one left-padded batch."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from dist_clm.errors import UserError


@dataclass(kw_only=True)
class Sampling:
    max_new_tokens: int = 64
    greedy: bool = False  # always the most likely token (temperature 0 means the same)
    temperature: float = 0.8
    top_p: float = 0.95  # nucleus: the smallest set of tokens holding this much probability (1 = off)
    top_k: int = 50  # only the k most likely tokens (0 = off)
    repetition_penalty: float = 1.0  # > 1 makes tokens already in the text less likely (1 = off)
    num_return_sequences: int = 1  # continuations per prompt
    seed: int = 0  # the same seed, prompts and model give the same text

    def check(self) -> None:
        problems = [
            (self.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
            (self.temperature >= 0, "--temperature must be 0 or more"),
            (0 < self.top_p <= 1, "--top-p must be in (0, 1]"),
            (self.top_k >= 0, "--top-k must be 0 or more"),
            (self.repetition_penalty > 0, "--repetition-penalty must be more than 0"),
            (self.num_return_sequences >= 1, "--num-return-sequences must be at least 1"),
            (
                self.num_return_sequences == 1 or not self.is_greedy,
                "--num-return-sequences above 1 needs sampling: greedy decoding gives one continuation; drop "
                "--greedy or use a temperature above 0",
            ),
        ]
        for ok, message in problems:
            if not ok:
                raise UserError(message + ".")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def chat_prompts(tokenizer, conversations: list[list[dict]], where: str) -> list[str]:
    """Each conversation rendered with the tokenizer's chat template, ending with an opened assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"the tokenizer of '{where}' has no chat template, so --chat has nothing to render turns with; train "
            "on data prepared with --format chat (its template is kept with the run), or drop --chat."
        )
    out = []
    for messages in conversations:
        if messages and messages[-1].get("role") == "assistant":
            raise UserError("a --chat conversation must end with a user turn (the model answers it).")
        out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return out


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt; an empty prompt starts from end-of-text, i.e. "a new document"."""
    return [tokenizer(p, add_special_tokens=False).input_ids or [tokenizer.eos_token_id] for p in prompts]


def generate(model, tokenizer, prompts: list[str], s: Sampling, stream: bool = False) -> list[list[str]]:
    """For each prompt, `s.num_return_sequences` continuations (without the prompt).

    Prompts are left-padded into one batch (pad = end-of-text, masked out). With `stream`, one prompt and
    one sequence, the text is written to stdout as it is produced (transformers' TextStreamer).
    """
    import torch
    from transformers import TextStreamer

    from dist_clm.data.tokenizer import end_of_turn_ids
    from dist_clm.evaluation.placement import input_device
    from dist_clm.models.build import max_positions

    s.check()
    ids = encode_prompts(tokenizer, prompts)
    stops = [tokenizer.eos_token_id, *end_of_turn_ids(tokenizer)]  # a chat answer ends with its turn
    limit = max_positions(model.config)
    max_new = s.max_new_tokens
    if limit is not None:
        ids = [p[-(limit - 1) :] for p in ids]  # keep the end of a long prompt; room for one new token
        max_new = min(max_new, limit - max(len(p) for p in ids))
    width = max(len(p) for p in ids)
    pad = tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    device = input_device(model)  # (a model spread over GPUs takes its inputs where its embeddings are)
    streamer = None
    if stream and len(prompts) == 1 and s.num_return_sequences == 1:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    torch.manual_seed(s.seed)
    sampling = not s.is_greedy
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new,
        do_sample=sampling,
        temperature=s.temperature if sampling else None,
        top_p=s.top_p if sampling else None,
        top_k=s.top_k if sampling else None,
        repetition_penalty=s.repetition_penalty,
        num_return_sequences=s.num_return_sequences,
        pad_token_id=pad,
        eos_token_id=stops,
        streamer=streamer,
    )
    if streamer is not None:
        sys.stdout.flush()
    texts = []
    for row in out[:, width:].tolist():  # a continuation ends at its first stop token (the rest is padding)
        end = next((i for i, t in enumerate(row) if t in stops), len(row))
        texts.append(tokenizer.decode(row[:end]))
    n = s.num_return_sequences
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]
