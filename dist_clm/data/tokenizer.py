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


def train_bpe(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 8192, min_frequency: int = 2) -> Path:
    """Train a byte-level BPE (GPT-2 style: any byte sequence encodes, nothing is unknown) and save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise UserError(f"--vocab-size must be at least 257 (256 bytes + {EOS_TOKEN}), got {vocab_size}.")
    out = Path(out_dir)
    refuse_non_empty(out)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = _Counter(texts)
    tok.train_from_iterator(seen, trainer=trainer)
    if seen.count == 0:
        raise UserError("the corpus holds no non-empty document to train the tokenizer on; point it at text files.")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN)
    fast.model_max_length = 1_000_000_000  # the model, not the tokenizer, limits positions
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
