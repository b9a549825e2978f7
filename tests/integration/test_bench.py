"""The training-throughput benchmark measures dist_clm's own training loop, not a copy of it: its dist_clm rows
give the very losses `dist-clm train` gives with the same settings, and its plain-PyTorch anchor trains the
same thing (same weights, blocks and schedule). The GPU suite runs its checks and rows in one process, writes
each result as it comes, keeps within its budget, and refuses to run on the CPU unless told."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, bench_module, metrics, run_cli, train_losses

pytestmark = pytest.mark.slow


WARMUP, STEPS = 2, 3


def bench_variant(tmp_path, data_dir, variant: str) -> dict:
    result = tmp_path / f"{variant}.json"
    cmd = [sys.executable, str(REPO / "bench" / "gpu_throughput.py"), "--one", variant, "--models", "tiny",
           "--data", str(data_dir), "--warmup", str(WARMUP), "--steps", str(STEPS), "--result", str(result),
           "--work", str(tmp_path / "work"), "--cpu"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(result.read_text())


def test_the_benchmark_times_the_trainers_own_steps(tmp_path, data_dir):
    timed = bench_variant(tmp_path, data_dir, "dist_clm")
    assert len(timed["losses"]) == STEPS and timed["tok_s"] > 0 and timed["seconds"] > 0

    run = tmp_path / "train"
    overrides = bench_module().variant_overrides("tiny", "dist_clm", data_dir, run, WARMUP, STEPS)
    r = run_cli("train", *overrides, "train.log_every=1")
    assert r.returncode == 0, r.stderr[-3000:]
    trained = train_losses(metrics(run))
    assert timed["losses"] == [trained[s] for s in range(WARMUP + 1, WARMUP + STEPS + 1)]  # bit for bit

    plain = bench_variant(tmp_path, data_dir, "plain")  # the anchor: the same model, blocks and schedule
    assert plain["losses"] == pytest.approx(timed["losses"], rel=1e-4)


# the suite's checks the CPU test runs: each kind of run once (train and resume on ZeRO-2 and ZeRO-3, export,
# eval, generate, the loss head, what watching a run records) and one table row; the compiled ones (tens of
# seconds of torch.compile each on a CPU, for what the other tests check eager) are the GPU's and
# `bench/gpu_suite.py --cpu`'s
SUITE_ITEMS = ("zero2-resume", "eval-generate", "loss-head", "watching", "zero3-resume", "export", "row/tiny/plain")


def suite_cmd(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "bench" / "gpu_suite.py"), *args]


def test_the_gpu_suite_runs_its_checks_on_the_cpu_and_writes_each_result_at_once(tmp_path, data_dir):
    """bench/gpu_suite.py --cpu, in one process: the checks run and pass (a resume bitwise exact on the CPU), the
    table's row is measured, and each result is on disk (results.jsonl) while the suite still runs."""
    out = tmp_path / "out"
    args = ("--cpu", "--data", str(data_dir), "--work", str(tmp_path / "w"), "--out", str(out))
    proc = subprocess.Popen(suite_cmd(*args, "--only", ",".join(SUITE_ITEMS)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    results, running_at_first_check = out / "results.jsonl", None
    while proc.poll() is None and running_at_first_check is None:
        if results.is_file() and '"kind": "check"' in results.read_text():
            running_at_first_check = proc.poll() is None
        time.sleep(0.2)
    said = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, said[-4000:]
    assert running_at_first_check, said[-2000:]  # written (flushed, fsynced) before the suite went on
    records = [json.loads(line) for line in results.read_text().splitlines()]
    checks = [r for r in records if r["kind"] == "check"]
    assert [c["check"].split(" ")[0] for c in checks] == ["ZeRO-2", "eval", "generate", "fused", "time-split",
                                                          "profile", "ZeRO-3", "export"]  # fmt: skip
    assert all(c["ok"] for c in checks), checks
    assert "max relative difference 0.00e+00" in checks[0]["detail"]  # on the CPU a resume is bitwise exact
    (row,) = [r for r in records if r["kind"] == "row"]
    assert row["model"] == "tiny" and row["tok_s"] > 0 and len(row["losses"]) == 5
    assert [r["item"] for r in records if r["kind"] == "item"] == ["data", *SUITE_ITEMS]
    assert records[-1]["kind"] == "end" and records[-1]["skipped"] == 0
    assert "| export loads in transformers | ok |" in (out / "summary.md").read_text()


def test_the_gpu_suite_refuses_without_a_gpu_and_stops_within_its_budget(tmp_path, data_dir):
    """Without --cpu on a machine without a GPU: one sentence, exit 2. With a budget below the first check's
    estimate: the data (given) is all that runs; every later item is reported skipped, and the suite ends
    cleanly (exit 0: a skipped item is no failure)."""
    r = subprocess.run(suite_cmd("--out", str(tmp_path / "refused")), capture_output=True, text=True, timeout=300,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().startswith("gpu_suite: no GPU here") and len(r.stderr.strip().splitlines()) == 1

    plan = [item for item in bench_module("gpu_suite").plan(cpu=True) if item.on_cpu]
    budget = plan[1].cpu_s - 1  # (the data, given, costs nothing: it fits; the first check cannot)
    out = tmp_path / "out"
    r = subprocess.run(suite_cmd("--cpu", "--budget", str(budget), "--data", str(data_dir), "--out", str(out)),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [x["item"] for x in records if x["kind"] == "item"] == ["data"]
    (skipped,) = [x for x in records if x["kind"] == "skipped"]
    assert skipped["items"] == [item.name for item in plan[1:]]
    assert f"skipped: {', '.join(skipped['items'])}" in r.stdout
    assert not [x for x in records if x["kind"] in ("check", "row")]


def test_the_tensor_parallel_benchmark_finds_each_rank_holding_half_of_the_sharded_matrices(tmp_path):
    """bench/tensor_parallel.py --quick (TP 1 and 2, the memory table): at TP=2 each rank holds half of the bytes
    (parameters, gradients, optimizer state) of the matrices AutoTP splits, within 10%, and more than half of the
    whole (embeddings and norms stay replicated); the table has a row for each size it ran."""
    figures = tmp_path / "figures.json"
    cmd = [sys.executable, str(REPO / "bench" / "tensor_parallel.py"), "--quick", "--no-timing", "--json", str(figures)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {cells[0]: cells for cells in (line.split(" | ") for line in r.stdout.splitlines()) if cells[0].isdigit()}
    assert sorted(rows) == ["1", "2"], r.stdout
    ratio = json.loads(figures.read_text())["ratios"]["2"]
    assert abs(ratio * 2 - 1) <= 0.1, r.stdout
    assert float(rows["2"][7]) == pytest.approx(ratio * 2, abs=1e-3) and float(rows["1"][7]) == 1.0
    assert 0.5 < float(rows["2"][8]) < 1.0, r.stdout  # params + optimizer per rank against TP=1's
    assert "TP=2" in r.stdout and "(met)" in r.stdout
