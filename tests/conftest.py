"""What the three tiers share: a small real corpus, a tokenizer trained on it, prepared MDS shards, one trained
run, preference data and the model DPO starts from, each built once per test run, and the tiers' markers.

tests/unit/ runs in this process and starts no other (seconds); tests/integration/ runs the real commands and
launchers on this machine (multi-process runs are marked slow); tests/cluster/ needs the local SLURM cluster or the
S3 server (.ci/run starts both). Each test gets its folder's marker: `pytest -m unit`, `-m "not cluster"`.

Everything is real (tokenizers, MDSWriter/StreamingDataset, DeepSpeed on CPU), only small."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.helpers import (
    BUCKET,
    PARTS_OPTS,
    PREF_BLOCK,
    TINY,
    TINY_PREF,
    corpus_files,
    run_cli,
    start_server,
)

# Each StreamingDataset leaves lock files in the temp dir; give the session its own (also for subprocesses).
_TMP = tempfile.mkdtemp(prefix="dist_clm_tests_")
os.environ["TMPDIR"] = _TMP
tempfile.tempdir = _TMP
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TESTS = Path(__file__).parent
TIERS = ("unit", "integration", "cluster")


def pytest_collection_modifyitems(items) -> None:
    """Each test carries its tier's marker (its folder under tests/)."""
    for item in items:
        tier = Path(item.path).relative_to(TESTS).parts[0]
        if tier in TIERS:
            item.add_marker(tier)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test` (`pytest -n 2 --dist loadscope`): a scope goes to one worker whole; here a scope is a test module
    (its module fixtures built once), except the cluster tier, one scope run in order on one worker: its tests share
    the SLURM cluster's nodes and the S3 server, which one of them stops and starts again. The scopes come from the
    path, not from xdist_group marks: pytest 9 no longer lets xdist 3.8 append a group to a test's id."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class TierScopes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "tests/cluster" if path.startswith("tests/cluster/") else path

    return TierScopes(config, log)


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
def exported(tmp_path_factory, trained_run) -> Path:
    """trained_run's last checkpoint as a Hugging Face directory (`dist-clm export`'s function). Read it; a test
    that changes an export copies it first."""
    from dist_clm.evaluation.export import export

    return export(trained_run, tmp_path_factory.mktemp("exported") / "hf")


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
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
        client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture(scope="session")
def parts_corpus(tmp_path_factory) -> Path:
    """A prepare in parts' inputs, every kind: a large JSON-lines file (cut between tasks, with duplicates and an
    empty line), a parquet file of many row groups, a compressed JSON-lines file (read whole), a plain text."""
    import gzip
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("parts_corpus")
    docs = [f.read_text() for f in corpus_files(40)]
    with open(d / "a.jsonl", "w") as f:
        for text in docs[:20] + docs[:4] + [""]:
            f.write(json.dumps({"text": text}) + "\n")
    pq.write_table(pa.table({"text": docs[20:34] + docs[2:3]}), d / "b.parquet", row_group_size=2)
    with gzip.open(d / "c.jsonl.gz", "wt") as f:
        for text in docs[34:39]:
            f.write(json.dumps({"text": text}) + "\n")
    (d / "d.txt").write_text(docs[39])
    return d


@pytest.fixture(scope="session")
def parts_reference(tmp_path_factory, parts_corpus, tokenizer_dir) -> Path:
    """parts_corpus prepared by one process: what any number of parts must give."""
    from dist_clm.data.prepare import prepare

    out = tmp_path_factory.mktemp("parts_ref") / "one"
    prepare(tokenizer_dir, out, [str(parts_corpus)], **PARTS_OPTS)
    return out


@pytest.fixture(scope="session")
def pref_data(tmp_path_factory, chat_tokenizer) -> Path:
    """Synthetic preference pairs prepared for DPO (blocks of PREF_BLOCK tokens)."""
    root = tmp_path_factory.mktemp("pref")
    records = root / "pairs.jsonl"
    assert (
        run_cli("data", "synthetic", "--task", "preference", "--out", str(records), "--records", "200").returncode == 0
    )
    out = root / "data"
    r = run_cli("prepare", str(records), "--tokenizer", str(chat_tokenizer), "--out", str(out), "--format",
                "preference", "--block-size", str(PREF_BLOCK), "--val-fraction", "0.1", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def start_model(tmp_path_factory, chat_tokenizer, pref_data) -> Path:
    """The model DPO starts from: a tiny GPT-2 trained briefly on the pairs' prompts with their chosen answers
    (SFT on the synthetic chat data, the same tokenizer), exported; pref_data's reference values are its."""
    root = tmp_path_factory.mktemp("start")
    chat = root / "chat.jsonl"
    assert run_cli("data", "synthetic", "--task", "chat", "--out", str(chat), "--records", "200").returncode == 0
    data = root / "sft"
    r = run_cli("prepare", str(chat), "--tokenizer", str(chat_tokenizer), "--out", str(data), "--format", "chat",
                "--block-size", str(PREF_BLOCK), "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("train", *TINY_PREF, f"data.path={data}", f"run.dir={root / 'run'}", "train.max_steps=10")
    assert r.returncode == 0, r.stderr[-3000:]
    assert run_cli("export", str(root / "run"), "--out", str(root / "model")).returncode == 0
    r = run_cli("prepare-reference", str(pref_data), "--model", str(root / "model"),
                env={"DIST_CLM_PROGRESS_SECONDS": "0"})  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    (root / "prepare-reference.out").write_text(r.stdout)  # (what it said: a progress line at every batch)
    return root / "model"
