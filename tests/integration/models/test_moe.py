"""Mixture-of-Experts decoders (models/moe.py): presets counted by their active parameters; the router's load and
auxiliary loss as logged; ZeRO-3 with the sparse blocks as leaf modules on two ranks whose batches leave experts
idle (no hang); a resume after kill -9 that is bitwise the uninterrupted run, an elastic resume on one rank, with
document masking; the export, whose transformers forward gives the training loss, and the commands on it."""

import json
import math
import os
import signal
import subprocess
import time
from types import SimpleNamespace

import pytest
import torch

from dist_clm.checkpointing.checkpointer import complete_checkpoints
from dist_clm.config import load_config
from dist_clm.models import moe
from dist_clm.models.build import build_model
from dist_clm.parallel.process_group import free_port
from dist_clm.training.objectives import Objective
from tests.helpers import BIN, launch, metrics, resume_moved, run_cli, train_losses, weights

MOE = ["model.preset=tiny-moe", "model.overrides.hidden_size=64", "model.overrides.head_dim=16",
       "model.overrides.moe_intermediate_size=48", "model.router_aux_loss_coef=0.02", "data.block_size=32",
       "train.micro_batch_size=1", "train.global_batch_size=4", "data.document_mask=true"]  # fmt: skip


COMMON = [*MOE, "optim.warmup_steps=2", "optim.lr=3e-3", "train.eval_blocks=8", "run.progress_bar=false",
          "distributed.zero_stage=3", "train.log_every=1", "train.eval_every=0", "train.max_steps=8",
          "checkpoint.save_every=2", "checkpoint.keep_last=5"]  # fmt: skip


def two_ranks() -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, data_dir):
    """Two ranks under ZeRO-3, 32-token micro batches of packed documents: experts go idle on a rank."""
    run = tmp_path_factory.mktemp("moe") / "run"
    r = launch(two_ranks(), *COMMON, f"data.path={data_dir}", f"run.dir={run}")
    (run.parent / "log.txt").write_text(r.stdout + r.stderr)
    return run


@pytest.mark.slow
def test_zero3_trains_with_idle_experts_and_logs_the_router(moe_run):
    assert "M active per token" in (moe_run.parent / "log.txt").read_text()  # (MFU counts those)
    ds = json.loads((moe_run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["leaf_module"] == {"classes": ["Qwen3MoeSparseMoeBlock"]}
    rows = [r for r in metrics(moe_run) if "moe/aux_loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert any(r["moe/idle_experts"] > 0 for r in rows)  # a rank's micro batch left experts without a token
    for r in rows:
        assert 1.0 <= r["moe/aux_loss"] < 8.0  # top-2 of 8: 2 when even, more when not
        for layer in (0, 1):  # 4 blocks of 32 tokens per step, 2 experts each
            assert r[f"moe/layer_{layer}/tokens_min"] <= 32 <= r[f"moe/layer_{layer}/tokens_max"] <= 256
    tb = {p.name for p in (moe_run / "tensorboard").iterdir()}
    assert tb  # (the same scalars reach every sink: the window's one dictionary)


@pytest.mark.slow
def test_kill_9_resumes_bitwise_and_another_rank_count_continues(moe_run, data_dir, tmp_path):
    reference = train_losses(metrics(moe_run))
    run = tmp_path / "killed"
    cmd = [*two_ranks(), "--module", "dist_clm", "train", *COMMON, f"data.path={data_dir}", f"run.dir={run}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while len(complete_checkpoints(run)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = int(complete_checkpoints(run)[-1].name.split("_")[1])
    assert killed_at < 8
    skip = len(metrics(run))
    launch(two_ranks(), *COMMON, f"data.path={data_dir}", f"run.dir={run}")
    resumed = train_losses(metrics(run, skip))
    assert list(resumed) == list(range(killed_at + 1, 9))
    assert all(resumed[s] == reference[s] for s in resumed), (resumed, reference)  # bit for bit
    assert all(torch.equal(a, b) for a, b in zip(weights(run, 8).values(), weights(moe_run, 8).values(), strict=True))

    # elastic: the step-4 checkpoint of two ranks continues on one (grad_accum 4 instead of 2)
    moved = tmp_path / "moved"
    elastic, _ = resume_moved(moe_run, moved, [str(BIN / "python")], *COMMON, f"data.path={data_dir}", last=8)
    assert list(elastic) == [7, 8]  # (from step 6, the newest checkpoint left)
    assert elastic[7] == pytest.approx(reference[7], rel=2e-4)  # weights and data restored exactly
    assert elastic[8] == pytest.approx(reference[8], rel=1e-2)  # (ZeRO-3's universal optimizer state: approximate)


@pytest.mark.slow
def test_the_export_gives_the_training_loss_and_evaluates_generates_and_fine_tunes(moe_run, tmp_path, data_dir):
    from transformers import AutoModelForCausalLM

    from dist_clm.data.tokenizer import load_tokenizer

    out = tmp_path / "hf"
    r = run_cli("export", str(moe_run), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert hf.config.model_type == "qwen3_moe" and hf.config.router_aux_loss_coef == 0.02
    assert not hf.config.output_router_logits  # (as published MoE checkpoints: training asks for the logits)

    # dist_clm's training forward (the objective's loss, the router hooks) on the export's weights, against
    # transformers' own forward with the router's logits, on two packed documents
    ours = build_model("", str(out), {}, load_tokenizer(out)).train()  # (as the engine runs it)
    moe.RouterLoad(ours)
    ids = torch.randint(0, hf.config.vocab_size, (1, 32))
    positions = torch.cat([torch.arange(12), torch.arange(20)])[None]
    loss, _ = Objective(None, 0.0).loss(SimpleNamespace(engine=ours), dict(input_ids=ids, labels=ids,
                                                                           position_ids=positions), {})  # fmt: skip
    want = hf(input_ids=ids, labels=ids, position_ids=positions, output_router_logits=True, use_cache=False).loss
    assert loss.item() == want.item()

    r = run_cli("eval", str(out), "--data", str(data_dir), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.splitlines()[-1])["perplexity"] > 1
    r = run_cli("generate", str(out), "--prompt", "import ", "--max-new-tokens", "6")
    assert r.returncode == 0 and r.stdout.startswith("import "), r.stderr[-2000:]


@pytest.mark.slow
def test_sft_then_dpo_on_an_moe_model(tmp_path, chat_tokenizer):
    """Fine-tuning keeps the router balanced: SFT's loss and DPO's carry the auxiliary loss, and both log it."""
    small = ["model.overrides.hidden_size=64", "model.overrides.head_dim=16",
             "model.overrides.moe_intermediate_size=48", "data.block_size=64", "train.micro_batch_size=2",
             "optim.warmup_steps=1", "train.eval_blocks=2", "train.eval_every=0", "run.progress_bar=false",
             "train.log_every=1", "train.max_steps=3"]  # fmt: skip
    data = {}
    for task in ("chat", "preference"):
        records = tmp_path / f"{task}.jsonl"
        r = run_cli("data", "synthetic", "--task", task, "--out", str(records), "--records", "60")
        assert r.returncode == 0, r.stderr[-2000:]
        data[task] = tmp_path / task
        r = run_cli("prepare", str(records), "--tokenizer", str(chat_tokenizer), "--out", str(data[task]), "--format",
                    task, "--block-size", "64", "--val-fraction", "0.1", "--quiet")  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("train", *small, "model.preset=tiny-moe", f"data.path={data['chat']}", f"run.dir={tmp_path / 'sft'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert run_cli("export", str(tmp_path / "sft"), "--out", str(tmp_path / "start")).returncode == 0
    r = run_cli("prepare-reference", str(data["preference"]), "--model", str(tmp_path / "start"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("train", *small, f"model.pretrained={tmp_path / 'start'}", f"data.path={data['preference']}",
                f"run.dir={tmp_path / 'dpo'}")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    for kind in ("sft", "dpo"):
        assert load_config(tmp_path / kind / "config.yaml").objective.kind == kind  # (chosen from the data)
        rows = [row for row in metrics(tmp_path / kind) if "train/loss" in row]
        assert len(rows) == 3 and all(row["moe/aux_loss"] > 0 for row in rows), kind
    assert all("train/reward_accuracy" in row for row in rows)
    # DPO's first step: the policy is its reference, every pair's loss log 2, and the router's loss added
    assert rows[0]["train/loss"] == pytest.approx(math.log(2) + 0.001 * rows[0]["moe/aux_loss"], rel=1e-6)
