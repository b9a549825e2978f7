import pytest
from transformers import AutoTokenizer

from dist_clm.data.tokenizer import EOS_TOKEN, fingerprint, load_tokenizer, train_bpe
from dist_clm.errors import UserError
from tests.helpers import without_eos


def test_trained_tokenizer_loads_with_autotokenizer_and_round_trips(tokenizer_dir, corpus_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert tok.eos_token == EOS_TOKEN and tok.eos_token_id is not None
    assert len(tok) == 512
    text = next(corpus_dir.iterdir()).read_text()[:2000] + "\n\tünïcödé ✓ 🚀\r\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text  # byte-level: every string round-trips exactly
    assert len(ids) < len(text.encode())  # and BPE merges actually compress


def test_training_is_deterministic(tmp_path, corpus_dir):
    docs = [p.read_text() for p in sorted(corpus_dir.iterdir())[:10]]
    a = load_tokenizer(train_bpe(docs, tmp_path / "a", vocab_size=400))
    b = load_tokenizer(train_bpe(docs, tmp_path / "b", vocab_size=400))
    assert fingerprint(a) == fingerprint(b)
    c = load_tokenizer(train_bpe(docs, tmp_path / "c", vocab_size=300))
    assert fingerprint(a) != fingerprint(c)


def test_refuses_non_empty_output_and_empty_corpus(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UserError, match="already exists and is not empty"):
        train_bpe(["some text"], tmp_path / "full")
    with pytest.raises(UserError, match="no non-empty document"):
        train_bpe(["", ""], tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]  # nothing half-written left behind


def test_tokenizer_without_eos_is_refused(tmp_path, tokenizer_dir):
    bad = without_eos(tokenizer_dir, tmp_path / "noeos")
    with pytest.raises(UserError, match="has no end-of-text token"):
        load_tokenizer(bad)


def test_missing_tokenizer_dir(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a loadable tokenizer directory"):
        load_tokenizer(tmp_path / "empty")
