"""NaNs and loss spikes: a bad step is agreed by every rank and not applied; K bad steps in a row or a spike
roll back to the last checkpoint and skip the data window that led there. Faults are injected into the loss
with stability.fault_injection, in real runs."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from dist_clm.data.order import SKIPS, DataPosition
from dist_clm.errors import UserError
from dist_clm.parallel.process_group import free_port
from dist_clm.training.objectives import MeanRise, SpreadRise
from dist_clm.training.stability import LossGuard, LossInjector
from tests.helpers import (
    BIN,
    TINY,
    assert_clean_error,
    check_export,
    checkpoint_dir,
    metrics,
    run_cli,
    same,
    train_losses,
    train_state,
    weights,
)


def test_guard_counts_bad_steps_in_a_row_and_asks_the_objectives_rule_about_spikes():
    g = LossGuard(max_bad_steps=2, rule=MeanRise(2.0), window=3)
    assert g.spike(100.0) is None  # no history yet: nothing to compare with
    for loss in (5.0, 4.0, 3.0):
        assert g.after_step(True, loss, None) is None
    assert "more than 2 x the running mean 4" in g.spike(8.1) and g.spike(7.9) is None  # the last three's mean: 4
    assert g.after_step(False, math.nan, None) is None
    assert g.after_step(True, 3.0, None) is None  # a good step ends the streak
    assert g.after_step(False, math.nan, None) is None
    streak = g.after_step(False, math.nan, None)
    assert "2 steps in a row" in streak.reason and not streak.spike
    spike = g.after_step(False, 9.0, g.spike(9.0))
    assert "more than 2 x the running mean" in spike.reason and spike.spike
    assert g.skipped == 4
    g.reset()
    assert g.spike(100.0) is None and g.bad_in_a_row == 0
    off = LossGuard(3, MeanRise(0.0), 3)
    for loss in (1.0, 1.0, 1.0):
        off.after_step(True, loss, None)
    assert off.spike(1e9) is None  # spike_factor 0: off


def test_the_preference_rule_lets_noisy_losses_through_and_catches_a_divergence():
    """DPO's step losses as a new user saw them (micro batch 8: four pairs a step): the pretraining rule called
    the 11th a spike and, with no checkpoint yet, ended the run; the preference rule measures it against the
    robust spread of the recent losses, which it is well within, while a real divergence is far outside."""
    seen = [0.69, 0.39, 0.34, 0.27, 0.37, 0.42, 0.70, 0.22, 0.38, 0.63]
    assert MeanRise(2.0).verdict(1.141, seen)  # the old rule
    assert SpreadRise(10).verdict(1.141, seen) is None
    assert "robust spreads" in SpreadRise(10).verdict(4.0, seen)
    assert SpreadRise(0).verdict(1e9, seen) is None  # off
    assert SpreadRise(10).verdict(0.2, [0.01] * 10) is None and SpreadRise(10).verdict(0.6, [0.01] * 10)  # (floor)


def test_injector_applies_each_entry_once_on_its_rank():
    loss = torch.tensor(2.0)
    inj = LossInjector(rank=1, spec="3:nan@1, 3:x4, 5:inf@0")
    assert inj(2, loss) == 2.0
    assert math.isnan(inj(3, loss)) and inj(3, loss) == 2.0  # applied once: a rolled-back step is clean
    assert inj(5, loss) == 2.0  # meant for rank 0
    assert LossInjector(rank=0, spec="4:x10")(4, loss) == 20.0
    for bad in ("3", "x:nan", "3:zero", "3:x0", "3:sleep", "3-x:nan", "3:sleep-1"):
        with pytest.raises(UserError, match=re.escape("is not STEP[-LAST]:KIND[@RANK]")):
            LossInjector(rank=0, spec=bad)
    ranged = LossInjector(rank=1, spec="2-4:x2@1")
    assert [float(ranged(s, loss)) for s in range(1, 6)] == [2.0, 4.0, 4.0, 4.0, 2.0] and ranged.injected == 3


def test_skipped_windows_are_followed_on_resume(tmp_path, data_dir):
    from dist_clm.data.format import read_manifest
    from dist_clm.data.order import Source

    sources = [Source("a", str(data_dir), read_manifest(data_dir))]
    main, other = (DataPosition(sources, block_size=64, global_batch=8, run_dir=tmp_path, writes=rank == 0)
                   for rank in (0, 1))  # fmt: skip
    main.blocks_consumed = other.blocks_consumed = 16  # (both back at a checkpoint's position)
    assert other.skip_to(24, 3, "spike") == (16, 24) and not (tmp_path / SKIPS).exists()  # only rank 0 writes
    assert main.skip_to(24, 3, "spike") == (16, 24) and main.blocks_consumed == 24
    main.skip_to(40, 5, "nan")  # a rollback right after the last one
    for position in (main, other):  # every rank reads the record
        assert position.past_skipped(16) == 40
        assert position.past_skipped(8) == 8 and position.past_skipped(24) == 40
    saved = {**main.state_dict(), "blocks_consumed": 16}  # a resume from the checkpoint before both windows
    other.load_state_dict(saved)
    assert other.blocks_consumed == 40


@pytest.mark.slow
def test_two_ranks_agree_to_skip_and_roll_back(tmp_path, data_dir):
    run = tmp_path / "run"
    # step 3: NaN on rank 1 only; steps 7 and 8: non-finite on one rank each (2 in a row: roll back);
    # step 12: the loss x10 on both ranks (a spike: roll back)
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "dist_clm",
           "train", *TINY, f"data.path={data_dir}", f"run.dir={run}", "train.max_steps=14", "train.grad_accum=2",
           "checkpoint.save_every=1", "checkpoint.keep_last=20", "train.log_every=1", "train.eval_every=0",
           "stability.max_bad_steps=2", "stability.spike_window=4",
           "stability.fault_injection=3:nan@1,7:nan@0,8:inf@1,12:x10"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "2 steps in a row had a non-finite loss" in out and "rolled back to step 7" in out
    assert "is more than 2 x the running mean" in out and "rolled back to step 11" in out

    assert same(weights(run, 2), weights(run, 3))  # step 3's update was not applied, on either rank's shard
    assert not same(weights(run, 3), weights(run, 4))
    per_step = 2 * 4 * 2  # ranks x micro batch x accumulation
    skips = json.loads((run / SKIPS).read_text())
    assert [(s["from_block"], s["to_block"], s["diverged_at_step"]) for s in skips] == [
        (7 * per_step, 8 * per_step, 8),  # the data of step 8 (back to the checkpoint of step 7)
        (12 * per_step, 13 * per_step, 12),  # the data of step 12, counted past the first window
    ]
    assert train_state(run, 14)["data"]["blocks_consumed"] == 16 * per_step  # 14 steps trained + 2 skipped windows

    rows = metrics(run)
    losses = train_losses(rows)
    # a skipped step has no loss to report: 3, and 7 (the checkpoint rolled back to was saved after it)
    assert sorted(losses) == [s for s in range(1, 15) if s not in (3, 7)]
    assert all(math.isfinite(v) for v in losses.values())
    assert max(row.get("train/rollbacks", 0) for row in rows) == 2
    seen = [row["train/tokens_seen"] for row in rows if "train/tokens_seen" in row]
    assert seen[-1] == 14 * per_step * 64  # counted by step: the rolled-back windows are not counted


@pytest.mark.slow
def test_zero0_fp32_skips_too_and_without_a_checkpoint_divergence_is_a_clear_error(tmp_path, data_dir):
    # ZeRO-0 in fp32 is the one setting where DeepSpeed has no overflow path: dist_clm drops the gradients
    run = tmp_path / "zero0"
    common = [*TINY, f"data.path={data_dir}", "train.log_every=1", "train.eval_every=0", "stability.max_bad_steps=2"]
    r = run_cli("train", *common, f"run.dir={run}", "distributed.zero_stage=0", "train.max_steps=4",
                "checkpoint.save_every=1", "checkpoint.keep_last=5", "optim.warmup_steps=3",
                "stability.fault_injection=2:nan")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning: fault injection is on (stability.fault_injection='2:nan')" in r.stderr  # said loudly
    assert [row["step"] for row in metrics(run) if "faults/injected" in row] == [2]  # and logged where it happened
    assert same(weights(run, 1), weights(run, 2)) and not same(weights(run, 2), weights(run, 3))
    rows = {row["step"]: row for row in metrics(run) if "train/lr" in row}
    assert rows[4]["train/skipped_steps"] == 1
    assert rows[2]["train/lr"] == rows[1]["train/lr"] != rows[3]["train/lr"]  # the schedule waited a step
    # a ZeRO-0 checkpoint exports too (its weights are the module's own)

    assert run_cli("export", str(run), "--out", str(tmp_path / "hf")).returncode == 0
    check_export(tmp_path / "hf", checkpoint_dir(run, 4))

    r = run_cli("train", *common, f"run.dir={tmp_path / 'nockpt'}", "train.max_steps=5", "checkpoint.save_every=0",
                "stability.fault_injection=2:nan,3:inf")  # fmt: skip
    assert_clean_error(r, "training diverged at step 3", "no checkpoint to roll back to", "lower optim.lr")


DROPPED_UPDATE = """
import math, os, sys, torch, deepspeed
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from dist_clm.training.stability import drop_update, real_grad_norm

deepspeed.init_distributed("gloo", verbose=False)
for stage in (1, 2, 3):
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "bf16": {"enabled": bf16},
                  "zero_optimization": {"stage": stage}, "steps_per_print": 1 << 30,
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        x = torch.randn(2, 8).to(torch.bfloat16 if bf16 else torch.float32)
        loss = lambda: engine(x).float().pow(2).mean()
        engine.backward(loss())
        engine.step()
        params = list(engine.module.parameters())
        state = lambda: [t.clone() for p in params for t in (safe_get_full_fp32_param(p),
                         safe_get_full_optimizer_state(p, "exp_avg"), safe_get_full_optimizer_state(p, "exp_avg_sq"))]
        before, lr = state(), engine.get_lr()
        engine.backward(loss())
        norm = real_grad_norm(engine)
        drop_update(engine)
        engine.step()
        dropped = not engine.was_step_applied() and all(map(torch.equal, before, state())) and engine.get_lr() == lr
        engine.backward(loss())  # the same gradient again, applied: DeepSpeed's own norm of it
        engine.step()
        print(stage, bf16, dropped, engine.was_step_applied(), norm, float(engine.get_global_grad_norm()))
"""


def test_a_dropped_update_leaves_weights_and_optimizer_state_alone_on_every_zero_stage(tmp_path):
    """A skipped step: the real gradient's norm is taken (DeepSpeed's own for the same gradient, applied next),
    then one gradient set to NaN sends ZeRO 1, 2 and 3, fp32 and bf16, down DeepSpeed's overflow path: weights,
    Adam's moments and the learning rate are bitwise what they were, and the next step applies."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu"}  # fmt: skip
    r = subprocess.run([sys.executable, "-c", DROPPED_UPDATE], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines() if line[:2] in ("1 ", "2 ", "3 ")]
    assert len(rows) == 6
    for stage, bf16, dropped, applied, norm, theirs in rows:
        assert dropped == "True" and applied == "True", (stage, bf16)
        assert float(norm) == pytest.approx(float(theirs), rel=1e-5), (stage, bf16)
