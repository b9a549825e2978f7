"""NaNs and loss spikes: a bad step is agreed by every rank and not applied; K bad steps in a row or a spike
roll back to the last checkpoint and skip the data window that led there. Faults are injected into the loss
with stability.fault_injection, in real runs."""

import json
import math
import os
import subprocess
import sys

import pytest

from dist_clm.data.order import SKIPS
from dist_clm.parallel.process_group import free_port
from tests.helpers import (
    BIN,
    TINY,
    assert_clean_error,
    check_export,
    checkpoint_dir,
    metrics,
    rebuilt,
    run_cli,
    same,
    train_losses,
    train_state,
    weights,
)


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

    # every bad step's incident: the documents it trained on (as `data batch` prints them, for step 12 the run of
    # it that the rollback undid) and their losses under the weights it ran with
    sums = [(row["step"], row["data/token_sum"]) for row in rows if "data/token_sum" in row]
    for step, kept in ((3, True), (7, True), (12, False)):
        path = run / "incidents" / f"step-{step}.json"
        assert f"step {step}: its documents and their losses under its weights are in {path}" in out
        incident = json.loads(path.read_text())
        r = run_cli("data", "batch", str(run), "--step", str(step), "--json")
        assert r.returncode == 0, r.stderr[-2000:]
        printed = json.loads(r.stdout)
        shown = printed["blocks"] if kept else printed["undone"][0]["blocks"]
        assert len(printed["undone"]) == (0 if kept else 1)
        for b in shown:
            for p in b["pieces"]:
                assert p.pop("excerpt")  # (decoded with the run's tokenizer)
        assert incident["blocks"] == shown and len(shown) == per_step
        ids = rebuilt(shown, {"prepared": data_dir})  # the token ids, from the documents' ranges alone
        assert int(ids.sum()) == next(s for at, s in sums if at == step)  # what the run logged (step 12: first)
        documents = {(p["document"]) for b in shown for p in b["pieces"]}
        top = incident["top_documents"]
        assert top and {d["document"] for d in top} <= documents and incident["reason"]
        assert [d["loss"] for d in top] == sorted((d["loss"] for d in top), reverse=True)
        assert all(math.isfinite(d["loss"]) and d["tokens"] > 0 for d in top)
    assert json.loads((run / "incidents" / "step-12.json").read_text())["reason"].startswith("a spike")
    shown = run_cli("status", str(run)).stdout  # the run on one screen, its incidents named
    assert f"run {run}: finished at step 14" in shown and "step 14 of 14 (100%)" in shown, shown
    assert "incidents: step 7: " in shown and "step 12: a spike" in shown and "(and 1 earlier)" in shown


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
