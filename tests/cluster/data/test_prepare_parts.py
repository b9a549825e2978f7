"""A prepare in parts with a bucket in and out (training from the merged data), and as a SLURM job array over three
nodes with a task killed mid-part."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dist_clm.data.format import read_manifest
from dist_clm.data.prepare import prepare_part
from tests.helpers import (
    BIN,
    BUCKET,
    PARTS_CLI_OPTS,
    PARTS_OPTS,
    TINY,
    assert_clean_error,
    documents,
    needs_slurm,
    restarts,
    run_cli,
    wait_for,
)


def test_bucket_in_and_out_and_a_run_trains_from_the_merged_data(
    s3, tmp_path, parts_corpus, tokenizer_dir, parts_reference, data_dir
):
    prefix = f"parts-{os.getpid()}"
    for f in sorted(parts_corpus.iterdir()):
        s3.upload_file(str(f), BUCKET, f"{prefix}/corpus/{f.name}")
    url = f"s3://{BUCKET}/{prefix}/data"
    for i in range(3):  # (in-process: the path a task's command takes, without its start-up)
        prepare_part(tokenizer_dir, url, [f"s3://{BUCKET}/{prefix}/corpus/*"], 3, i, **PARTS_OPTS)
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
            assert documents(url, split) == documents(parts_reference, split)
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
def test_a_slurm_array_of_six_tasks_over_three_nodes_survives_a_task_killed_mid_part(
    tmp_path, parts_corpus, tokenizer_dir, parts_reference
):
    needs_slurm("multi")
    out = tmp_path / "out"

    def cmd(inputs: Path, out: Path, tasks: int) -> list[str]:
        return [str(BIN / "dist-clm"), "prepare", str(inputs), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                "--tasks", str(tasks), "--launch", "slurm", "--partition", "multi", "--cpus-per-task", "1", "--time",
                "15", "--wait", *PARTS_CLI_OPTS]  # fmt: skip

    launcher = subprocess.Popen(cmd(parts_corpus, out, 6), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
        assert documents(out, split) == documents(parts_reference, split)
    assert np.isclose(read_manifest(out)["val_fraction"], 0.2)
    # a task that fails with a sentence is not requeued: --wait says which part and why, the merge never runs
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * 50}) + "\n" for i in range(40)) + "{oops\n")
    r = subprocess.run(cmd(bad, tmp_path / "bad_out", 2), capture_output=True, text=True, timeout=600)
    assert_clean_error(r, "the merge cannot run: part 1 failed in its tokenize stage", "is not valid JSON",
                       "run the same command again")  # fmt: skip
    assert not (tmp_path / "bad_out" / "manifest.json").exists()
