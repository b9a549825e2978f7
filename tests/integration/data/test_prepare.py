import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from dist_clm.data import sources
from dist_clm.data.format import read_manifest
from dist_clm.data.prepare import is_val, prepare
from dist_clm.data.tokenizer import fingerprint, load_tokenizer
from dist_clm.errors import UserError
from tests.helpers import BIN, read_split, without_eos


def expected_streams(corpus_docs, tok, val_fraction):
    """Each split's token stream computed independently: documents in order, tokenized, EOS appended."""
    streams = {"train": [], "val": []}
    for text in corpus_docs:
        if text:
            ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
            streams["val" if is_val(text, val_fraction) else "train"].append(ids)
    return streams


def test_shards_hold_the_corpus_token_stream(data_dir, corpus_dir, tokenizer_dir):
    m = read_manifest(data_dir)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    files = sorted(corpus_dir.iterdir())
    streams = expected_streams([f.read_text() for f in files], tok, 0.15)
    assert m["tokenizer"]["fingerprint"] == fingerprint(tok)
    assert m["tokenizer"]["vocab_size"] == 512 and m["tokenizer"]["eos_id"] == tok.eos_token_id
    assert m["token_dtype"] == "uint16"
    assert (data_dir / "tokenizer" / "tokenizer.json").is_file()
    for split in ("train", "val"):
        chunks = read_split(data_dir / split)
        info = m["splits"][split]
        assert len(chunks) == info["chunks"] > 0
        assert all(len(c["tokens"]) == 1000 for c in chunks[:-1]) and 0 < len(chunks[-1]["tokens"]) <= 1000
        got = np.concatenate([c["tokens"] for c in chunks])
        want = np.concatenate([np.array(d) for d in streams[split]])
        assert len(got) == info["tokens"] == len(want)
        assert info["documents"] == len(streams[split])
        np.testing.assert_array_equal(got, want)
        # document starts recorded inside each chunk (then the chunk's length)
        starts = np.cumsum([0] + [len(d) for d in streams[split][:-1]])
        recorded = np.concatenate([c["doc_bounds"][:-1] + i * 1000 for i, c in enumerate(chunks)])
        np.testing.assert_array_equal(recorded, starts)
        assert all(c["doc_bounds"][-1] == len(c["tokens"]) for c in chunks)
    assert len(list((data_dir / "train").glob("shard.*.mds"))) > 1  # shard size limit honoured


def test_inputs_files_dirs_globs_and_jsonl(tmp_path, corpus_dir):
    a, b = sorted(corpus_dir.iterdir())[:2]
    (tmp_path / "docs.jsonl").write_text(
        json.dumps({"text": "first document", "id": 1})
        + "\n\n"
        + json.dumps({"text": "", "id": 2})
        + "\n"
        + json.dumps({"text": "third", "id": 3})
        + "\n"
    )
    files = sources.resolve_inputs([str(a), str(corpus_dir), str(corpus_dir / "*.py"), str(tmp_path / "*.jsonl")])
    assert files[0] == a and files.count(b) == 1  # order kept, duplicates dropped
    docs = list(sources.iter_documents(files))
    assert docs[-3:] == ["first document", "", "third"]
    assert len(docs) == len(list(corpus_dir.iterdir())) + 3


def test_prepare_says_what_it_does_before_the_slow_part_and_counts_its_time_from_its_start(
    tmp_path, corpus_dir, tokenizer_dir, monkeypatch, capsys
):
    """The first line names the inputs, the output and the workers, before the tokenizer loads (transformers'
    import: seconds on a first start, while the workers already tokenize); the progress's time and rate count
    from the start, so it never says '0 s so far' after seconds of work."""
    from dist_clm.data import prepare as module

    loading = module.load_tokenizer

    def slow_load(path):
        print("the tokenizer loads")
        time.sleep(1.5)
        return loading(path)

    monkeypatch.setattr(module, "load_tokenizer", slow_load)
    monkeypatch.setenv("DIST_CLM_PROGRESS_SECONDS", "3600")  # (the closing line only)
    files = [str(f) for f in sorted(corpus_dir.iterdir())[:3]]
    prepare(tokenizer_dir, tmp_path / "out", files, val_fraction=0.5, num_proc=1)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"prepare: 3 files into {tmp_path / 'out'}, tokenizing with 1 worker", "the tokenizer loads"]
    assert lines[-1].startswith("prepare: 3 docs, ") and lines[-1].endswith(" s so far"), lines
    assert int(lines[-1].rsplit(", ", 1)[1].split()[0]) >= 1, lines


def test_default_corpus_is_the_standard_library():
    files = sources.default_corpus_files()
    assert 200 <= len(files) <= 300
    assert all(f.suffix == ".py" and f.is_file() for f in files)
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)


def test_prepare_with_a_pretrained_local_tokenizer(tmp_path, corpus_dir):
    """Any local transformers tokenizer directory works, e.g. a WordLevel one saved by save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[EOS]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(["the", "cat", "sat", "on", "mat"])}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="[EOS]", unk_token="[UNK]").save_pretrained(tmp_path / "wl")
    (tmp_path / "c.txt").write_text("the cat sat on the mat")
    (tmp_path / "d.txt").write_text("the mat sat")
    m = prepare(tmp_path / "wl", tmp_path / "out", [str(tmp_path / "*.txt")], val_fraction=0.5, progress=False)
    assert m["tokenizer"]["eos_id"] == 0 and m["tokenizer"]["vocab_size"] == 7
    all_tokens = np.concatenate([c["tokens"] for s in ("train", "val") for c in read_split(tmp_path / "out" / s)])
    assert sorted(all_tokens.tolist()) == sorted([2, 3, 4, 5, 2, 6, 0, 2, 6, 4, 0])


def assert_nothing_left(parent: Path, name: str):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.partial")]


@pytest.mark.parametrize("case", ["missing", "empty", "noglob", "all_val"])
def test_bad_corpus_is_refused_and_nothing_is_left(tmp_path, tokenizer_dir, case):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "one.txt").write_text("a single short document")
    inputs = {
        "missing": [str(tmp_path / "nope")],
        "empty": [str(tmp_path / "empty.txt")],
        "noglob": [str(tmp_path / "*.parquet")],
        "all_val": [str(tmp_path / "one.txt")],
    }[case]
    message = {
        "missing": "does not exist",
        "empty": "no non-empty document",
        "noglob": "matches no files",
        "all_val": "split got no document",
    }[case]
    with pytest.raises(UserError, match=message):
        prepare(tokenizer_dir, tmp_path / "out", inputs, progress=False)
    assert_nothing_left(tmp_path, "out")


def test_refuses_existing_output_and_reads_only_complete_dirs(tmp_path, data_dir, tokenizer_dir, corpus_dir):
    with pytest.raises(UserError, match="already exists and is not empty"):
        prepare(tokenizer_dir, data_dir, [str(corpus_dir)], progress=False)
    half = tmp_path / "half"
    (half / "train").mkdir(parents=True)
    with pytest.raises(UserError, match="not a complete prepared dataset"):
        read_manifest(half)
    with pytest.raises(UserError, match="does not exist"):
        read_manifest(tmp_path / "nope")


def test_tokenizer_without_eos_is_refused_by_prepare(tmp_path, tokenizer_dir, corpus_dir):

    bad = without_eos(tokenizer_dir, tmp_path / "noeos")
    with pytest.raises(UserError, match="has no end-of-text token"):
        prepare(bad, tmp_path / "out", [str(corpus_dir)], progress=False)
    assert_nothing_left(tmp_path, "out")
    assert load_tokenizer(tokenizer_dir).eos_token_id is not None


def shard_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for s in ("train", "val") for p in sorted((d / s).iterdir())}


def test_output_is_byte_identical_for_any_num_proc(tmp_path, corpus_dir, tokenizer_dir, data_dir):
    outs = []
    for n in (1, 2, 3):
        out = tmp_path / f"p{n}"
        prepare(
            tokenizer_dir,
            out,
            [str(corpus_dir)],
            val_fraction=0.15,
            chunk_tokens=1000,
            shard_bytes=1 << 14,
            num_proc=n,
            progress=False,
        )
        outs.append(shard_bytes(out))
    assert outs[0] == outs[1] == outs[2] == shard_bytes(data_dir)
    assert len(outs[0]) > 4


def test_manifest_histogram_dedup_and_compression(tmp_path, corpus_dir, tokenizer_dir):
    corpus = tmp_path / "c"
    corpus.mkdir()
    files = sorted(corpus_dir.iterdir())[:12]
    for f in files:
        (corpus / f.name).write_text(f.read_text())
        (corpus / f"copy_{f.name}").write_text(f.read_text())  # exact duplicates
    m = prepare(
        tokenizer_dir, tmp_path / "out", [str(corpus)], val_fraction=0.2, dedup=True, compression="zstd", progress=False
    )
    assert m["duplicates_removed"] == 12
    assert sum(s["documents"] for s in m["splits"].values()) == 12
    for s in m["splits"].values():
        assert sum(c for _, _, c in s["length_histogram"]) == s["documents"]
        assert all(lo <= hi for lo, hi, _ in s["length_histogram"])
    assert list((tmp_path / "out" / "train").glob("*.mds.zstd"))
    chunks = read_split(tmp_path / "out" / "train")  # compressed shards read back
    assert sum(len(c["tokens"]) for c in chunks) == m["splits"]["train"]["tokens"]
    assert m["shards"]["compression"] == "zstd" and m["sources"]["files"] == 24
    no_dedup = prepare(tokenizer_dir, tmp_path / "out2", [str(corpus)], val_fraction=0.2, progress=False)
    assert no_dedup["duplicates_removed"] is None
    assert sum(s["documents"] for s in no_dedup["splits"].values()) == 24


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[EOS]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="[EOS]", unk_token="[UNK]").save_pretrained(tmp_path / "tk")
    for i in range(20):
        (tmp_path / f"{i}.txt").write_text(f"w{i} w69999 w{i * 3000}")
    m = prepare(tmp_path / "tk", tmp_path / "out", [str(tmp_path / "*.txt")], val_fraction=0.3, progress=False)
    assert m["token_dtype"] == "uint32"
    ids = np.concatenate([c["tokens"] for s in ("train", "val") for c in read_split(tmp_path / "out" / s)])
    assert ids.dtype == np.uint32 and ids.max() == 70_001


def big_corpus(tmp_path: Path) -> Path:
    d = tmp_path / "big"
    d.mkdir()
    for k in range(2):
        for i, f in enumerate(sources.default_corpus_files()):
            (d / f"{k}_{i:03d}.py").write_text(f.read_text())
    return d


def start_prepare(corpus: Path, tokenizer_dir: Path, out: Path) -> subprocess.Popen:

    return subprocess.Popen(
        [
            str(BIN / "dist-clm"),
            "prepare",
            str(corpus),
            "--tokenizer",
            str(tokenizer_dir),
            "--out",
            str(out),
            "--num-proc",
            "1",
            "--shard-mb",
            "1",
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C must reach it as KeyboardInterrupt even when this test runs from a backgrounded shell,
        # which starts its children with SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for_first_shard(proc: subprocess.Popen, out: Path) -> None:
    first = out.with_name(f".{out.name}.partial") / "train" / "shard.00000.mds"
    deadline = time.time() + 120
    while not first.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_in_the_middle_then_rerun_starts_over_cleanly(tmp_path, tokenizer_dir):
    corpus = big_corpus(tmp_path)
    out = tmp_path / "out"
    proc = start_prepare(corpus, tokenizer_dir, out)
    wait_for_first_shard(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # the loader can't mistake the partial output for data
    with pytest.raises(UserError, match="does not exist"):
        read_manifest(out)
    rerun = start_prepare(corpus, tokenizer_dir, out)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "left by an interrupted prepare; removing it and starting over" in err
    assert not out.with_name(".out.partial").exists()
    clean = tmp_path / "clean"
    prepare(tokenizer_dir, clean, [str(corpus)], num_proc=2, shard_bytes=1 << 20, progress=False)
    assert shard_bytes(out) == shard_bytes(clean)


@pytest.mark.slow
def test_ctrl_c_leaves_nothing(tmp_path, tokenizer_dir):
    corpus = big_corpus(tmp_path)
    out = tmp_path / "out"
    proc = start_prepare(corpus, tokenizer_dir, out)
    wait_for_first_shard(proc, out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; nothing partial was kept" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]


def test_a_live_prepare_into_the_same_directory_is_refused(tmp_path, tokenizer_dir, corpus_dir):
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    (partial / "OWNER").write_text(f"{os.getppid()} host\n")  # a live process that is not us
    with pytest.raises(UserError, match=f"another prepare \\(pid {os.getppid()}\\) is writing"):
        prepare(tokenizer_dir, tmp_path / "out", [str(corpus_dir)], progress=False)
    assert (partial / "OWNER").exists()  # not touched


GOLDEN = {"text": "c5437bea53d2de4a", "chat": "677095a9e365c15c", "prompt-completion": "d165c901407e185f",
          "preference": "4c17e227d7bfd0fb"}  # fmt: skip


@pytest.mark.parametrize("fmt", list(GOLDEN))
def test_every_format_prepares_the_same_bytes_as_before(tmp_path_factory, fmt):
    """The shards and indexes of a fixed corpus (synthetic records, a tokenizer trained on them) in each format are
    byte for byte what this version of prepare first wrote: a change to how records become shards shows here."""
    import hashlib
    import json

    from dist_clm.data import synthetic
    from dist_clm.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("golden")
    chat = synthetic.arithmetic("chat", 300, seed=3)
    texts = [" ".join(m["content"] for m in r["messages"]) for r in chat]
    tok = train_bpe(iter(texts), root / "tok", vocab_size=400, chat_template="chatml")
    records = {"text": [{"text": t} for t in texts], "chat": chat,
               "prompt-completion": synthetic.arithmetic("prompt-completion", 300, seed=4),
               "preference": synthetic.arithmetic("preference", 200, seed=5)}[fmt]  # fmt: skip
    inputs = root / f"{fmt}.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = root / "out"
    prepare(tok, out, [str(inputs)], val_fraction=0.1, chunk_tokens=512, shard_bytes=1 << 12, progress=False,
            dedup=True, **({} if fmt == "text" else {"fmt": fmt, "block_size": 64}))  # fmt: skip
    digest = hashlib.sha256()
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.parent.name in ("train", "val"):
            digest.update(p.relative_to(out).as_posix().encode())
            digest.update(p.read_bytes())
    assert digest.hexdigest()[:16] == GOLDEN[fmt]
