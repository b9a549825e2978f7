"""A prepare in parts: one corpus tokenized by N tasks, then merged. The same documents and validation split
whatever N, byte-identical on a rerun, dedup across parts equal to one task's, a part killed with -9 redone and
never taken for complete, two merges at once, a bucket in and out with training from the merged data, and a
SLURM job array of 6 tasks over 3 nodes with a task killed mid-part."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from dist_clm.data import sources, work_split
from dist_clm.data.audit import verify
from dist_clm.data.merge import merge
from dist_clm.data.parts import describe_status, status
from dist_clm.data.prepare import prepare, prepare_part
from dist_clm.data.store import store
from dist_clm.errors import UserError
from tests.helpers import (
    BIN,
    PARTS_CLI_OPTS,
    PARTS_OPTS,
    assert_clean_error,
    corpus_files,
    documents,
    in_parts,
    run_cli,
    wait_for,
)


def test_any_number_of_parts_holds_the_same_documents_and_validation_split(
    tmp_path, parts_corpus, tokenizer_dir, parts_reference
):
    files = sources.list_inputs([str(parts_corpus)])
    # no task waits on one huge file: the JSON-lines file and the parquet file are cut between the tasks
    cut = [[s for s in work_split.shares(files, 6, i) if s.kind in ("lines", "row_groups")] for i in range(6)]
    assert sum(1 for c in cut if c) >= 4 and all(len(c) <= 2 for c in cut)
    one = in_parts(tokenizer_dir, tmp_path / "one", [str(parts_corpus)], 1)
    six = in_parts(tokenizer_dir, tmp_path / "six", [str(parts_corpus)], 6)
    for split in ("train", "val"):  # the same documents, each in the same split
        want = documents(parts_reference, split)
        assert documents(tmp_path / "one", split) == want and documents(tmp_path / "six", split) == want
        assert one["splits"][split]["documents"] == six["splits"][split]["documents"] == len(want)
    assert six["parts"]["tasks"] == 6 and six["empty_documents_skipped"] == 1
    # for a given N, the same bytes on a rerun
    in_parts(tokenizer_dir, tmp_path / "again", [str(parts_corpus)], 6)
    for f in sorted((tmp_path / "six").glob("*/**/*")):
        if f.is_file() and (f.suffix == ".mds" or f.name == "index.json"):
            assert f.read_bytes() == (tmp_path / "again" / f.relative_to(tmp_path / "six")).read_bytes(), f
    assert verify(tmp_path / "six")[0].startswith("train: ok")  # every shard's name, size and hash, every token
    # a rerun into a merged dataset, or with other settings into the same parts, is refused
    with pytest.raises(UserError, match="other prepare: its settings .chunk_tokens: 700 there, 800 here"):
        prepare_part(
            tokenizer_dir, tmp_path / "again", [str(parts_corpus)], 6, 0, **(PARTS_OPTS | {"chunk_tokens": 800})
        )
    with pytest.raises(UserError, match="is already merged"):
        merge(str(tmp_path / "again"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    with pytest.raises(UserError, match="holds other files; give a prepare in parts a new or empty --out"):
        prepare_part(tokenizer_dir, tmp_path / "mine", [str(parts_corpus)], 2, 0, **PARTS_OPTS)


def test_dedup_across_parts_equals_one_task_dedup(tmp_path, parts_corpus, tokenizer_dir):
    alone = prepare(tokenizer_dir, tmp_path / "alone", [str(parts_corpus)], **(PARTS_OPTS | {"dedup": True}))
    merged = in_parts(tokenizer_dir, tmp_path / "four", [str(parts_corpus)], 4, dedup=True)
    assert alone["duplicates_removed"] == merged["duplicates_removed"] == 5
    for split in ("train", "val"):
        assert documents(tmp_path / "four", split) == documents(tmp_path / "alone", split)
    # the tokenize stage before the exchange is done: one sentence naming the stage to run
    prepare_part(tokenizer_dir, tmp_path / "early", [str(parts_corpus)], 2, 0, "hash", **(PARTS_OPTS | {"dedup": True}))
    with pytest.raises(UserError, match="part 1 of 2 has not finished its hash stage"):
        prepare_part(
            tokenizer_dir, tmp_path / "early", [str(parts_corpus)], 2, 0, "dedup", **(PARTS_OPTS | {"dedup": True})
        )


def test_fine_tuning_records_split_into_parts_the_same_way(tmp_path, chat_tokenizer):
    r = run_cli("data", "synthetic", "--task", "chat", "--out", str(tmp_path / "chat.jsonl"), "--records", "300")
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "chat.jsonl", "a") as f:  # 20 exact duplicates
        f.writelines((tmp_path / "chat.jsonl").read_text().splitlines(keepends=True)[:20])
    opts = {"fmt": "chat", "block_size": 128, "dedup": True}
    alone = prepare(chat_tokenizer, tmp_path / "alone", [str(tmp_path / "chat.jsonl")], **(PARTS_OPTS | opts))
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
        prepare(tokenizer_dir, tmp_path / f"{name}_one", inputs, **(PARTS_OPTS | options))
        in_parts(tokenizer_dir, tmp_path / f"{name}_parts", inputs, 3, **options)
        for split in ("train", "val"):
            assert documents(tmp_path / f"{name}_parts", split) == documents(tmp_path / f"{name}_one", split)


def test_a_part_killed_mid_way_is_redone_and_never_taken_for_complete(
    tmp_path, parts_corpus, tokenizer_dir, parts_reference, capsys
):
    out = tmp_path / "out"
    args = [
        "prepare",
        str(parts_corpus),
        "--tokenizer",
        str(tokenizer_dir),
        "--out",
        str(out),
        "--tasks",
        "3",
        *PARTS_CLI_OPTS,
    ]
    for i in (0, 2):
        prepare_part(tokenizer_dir, out, [str(parts_corpus)], 3, i, **PARTS_OPTS)
    victim = subprocess.Popen([str(BIN / "dist-clm"), *args, "--task-index", "1"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    beat = out / "parts" / "progress-00001.json"
    wait_for(beat.is_file, "part 1 under way", 120)  # (its tokenizer loads next: seconds of imports)
    with pytest.raises(UserError, match="part 1 of 3 .* is being written by another task .pid"):
        prepare_part(tokenizer_dir, out, [str(parts_corpus)], 3, 1, **PARTS_OPTS)  # one writer per part
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
    assert prepare_part(tokenizer_dir, out, [str(parts_corpus)], 3, 0, **PARTS_OPTS)["task"] == 0  # complete: skipped
    assert "stage is complete" in capsys.readouterr().out
    merges = [subprocess.Popen([str(BIN / "dist-clm"), "prepare", "--merge", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    results = sorted((p.wait(), p.stderr.read()) for p in merges)
    assert results[0][0] == 0 and results[1][0] == 2, results
    assert "another merge" in results[1][1] or "is already merged" in results[1][1]
    for split in ("train", "val"):
        assert documents(out, split) == documents(parts_reference, split)
