"""Perplexity's windows and bits per byte (evaluation/perplexity.py), computed in one process."""

import numpy as np
from transformers import AutoTokenizer

from dist_clm.evaluation.perplexity import token_byte_lengths, windows


def test_windows_score_every_token_once():
    for n, block, stride in [(100, 16, 4), (100, 16, 16), (17, 16, 5), (1000, 64, 63)]:
        wins = windows(n, block, stride)
        scored = np.zeros(n, dtype=int)
        for w in wins:
            assert 2 <= w.length <= block and 1 <= w.scored <= w.length - 1
            scored[w.start + w.length - w.scored : w.start + w.length] += 1
            if stride < block and w.start > 0:
                assert w.length - w.scored >= min(block - stride, w.start)  # the promised context
        if stride < block:
            assert scored[0] == 0 and (scored[1:] == 1).all()
    blocks = windows(100, 16)
    assert blocks == windows(100, 16, 16) and sum(w.scored for w in blocks) == 100 - len(blocks)
    assert len(windows(100, 16, 4, max_windows=3)) == 3


def test_bytes_per_token_add_up_to_the_texts_utf8_bytes(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    table = token_byte_lengths(tok)
    for text in ["def f(x):\n    return x  # plain", "naïve café — ✓ 日本語 😀", "\t\n  "]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert table[ids].sum() == len(text.encode("utf-8"))
    assert table[tok.eos_token_id] == 0
