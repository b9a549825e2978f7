"""Mistakes answered before the slow part: the checks that need only the config, the data's manifests, the
model's shape and the number of ranks run before torch.distributed, DeepSpeed or the model (training/preflight.py).
Timed from the command, the way a user meets them: a fresh process, its imports included."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.helpers import BIN, TINY, assert_clean_error, run_cli

LIMIT_S = 5.0  # from the command to the sentence, on 2 cores

# the ten commonest mistakes of a first training command, each with a fragment of its sentence
MISTAKES = [
    (["train.max_step=10"], "'train.max_step' is unknown"),
    (["train.lr=1e-3"], "'train.lr' is now 'optim.lr'"),
    (["data.path="], "'data.path' is empty"),
    (["data.path=NOWHERE"], "does not exist; create it with `dist-clm prepare"),
    (["distributed.sequence_parallel_size=3"], "which does not divide the 1 ranks"),
    (["train.optimizer=muon", "optim.grad_clip=1"], "'optim.grad_clip' is 1, but with train.optimizer=muon"),
    (["data.block_size=4096"], "'data.block_size' is 4096, more than the model's 128 positions"),
    (["train.global_batch_size=6"], "'train.global_batch_size' is 6, which is not a multiple"),
    (["model.preset=gpt3"], "'model.preset' must be one of"),
    (["model.pretrained=NOWHERE"], "is not a model directory with config.json"),
    (["model.overrides.vocab_size=100"], "the model embeds only 100"),
    (["train.max_steps=4", "optim.warmup_steps=4"], "'optim.warmup_steps' must be below train.max_steps"),
]


def test_common_mistakes_answer_within_seconds(tmp_path, data_dir):
    """Each mistake: exit 2, one sentence, nothing written, under LIMIT_S from the command (before, those the data
    or the model reveal came after the model was built: 6-8 s on an idle 2-core machine, 50-120 s on a busy one)."""
    run = tmp_path / "run"
    timings = {}
    for settings, fragment in MISTAKES:
        settings = [s.replace("NOWHERE", str(tmp_path / "nowhere")) for s in settings]
        args = ["train", *TINY, f"data.path={data_dir}", f"run.dir={run}", *settings]
        started = time.perf_counter()
        r = run_cli(*args, fresh=True)  # (the installed command from scratch: its imports are part of the time)
        timings[" ".join(settings)] = elapsed = time.perf_counter() - started
        assert_clean_error(r, fragment)
        assert elapsed < LIMIT_S, (settings, f"{elapsed:.1f} s", timings)
        assert not run.exists()
    print("seconds to the sentence:", {k: round(v, 2) for k, v in timings.items()})


def test_a_mistake_under_a_launcher_is_said_once_before_the_group_forms(tmp_path, data_dir):
    """Two ranks under torchrun: the sentence comes from rank 0 alone, before any process group (no rendezvous
    timeout, no second copy from rank 1)."""
    from dist_clm.cli import SILENT_RANK_WAIT_S
    from dist_clm.parallel.process_group import free_port

    settings = [*TINY, f"data.path={data_dir}", f"run.dir={tmp_path / 'run'}", "distributed.sequence_parallel_size=4"]
    started = time.perf_counter()
    r = subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "dist_clm",
         "train", *settings],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    errors = [line for line in r.stderr.splitlines() if line.startswith("dist-clm: error:")]
    assert r.returncode != 0 and errors == [
        "dist-clm: error: config key 'distributed.sequence_parallel_size' is 4, which does not divide the 2 ranks; "
        "use a divisor of the number of ranks."
    ], r.stderr[-2000:]
    assert elapsed < SILENT_RANK_WAIT_S, elapsed  # no rendezvous timeout, no silent rank's wait to its end
    assert not (tmp_path / "run").exists()


def test_a_run_the_memory_plan_cannot_fit_is_refused_before_the_model(tmp_path, data_dir):
    """moe-1b on one CPU rank: ~1 B parameters in fp32 under ZeRO-2 hold ~21 GiB of model states alone (weights,
    gradients, fp32 gradient partition, master weights, AdamW's moments), more than a 24 GB machine has. The
    command answers in one sentence, under LIMIT_S, naming the biggest term and a lever (it used to be killed by the
    kernel after minutes: measured here, its resident memory passed 12 GB within 35 s of the build, before the
    first step). With --no-plan-check the same settings pass the checks (the plan is skipped)."""
    from dist_clm.config import load_config
    from dist_clm.parallel import memory_plan as mp
    from dist_clm.training.preflight import preflight

    settings = [f"data.path={data_dir}", f"run.dir={tmp_path / 'run'}", "model.preset=moe-1b", "run.progress_bar=false"]
    cfg = load_config(None, settings)
    vocab = json.loads((data_dir / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    plan = mp.plan(cfg, mp.size_of_run(cfg, vocab), mp.machine_here(1, True))
    if plan.fits:
        pytest.skip(f"this machine holds moe-1b on one rank ({plan.device_peak / 2**30:.1f} GiB planned)")
    started = time.perf_counter()
    r = run_cli("train", *settings, fresh=True)
    elapsed = time.perf_counter() - started
    assert_clean_error(r, "the memory plan says this run needs", "optimizer state", "is the biggest term",
                       "distributed.zero_stage=3", "--no-plan-check")  # fmt: skip
    assert elapsed < LIMIT_S, elapsed
    assert not (tmp_path / "run").exists()
    assert preflight(cfg, 1, plan_check=False).model.preset == "moe-1b"  # (the flag's path: no plan)
