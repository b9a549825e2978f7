"""Fine-tuning data: records -> token ids with a loss mask -> blocks of whole conversations.

Formats (`dist-clm prepare --format`):
- `chat`: a `messages` column, a list of {role, content} (roles system, user, assistant), rendered with the
  tokenizer's chat template. The assistant turns are learned, each with what the template puts after its
  content (the end-of-turn token: the model learns to stop); system and user turns are not.
- `prompt-completion`: `prompt` and `completion` columns. Strings: the completion's tokens follow the prompt's
  (each tokenized on its own) and end with EOS; the completion and the EOS are learned. Lists of messages: the
  prompt's messages then the completion's, rendered as a chat, only the completion's assistant turns learned.

Which tokens are learned is decided on characters: the rendering of the conversation up to each assistant turn
(with the generation prompt) and through it give the turn's span in the whole rendering, and a token is learned
when it starts inside a span. A template whose renderings are not prefixes of each other cannot be split this
way and is refused.

Packing (`Packer`): blocks of exactly `block_size` tokens, each holding whole conversations, first fit over a
few open blocks in order; the rest of a block is padding (EOS, not learned, a document of its own). A
conversation longer than a block keeps its first `block_size` tokens (counted as truncated); one that keeps no
learned token is dropped (counted). Every conversation starts a document, so with document masking (on for
such data) attention stays inside it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from dist_clm.data.sources import Columns
from dist_clm.errors import UserError

FORMATS = ("text", "chat", "prompt-completion", "preference")
COLUMNS = {"chat": ("messages",), "prompt-completion": ("prompt", "completion"),
           "preference": ("prompt", "chosen", "rejected")}  # fmt: skip
ROLES = ("system", "user", "assistant")


def columns(fmt: str) -> Columns:
    """The columns a record of `fmt` has (sources.iter_records reads them)."""
    names = COLUMNS[fmt]
    return Columns(names, f"this --format reads {', '.join(names)}")


class Renderer:
    """A record of one format -> (token ids, loss mask: 1 where the token is learned), both int64 arrays."""

    def __init__(self, tok, fmt: str):
        self.tok, self.fmt = tok, fmt

    def pair(self, record: dict, where: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """A preference record: [(chosen ids, mask), (rejected ids, mask)], each the prompt and one answer."""
        if record["chosen"] == record["rejected"]:
            raise UserError(
                f"{where} has the same chosen and rejected answer: the pair teaches nothing; remove it or fix one."
            )
        return [self({"prompt": record["prompt"], "completion": record[k]}, where) for k in ("chosen", "rejected")]

    def __call__(self, record: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
        if self.fmt == "chat":
            return self.chat(_messages(record["messages"], where, "messages"), 0, where)
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return self.plain(prompt, completion, where)
        if isinstance(prompt, list) and isinstance(completion, list):
            first = len(prompt)
            return self.chat(_messages(prompt, where, "prompt") + _messages(completion, where, "completion"), first,
                             where)  # fmt: skip
        raise UserError(
            f"{where}: prompt and completion must both be strings or both be lists of messages; got "
            f"{type(prompt).__name__} and {type(completion).__name__}."
        )

    def plain(self, prompt: str, completion: str, where: str) -> tuple[np.ndarray, np.ndarray]:
        if not completion:
            raise UserError(f"{where} has an empty completion: nothing to learn; remove the record or fill it in.")
        p = self.tok(prompt, add_special_tokens=False)["input_ids"]
        c = self.tok(completion, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return np.asarray(p + c, dtype=np.int64), np.asarray([0] * len(p) + [1] * len(c), dtype=np.int64)

    def chat(self, messages: list[dict], first: int, where: str) -> tuple[np.ndarray, np.ndarray]:
        """`messages` rendered; the assistant turns from index `first` on are learned."""
        learned = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first]
        if not learned:
            raise UserError(
                f"{where} has no assistant turn{' in its completion' if first else ''}: nothing to learn; remove "
                "the record or add the assistant's answer."
            )
        text = self._render(messages, False, where)
        spans = []
        for i in learned:
            before = self._render(messages[:i], True, where)
            through = self._render(messages[: i + 1], False, where)
            if not (text.startswith(through) and through.startswith(before)):
                raise UserError(
                    f"the tokenizer's chat template renders {where} differently turn by turn (a turn's rendering is "
                    "not a prefix of the whole), so its assistant turns cannot be found; use a template that "
                    "renders turns in order, e.g. --chat-template chatml on a tokenizer without one."
                )
            spans.append((len(before), len(through)))
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = np.asarray([a for a, _ in enc["offset_mapping"]], dtype=np.int64)
        mask = np.zeros(len(starts), dtype=np.int64)
        for lo, hi in spans:
            mask[(starts >= lo) & (starts < hi)] = 1
        return np.asarray(enc["input_ids"], dtype=np.int64), mask

    def _render(self, messages: list[dict], generation_prompt: bool, where: str) -> str:
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja's errors (a template's raise_exception, undefined variables)
            raise UserError(f"the tokenizer's chat template cannot render {where} ({e}).") from None


def _messages(value, where: str, column: str) -> list[dict]:
    """`value` checked to be a list of {role, content} with known roles and string contents."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: '{column}' must be a non-empty list of messages with 'role' and 'content'.")
    out = []
    for n, m in enumerate(value, 1):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise UserError(
                f"{where}: message {n} of '{column}' must have a role ({', '.join(ROLES)}) and a string content, got "
                f"{str(m)[:80]}."
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


class Packer:
    """Conversations (ids, mask) -> blocks of exactly `block_size` tokens of whole conversations plus padding.

    With `lanes` = 2 (preference pairs) each item is a pair of conversations (chosen, rejected) placed in two
    parallel blocks, at the same rank among the conversations of each: the j-th conversation of the chosen
    block and the j-th of the rejected block are one pair, and the two blocks follow each other in the stream.
    """

    OPEN = 8  # items being filled at once (first fit); the oldest is closed when a ninth is needed

    def __init__(self, block_size: int, pad_id: int, lanes: int = 1):
        self.block_size, self.pad_id, self.lanes = block_size, pad_id, lanes
        self.open: list[list[list[tuple[np.ndarray, np.ndarray]]]] = []  # per open item: per lane, its pieces
        self.stats = {"conversations": 0, "truncated": 0, "dropped": 0, "learned_tokens": 0, "padding_tokens": 0}

    def add(self, *items: tuple[np.ndarray, np.ndarray]) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
        """Place one conversation (or one pair: one per lane); yields the blocks this closes, lane by lane, each
        a list of (ids, mask) pieces."""
        kept = []
        for ids, mask in items:
            if len(ids) > self.block_size:
                ids, mask = ids[: self.block_size], mask[: self.block_size]
                self.stats["truncated"] += 1
            kept.append((ids, mask))
        if not all(mask[1:].any() for _, mask in kept):  # (a block's first token is never a target)
            self.stats["dropped"] += 1
            return
        self.stats["conversations"] += 1
        self.stats["learned_tokens"] += sum(int(mask[1:].sum()) for _, mask in kept)
        for item in self.open:
            if all(sum(len(p[0]) for p in lane) + len(ids) <= self.block_size
                   for lane, (ids, _) in zip(item, kept, strict=True)):  # fmt: skip
                for lane, piece in zip(item, kept, strict=True):
                    lane.append(piece)
                return
        if len(self.open) == self.OPEN:
            yield from self._close(self.open.pop(0))
        self.open.append([[piece] for piece in kept])

    def finish(self) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
        while self.open:
            yield from self._close(self.open.pop(0))

    def _close(self, item: list[list[tuple[np.ndarray, np.ndarray]]]) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
        for block in item:
            room = self.block_size - sum(len(p[0]) for p in block)
            if room:
                block.append((np.full(room, self.pad_id, dtype=np.int64), np.zeros(room, dtype=np.int64)))
                self.stats["padding_tokens"] += room
            yield block
