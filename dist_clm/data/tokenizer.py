"""Tokenizers: train a byte-level BPE on a corpus, or load a pretrained one from a local directory.

Either way the result is a directory that `transformers.AutoTokenizer.from_pretrained` loads, and the
tokenizer must have an end-of-text token: prepare appends it to every document so packed blocks keep
document boundaries visible to the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from dist_clm.errors import UserError
from dist_clm.fsutil import atomic_dir, refuse_non_empty

EOS_TOKEN = "<|endoftext|>"

# Chat templates dist-clm knows by name: (the special tokens they need, the Jinja template). ChatML: each turn
# is <|im_start|>ROLE, a newline, the content, <|im_end|> and a newline; a generation prompt opens an assistant
# turn. `dist-clm tokenizer train --chat-template chatml` reserves the tokens as special tokens, so that the
# chat data needs no resize of the vocabulary later.
CHAT_TEMPLATES: dict[str, tuple[tuple[str, ...], str]] = {
    "chatml": (
        ("<|im_start|>", "<|im_end|>"),
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    ),
}
END_OF_TURN = {"chatml": "<|im_end|>"}


def use_chat_template(tok, name: str | None, where: str | Path) -> None:
    """Give `tok` the named template (when it has none of its own), or refuse in one sentence when it has
    none and none is named."""
    if getattr(tok, "chat_template", None):
        return
    if not name:
        raise UserError(
            f"the tokenizer in '{where}' has no chat template; pass --chat-template chatml (dist-clm's default) or "
            "use a tokenizer that has one."
        )
    if name not in CHAT_TEMPLATES:
        raise UserError(f"--chat-template must be one of {', '.join(CHAT_TEMPLATES)}, got {name!r}.")
    tok.chat_template = CHAT_TEMPLATES[name][1]


def end_of_turn_ids(tok) -> list[int]:
    """The token ids that end an assistant turn (besides EOS), where the tokenizer has them as single tokens."""
    ids = []
    for token in END_OF_TURN.values():
        i = tok.convert_tokens_to_ids(token)
        if isinstance(i, int) and i != tok.unk_token_id and i not in ids and tok.convert_ids_to_tokens(i) == token:
            ids.append(i)
    return ids


def train_bpe(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 8192, min_frequency: int = 2,
    chat_template: str | None = None,
) -> Path:  # fmt: skip
    """Train a byte-level BPE (GPT-2 style: any byte sequence encodes, nothing is unknown) and save it. With
    `chat_template` (a name in CHAT_TEMPLATES) its special tokens are reserved and the template saved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise UserError(f"--vocab-size must be at least 257 (256 bytes + {EOS_TOKEN}), got {vocab_size}.")
    if chat_template and chat_template not in CHAT_TEMPLATES:
        raise UserError(f"--chat-template must be one of {', '.join(CHAT_TEMPLATES)}, got {chat_template!r}.")
    specials = [EOS_TOKEN, *(CHAT_TEMPLATES[chat_template][0] if chat_template else ())]
    out = Path(out_dir)
    refuse_non_empty(out)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = _Counter(texts)
    tok.train_from_iterator(seen, trainer=trainer)
    if seen.count == 0:
        raise UserError("the corpus holds no non-empty document to train the tokenizer on; point it at text files.")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN)
    fast.model_max_length = 1_000_000_000  # the model, not the tokenizer, limits positions
    if chat_template:
        fast.add_special_tokens({"additional_special_tokens": specials[1:]})  # (already in the vocabulary)
        fast.chat_template = CHAT_TEMPLATES[chat_template][1]
    with atomic_dir(out) as tmp:
        fast.save_pretrained(tmp)
    return out


class _Counter:
    """Iterates texts, skipping empty ones, and counts what went through."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.count = texts, 0

    def __iter__(self) -> Iterator[str]:
        for t in self.texts:
            if t:
                self.count += 1
                yield t


def load_tokenizer(path: str | Path):
    """Load a (fast) tokenizer from a local directory and check it can end documents."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise UserError(
            f"tokenizer directory '{p}' does not exist; train one with `dist-clm tokenizer train` or give a local "
            "directory that AutoTokenizer.from_pretrained loads."
        )
    hint = "it needs tokenizer.json (or a transformers tokenizer's files) and tokenizer_config.json"
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise UserError(f"'{p}' is not a loadable tokenizer directory; {hint}.")
    try:
        tok = AutoTokenizer.from_pretrained(str(p), use_fast=True)
    except Exception as e:  # transformers raises many kinds here (OSError, ValueError, AttributeError...)
        raise UserError(f"'{p}' is not a loadable tokenizer directory ({e.__class__.__name__}: {e}); {hint}.") from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"the tokenizer in '{p}' has no fast (Rust) implementation; convert it to tokenizer.json.")
    if tok.eos_token_id is None:
        raise UserError(
            f"the tokenizer in '{p}' has no end-of-text token; set eos_token in its tokenizer_config.json "
            f"(e.g. to {EOS_TOKEN!r}) so documents can be separated."
        )
    return tok


def fingerprint(tok) -> str:
    """A hash of the tokenizer's full definition (its tokenizer.json): equal fingerprints tokenize equally."""
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def vocab_size(tok) -> int:
    """Ids the tokenizer can produce, added tokens included (len(), not .vocab_size, which omits them)."""
    return len(tok)
