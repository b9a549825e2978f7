"""Shared fixtures: a small real corpus, a tokenizer trained on it, prepared MDS shards, one trained run.

Everything is real (tokenizers, MDSWriter/StreamingDataset, DeepSpeed on CPU), only small.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.helpers import BUCKET, TINY, corpus_files, run_cli, start_server

# Each StreamingDataset leaves lock files in the temp dir; give the session its own (also for subprocesses).
_TMP = tempfile.mkdtemp(prefix="dist_clm_tests_")
os.environ["TMPDIR"] = _TMP
tempfile.tempdir = _TMP
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for i, f in enumerate(corpus_files()):
        (d / f"{i:03d}_{f.stem}.py").write_text(f.read_text())
    return d


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_dir) -> Path:
    from dist_clm.data import sources
    from dist_clm.data.tokenizer import train_bpe

    out = tmp_path_factory.mktemp("tok") / "bpe"
    files = sources.resolve_inputs([str(corpus_dir)])
    return train_bpe(sources.iter_documents(files), out, vocab_size=512)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus_dir, tokenizer_dir) -> Path:
    from dist_clm.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "prepared"
    # small chunks and shards, so streams cross chunk and shard borders many times
    prepare(
        tokenizer_dir, out, [str(corpus_dir)], val_fraction=0.15, chunk_tokens=1000, shard_bytes=1 << 14, progress=False
    )
    return out


@pytest.fixture(scope="session")
def data_dir_b(tmp_path_factory, tokenizer_dir) -> Path:
    """A second prepared corpus (other stdlib modules, the same tokenizer), for mixing."""
    from dist_clm.data.prepare import prepare

    root = tmp_path_factory.mktemp("corpus_b")
    for i, f in enumerate(corpus_files(30, skip=40)):
        (root / f"{i:03d}_{f.stem}.py").write_text(f.read_text())
    out = tmp_path_factory.mktemp("data_b") / "other"
    prepare(tokenizer_dir, out, [str(root)], val_fraction=0.15, chunk_tokens=700, shard_bytes=1 << 14, progress=False)
    return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir) -> Path:
    """A single-process ZeRO-2 run of 12 steps with checkpoints at 6 and 12 (used by eval/generate/export)."""
    run = tmp_path_factory.mktemp("runs") / "single"
    r = run_cli(
        "train",
        *TINY,
        f"data.path={data_dir}",
        f"run.dir={run}",
        "train.max_steps=12",
        "checkpoint.save_every=6",
        "train.eval_every=6",
        "train.log_every=3",
        "distributed.zero_stage=2",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.fixture(scope="session")
def chat_tokenizer(tmp_path_factory, corpus_dir) -> Path:
    """A BPE trained on the corpus with the ChatML template and its special tokens (fine-tuning tests)."""
    from dist_clm.data import sources
    from dist_clm.data.tokenizer import train_bpe

    out = tmp_path_factory.mktemp("chat_tok") / "tok"
    files = sources.resolve_inputs([str(corpus_dir)])
    return train_bpe(sources.iter_documents(files), out, vocab_size=512, chat_template="chatml")


@pytest.fixture(scope="module")
def s3():
    """The S3-compatible server's environment (S3_ENDPOINT_URL, keys), set in this process too, and a bucket."""
    import contextlib

    import boto3

    env = start_server()
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"])
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=BUCKET)
    return client
