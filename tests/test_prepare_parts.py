"""A prepare in parts: one corpus tokenized by N tasks, then merged. The same documents and validation split
whatever N, byte-identical on a rerun, dedup across parts equal to one task's, a part killed with -9 redone and
never taken for complete, two merges at once, a bucket in and out with training from the merged data, and a
SLURM job array of 6 tasks over 3 nodes with a task killed mid-part."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from dist_clm.data import sources, work_split
from dist_clm.data.audit import verify
from dist_clm.data.format import read_manifest
from dist_clm.data.merge import merge
from dist_clm.data.parts import describe_status, status
from dist_clm.data.prepare import prepare, prepare_part
from dist_clm.data.store import store
from dist_clm.data.stream import TokenStream
from dist_clm.errors import UserError
from tests.helpers import BIN, BUCKET, TINY, assert_clean_error, corpus_files, needs_slurm, restarts, run_cli, wait_for

OPTS = dict(chunk_tokens=700, shard_bytes=1 << 13, val_fraction=0.2, num_proc=1, progress=False)
CLI_OPTS = ["--chunk-tokens", "700", "--shard-mb", str(1 / 128), "--val-fraction", "0.2", "--num-proc", "1", "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Every kind of input: a large JSON-lines file (cut between tasks, with duplicates and an empty line), a
    parquet file of many row groups, a compressed JSON-lines file (read whole), a plain-text document."""
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


def documents(data: Path | str, split: str) -> list[tuple[int, ...]]:
    """A split's documents (token ids), sorted: the multiset, whatever the order and the chunking."""
    m = read_manifest(data)
    stream = TokenStream(data, split, m)
    ids, starts = stream.read(0, stream.tokens, with_starts=True)
    cuts = [*starts.tolist(), len(ids)]
    return sorted(tuple(ids[a:b].tolist()) for a, b in zip(cuts, cuts[1:], strict=False))


def in_parts(tokenizer, out, inputs, tasks, **options) -> dict:
    for stage in ("hash", "dedup", "tokenize") if options.get("dedup") else ("tokenize",):
        for i in range(tasks):
            prepare_part(tokenizer, out, inputs, tasks, i, stage, **(OPTS | options))
    return merge(str(out))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("parts_ref") / "one"
    prepare(tokenizer_dir, out, [str(corpus)], **OPTS)
    return out


def test_any_number_of_parts_holds_the_same_documents_and_validation_split(tmp_path, corpus, tokenizer_dir, reference):
    files = sources.list_inputs([str(corpus)])
    # no task waits on one huge file: the JSON-lines file and the parquet file are cut between the tasks
    cut = [[s for s in work_split.shares(files, 6, i) if s.kind in ("lines", "row_groups")] for i in range(6)]
    assert sum(1 for c in cut if c) >= 4 and all(len(c) <= 2 for c in cut)
    one = in_parts(tokenizer_dir, tmp_path / "one", [str(corpus)], 1)
    six = in_parts(tokenizer_dir, tmp_path / "six", [str(corpus)], 6)
    for split in ("train", "val"):  # the same documents, each in the same split
        want = documents(reference, split)
        assert documents(tmp_path / "one", split) == want and documents(tmp_path / "six", split) == want
        assert one["splits"][split]["documents"] == six["splits"][split]["documents"] == len(want)
    assert six["parts"]["tasks"] == 6 and six["empty_documents_skipped"] == 1
    # for a given N, the same bytes on a rerun
    in_parts(tokenizer_dir, tmp_path / "again", [str(corpus)], 6)
    for f in sorted((tmp_path / "six").glob("*/**/*")):
        if f.is_file() and (f.suffix == ".mds" or f.name == "index.json"):
            assert f.read_bytes() == (tmp_path / "again" / f.relative_to(tmp_path / "six")).read_bytes(), f
    assert verify(tmp_path / "six")[0].startswith("train: ok")  # every shard's name, size and hash, every token
    # a rerun into a merged dataset, or with other settings into the same parts, is refused
    with pytest.raises(UserError, match="other prepare: its settings .chunk_tokens: 700 there, 800 here"):
        prepare_part(tokenizer_dir, tmp_path / "again", [str(corpus)], 6, 0, **(OPTS | {"chunk_tokens": 800}))
    with pytest.raises(UserError, match="is already merged"):
        merge(str(tmp_path / "again"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    with pytest.raises(UserError, match="holds other files; give a prepare in parts a new or empty --out"):
        prepare_part(tokenizer_dir, tmp_path / "mine", [str(corpus)], 2, 0, **OPTS)


def test_dedup_across_parts_equals_one_task_dedup(tmp_path, corpus, tokenizer_dir):
    alone = prepare(tokenizer_dir, tmp_path / "alone", [str(corpus)], **(OPTS | {"dedup": True}))
    merged = in_parts(tokenizer_dir, tmp_path / "four", [str(corpus)], 4, dedup=True)
    assert alone["duplicates_removed"] == merged["duplicates_removed"] == 5
    for split in ("train", "val"):
        assert documents(tmp_path / "four", split) == documents(tmp_path / "alone", split)
    # the tokenize stage before the exchange is done: one sentence naming the stage to run
    prepare_part(tokenizer_dir, tmp_path / "early", [str(corpus)], 2, 0, "hash", **(OPTS | {"dedup": True}))
    with pytest.raises(UserError, match="part 1 of 2 has not finished its hash stage"):
        prepare_part(tokenizer_dir, tmp_path / "early", [str(corpus)], 2, 0, "dedup", **(OPTS | {"dedup": True}))


def test_fine_tuning_records_split_into_parts_the_same_way(tmp_path, chat_tokenizer):
    r = run_cli("data", "synthetic", "--task", "chat", "--out", str(tmp_path / "chat.jsonl"), "--records", "300")
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "chat.jsonl", "a") as f:  # 20 exact duplicates
        f.writelines((tmp_path / "chat.jsonl").read_text().splitlines(keepends=True)[:20])
    opts = {"fmt": "chat", "block_size": 128, "dedup": True}
    alone = prepare(chat_tokenizer, tmp_path / "alone", [str(tmp_path / "chat.jsonl")], **(OPTS | opts))
    merged = in_parts(chat_tokenizer, tmp_path / "parts", [str(tmp_path / "chat.jsonl")], 3, **opts)
    assert alone["duplicates_removed"] == merged["duplicates_removed"] >= 20  # (the synthetic set has its own)
    for split in ("train", "val"):
        assert merged["splits"][split]["documents"] == alone["splits"][split]["documents"]
    assert merged["fine_tuning"]["objective"] == "sft" and merged["splits"]["train"]["tokens"] % 128 == 0
    assert all(" ok: " in line for line in verify(tmp_path / "parts"))


def test_datasets_split_by_their_own_shards_and_rows(tmp_path, tokenizer_dir):
    import datasets

    docs = [f.read_text() for f in corpus_files(24)]
    hub = tmp_path / "hub_like"  # a dataset directory load_dataset streams: one shard per file
    hub.mkdir()
    for k in range(4):
        with open(hub / f"shard{k}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in docs[k * 6 : k * 6 + 6])
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "disk"))
    for name, inputs, options in (("hub", None, {"dataset": str(hub)}), ("disk", [str(tmp_path / "disk")], {})):
        prepare(tokenizer_dir, tmp_path / f"{name}_one", inputs, **(OPTS | options))
        in_parts(tokenizer_dir, tmp_path / f"{name}_parts", inputs, 3, **options)
        for split in ("train", "val"):
            assert documents(tmp_path / f"{name}_parts", split) == documents(tmp_path / f"{name}_one", split)


def test_a_part_killed_mid_way_is_redone_and_never_taken_for_complete(tmp_path, corpus, tokenizer_dir, reference,
                                                                      capsys):  # fmt: skip
    out = tmp_path / "out"
    args = ["prepare", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--tasks", "3", *CLI_OPTS]
    for i in (0, 2):
        prepare_part(tokenizer_dir, out, [str(corpus)], 3, i, **OPTS)
    victim = subprocess.Popen([str(BIN / "dist-clm"), *args, "--task-index", "1"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    beat = out / "parts" / "progress-00001.json"
    wait_for(beat.is_file, "part 1 under way", 120)  # (its tokenizer loads next: seconds of imports)
    with pytest.raises(UserError, match="part 1 of 3 .* is being written by another task .pid"):
        prepare_part(tokenizer_dir, out, [str(corpus)], 3, 1, **OPTS)  # one writer per part
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (out / "parts" / "part-00001.json").exists()  # killed mid-part
    # what it left is never taken for complete: the merge refuses, the status names it
    r = run_cli("prepare", "--merge", str(out))
    assert_clean_error(r, "1 of the 3 parts", "not complete (part 1)", "run their tasks (again")
    assert not (out / "manifest.json").exists()
    _, tasks, _ = status(store(out), now=time.time() + 600)
    assert [t.state for t in tasks] == ["done", "stopped", "done"] and "no heartbeat" in tasks[1].detail
    shown = describe_status(store(out))
    assert "parts: 2 done, 1 running" in shown and "tokens so far" in shown
    # the rerun redoes part 1 alone; then two merges at once: one wins, the other says so
    r = run_cli(*args, "--task-index", "1")
    assert r.returncode == 0 and "part 1 of 3" in r.stdout, r.stderr
    assert prepare_part(tokenizer_dir, out, [str(corpus)], 3, 0, **OPTS)["task"] == 0  # complete: skipped
    assert "stage is complete" in capsys.readouterr().out
    merges = [subprocess.Popen([str(BIN / "dist-clm"), "prepare", "--merge", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    results = sorted((p.wait(), p.stderr.read()) for p in merges)
    assert results[0][0] == 0 and results[1][0] == 2, results
    assert "another merge" in results[1][1] or "is already merged" in results[1][1]
    for split in ("train", "val"):
        assert documents(out, split) == documents(reference, split)


def test_bucket_in_and_out_and_a_run_trains_from_the_merged_data(s3, tmp_path, corpus, tokenizer_dir, reference,
                                                                   data_dir):  # fmt: skip
    prefix = f"parts-{os.getpid()}"
    for f in sorted(corpus.iterdir()):
        s3.upload_file(str(f), BUCKET, f"{prefix}/corpus/{f.name}")
    url = f"s3://{BUCKET}/{prefix}/data"
    for i in range(3):  # (in-process: the path a task's command takes, without its start-up)
        prepare_part(tokenizer_dir, url, [f"s3://{BUCKET}/{prefix}/corpus/*"], 3, i, **OPTS)
    r = run_cli("data", "status", url)
    assert r.returncode == 0 and "parts: 3 done" in r.stdout and f"dist-clm prepare --merge {url}" in r.stdout
    merges = [subprocess.Popen([str(BIN / "dist-clm"), "prepare", "--merge", url], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    results = sorted((p.wait(), p.stdout.read(), p.stderr.read()) for p in merges)
    assert results[0][0] == 0 and "in 3 parts" in results[0][1], results  # one wins, the other says so
    assert results[1][0] == 2 and ("another merge" in results[1][2] or "is already merged" in results[1][2]), results
    cache = tmp_path / "cache"
    os.environ["DIST_CLM_CACHE"] = str(cache)
    try:
        for split in ("train", "val"):
            assert documents(url, split) == documents(reference, split)
    finally:
        del os.environ["DIST_CLM_CACHE"]
    # training reads it as any prepared data: mixed with a local dataset, through the bounded cache and the
    # prefetcher, its validation split evaluated
    run = tmp_path / "run"
    mix = f"data.mix=[{{path: '{url}', weight: 0.5}}, {{path: '{data_dir}', weight: 0.5}}]"
    r = run_cli("train", *TINY, mix, "data.path=", f"run.dir={run}", "train.max_steps=4", "train.eval_every=4",
                f"data.cache_dir={tmp_path / 'cache2'}", "data.cache_limit=60KB")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "metrics.jsonl").is_file() and "val/loss" in (run / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_a_slurm_array_of_six_tasks_over_three_nodes_survives_a_task_killed_mid_part(tmp_path, corpus, tokenizer_dir,
                                                                                       reference):  # fmt: skip
    needs_slurm("multi")
    out = tmp_path / "out"

    def cmd(inputs: Path, out: Path, tasks: int) -> list[str]:
        return [str(BIN / "dist-clm"), "prepare", str(inputs), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                "--tasks", str(tasks), "--launch", "slurm", "--partition", "multi", "--cpus-per-task", "1", "--time",
                "15", "--wait", *CLI_OPTS]  # fmt: skip

    launcher = subprocess.Popen(cmd(corpus, out, 6), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    beat = out / "parts" / "progress-00002.json"
    wait_for(lambda: beat.is_file() and json.loads(beat.read_text())["state"] == "running", "task 2 under way", 240)
    os.kill(json.loads(beat.read_text())["pid"], signal.SIGKILL)
    stdout, stderr = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, stderr[-3000:]
    assert "in 6 parts" in stdout
    markers = [json.loads((out / "parts" / f"part-{i:05d}.json").read_text()) for i in range(6)]
    assert {m["slurm_node"] for m in markers} == {"dn1", "dn2", "dn3"}
    array = stdout.split("submitted job arrays ")[1].split()[0].rstrip(",")
    assert restarts(f"{array}_2") >= 1  # the killed task was requeued alone and redid its part
    assert all(restarts(f"{array}_{i}") == 0 for i in (0, 1, 3, 4, 5))
    for split in ("train", "val"):
        assert documents(out, split) == documents(reference, split)
    assert np.isclose(read_manifest(out)["val_fraction"], 0.2)
    # a task that fails with a sentence is not requeued: --wait says which part and why, the merge never runs
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * 50}) + "\n" for i in range(40)) + "{oops\n")
    r = subprocess.run(cmd(bad, tmp_path / "bad_out", 2), capture_output=True, text=True, timeout=600)
    assert_clean_error(r, "the merge cannot run: part 1 failed in its tokenize stage", "is not valid JSON",
                       "run the same command again")  # fmt: skip
    assert not (tmp_path / "bad_out" / "manifest.json").exists()
