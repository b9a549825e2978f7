"""The training-throughput benchmark measures dist_clm's own training loop, not a copy of it: its dist_clm rows
give the very losses `dist-clm train` gives with the same settings, and its plain-PyTorch anchor trains the
same thing (same weights, blocks and schedule)."""

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, metrics, run_cli, train_losses

pytestmark = pytest.mark.slow


WARMUP, STEPS = 2, 3


def bench_module():
    spec = importlib.util.spec_from_file_location("gpu_throughput", REPO / "bench" / "gpu_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_the_gpu_smoke_runs_its_checks_on_the_cpu(tmp_path, data_dir):
    """bench/gpu_smoke.py (the GPU suite's correctness part) in its quick CPU mode: every kind of check runs and
    passes (the ZeRO-3 runs, which repeat ZeRO-2's code with another stage, are the GPU's)."""
    out = tmp_path / "smoke.json"
    cmd = [sys.executable, str(REPO / "bench" / "gpu_smoke.py"), "--cpu", "--quick", "--data", str(data_dir),
           "--work", str(tmp_path / "w"), "--json", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    checks = json.loads(out.read_text())
    assert [c["check"].split(" ")[0] for c in checks] == ["ZeRO-2", "default", "export", "eval", "generate", "tiny",
                                                          "tiny-llama", "fused"]  # fmt: skip
    assert all(c["ok"] for c in checks)
    assert "max relative difference 0.00e+00" in checks[0]["detail"]  # on the CPU a resume is bitwise exact
