"""Sequence parallelism (distributed.sequence_parallel_size): a block's tokens split over a group of ranks.

- tests/sp_probe.py under torchrun (2 ranks): for GPT-2 and Llama, with and without document masking, on
  pretraining and fine-tuning labels, ZeRO 2 and 3, fused and plain loss heads, DPO, the micro batch's loss and every
  gradient after DeepSpeed's reduction equal the unsharded model's; the logits of sdpa and of flash attention
  (through its stand-in) keep the documents apart, where DeepSpeed's own registration attends across them (it
  equals plain causal attention); flex attention's BlockMask allows exactly what sdpa's dense mask allows.
- real runs: SP=2 on 2 ranks trains and validates what SP=1 on 1 rank does, step by step (its validation, of whole
  rows after sequence-parallel steps, equals one rank's of the same weights); a kill -9 of the whole process
  group in the middle resumes bitwise; the SP=2 run's checkpoint continues at SP=1. (Validation after steps that
  replicated key/value heads: tests/integration/training/test_sft.py.)
- what cannot divide is one sentence.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from dist_clm.parallel.process_group import free_port
from tests.helpers import (
    BIN,
    TINY,
    assert_clean_error,
    kill_then_resume,
    metrics,
    run_cli,
    run_probe,
    same,
    weights,
)

COMMON = [*TINY, "train.micro_batch_size=2", "train.global_batch_size=4", "train.max_steps=4", "train.log_every=1",
          "checkpoint.save_every=2", "train.eval_every=2", "train.eval_blocks=2",
          "data.document_mask=true"]  # fmt: skip


# the sequence-parallel runs recompute their activations in the backward pass (activation checkpointing: the
# core attention's documents must outlive the forward pass); the SP=1 reference does not (the same math). They
# run ZeRO-3, the model built partitioned, and the reference ZeRO-2 on one rank: the same initial weights
SP2 = ["distributed.sequence_parallel_size=2", "train.activation_checkpointing=true", "distributed.zero_stage=3"]


def torchrun(n: int) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(n), "--master_port", str(free_port()), "-m", "dist_clm",
            "train"]  # fmt: skip


@pytest.mark.slow
def test_every_loss_gradient_and_attention_path_equals_the_unsharded_model(tmp_path):
    found = run_probe("tests.sp_probe", tmp_path)
    training = {k: v for k, v in found.items() if "zero=" in k}
    assert len(training) == 10  # (8 token-level cases, 2 of DPO pairs)
    for case, diff in training.items():
        assert diff["loss"] < 1e-5 and diff["reported"] < 1e-5, (case, diff)
        assert diff["grad"] < 1e-4, (case, diff)  # (relative to the largest gradient of each parameter)
    for case in ("gpt2 logits sdpa", "llama logits sdpa", "llama logits flash_attention_2"):
        assert found[case]["logits"] < 1e-5, case
    # flash attention was given the documents of both rows, over the whole rows (5, 11, 16 | 20, 12 tokens)
    assert found["flash_calls"] and all(c == [0, 5, 16, 32, 52, 64] for c in found["flash_calls"])
    # DeepSpeed's own Ulysses registration drops the documents: its logits are plain causal attention's
    own = found["llama deepspeed's own"]
    assert own["vs_causal"] < 1e-5 and own["vs_documents"] > 1e-2


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """SP=1 on 1 rank, and SP=2 on 2 ranks (torchrun, activation checkpointing), 4 steps of packed documents with
    checkpoints at 2 and 4."""
    root = tmp_path_factory.mktemp("sp")
    one = run_cli("train", *COMMON, f"data.path={data_dir}", f"run.dir={root / 'sp1'}")
    assert one.returncode == 0, one.stderr[-3000:]
    sp2 = SP2
    cmd = [*torchrun(2), *COMMON, f"data.path={data_dir}", f"run.dir={root / 'sp2'}", *sp2]
    two = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    return root / "sp1", root / "sp2"


def per_step(run, skip: int = 0) -> dict[int, tuple[float, int]]:
    return {r["step"]: (r["train/loss"], r["data/token_sum"]) for r in metrics(run, skip) if "train/loss" in r}


def validations(run, skip: int = 0) -> dict[int, float]:
    return {r["step"]: r["val/loss"] for r in metrics(run, skip) if "val/loss" in r}


@pytest.mark.slow
def test_sp2_trains_what_sp1_trains_and_its_checkpoint_continues_at_sp1(runs, tmp_path, data_dir):
    sp1, sp2 = runs
    want, got = per_step(sp1), per_step(sp2)
    assert list(got) == [1, 2, 3, 4]
    for step, (loss, tokens) in got.items():
        assert tokens == want[step][1], step  # the same blocks, counted once per group
        assert loss == pytest.approx(want[step][0], abs=1e-5), step
    ds = json.loads((sp2 / "ds_config.json").read_text())
    assert ds["sequence_parallel_size"] == 2 and ds["gradient_accumulation_steps"] == 2  # (one data-parallel rank)
    # validation (whole blocks, the model's own attention) before, between and after sequence-parallel steps
    want_val, got_val = validations(sp1), validations(sp2)
    assert list(got_val) == [0, 2, 4]
    for step, loss in got_val.items():
        assert loss == pytest.approx(want_val[step], abs=1e-5), step

    moved = tmp_path / "moved"  # SP=2's step-2 checkpoint, resumed at SP=1 on one rank (ZeRO-3 too)
    shutil.copytree(sp2, moved)
    shutil.rmtree(moved / "checkpoints" / "step_00000004")
    skip = len(metrics(moved))
    r = run_cli("train", *COMMON, f"data.path={data_dir}", f"run.dir={moved}", "distributed.zero_stage=3")
    assert r.returncode == 0, r.stderr[-3000:]
    after = per_step(moved, skip)
    assert list(after) == [3, 4]
    # DeepSpeed's universal checkpoint restores ZeRO-3's weights exactly (step 3's loss), its optimizer state
    # approximately (step 4's, after one update)
    assert after[3][1] == got[3][1] and after[3][0] == pytest.approx(got[3][0], abs=1e-5)
    assert after[4][1] == got[4][1] and after[4][0] == pytest.approx(got[4][0], rel=1e-2)
    # one rank's validation of the SP=2 run's step-2 weights (the resumed run's first) is the SP=2 run's own
    after_val = validations(moved, skip)
    assert list(after_val) == [2, 4]
    assert after_val[2] == pytest.approx(got_val[2], abs=1e-6)
    assert after_val[4] == pytest.approx(got_val[4], rel=1e-2)
    # under another stage its partitioned model states cannot resume: one sentence, not DeepSpeed's assertion
    shutil.rmtree(moved / "checkpoints" / "step_00000004")
    r = run_cli("train", *COMMON, f"data.path={data_dir}", f"run.dir={moved}")
    assert_clean_error(r, "was saved with ZeRO-3", "resume with distributed.zero_stage=3")


@pytest.mark.slow
def test_kill_9_in_the_middle_of_an_sp_run_resumes_bitwise(runs, tmp_path, data_dir):
    _, sp2 = runs
    run = tmp_path / "killed"
    cmd = [*torchrun(2), *COMMON, f"data.path={data_dir}", f"run.dir={run}", *SP2]
    kill_then_resume(cmd, run, 3)  # past the step-2 checkpoint, in step 3 or 4
    assert same(weights(run, 4), weights(sp2, 4))  # bit for bit the uninterrupted run's


def test_what_cannot_divide_is_one_sentence(tmp_path, data_dir):
    from transformers import AutoConfig

    from dist_clm.config import DistributedConfig
    from dist_clm.errors import UserError
    from dist_clm.models.build import Shape
    from dist_clm.parallel.fit import check_sequence_parallel, check_world

    def check(config, size, block_sizes):
        check_sequence_parallel(Shape.of(config), size, block_sizes)

    llama = AutoConfig.for_model("llama", num_attention_heads=6, num_key_value_heads=3, hidden_size=48)
    with pytest.raises(UserError, match="does not divide the 3 ranks"):
        check_world(DistributedConfig(sequence_parallel_size=2), 3)
    with pytest.raises(UserError, match="does not divide the model's 6 attention heads"):
        check(llama, 4, [64])
    with pytest.raises(UserError, match="3 key/value heads neither divide it"):
        check(AutoConfig.for_model("llama", num_attention_heads=8, num_key_value_heads=3, hidden_size=48), 2, [64])
    gqa = AutoConfig.for_model("llama", num_attention_heads=8, num_key_value_heads=2, hidden_size=64)
    with pytest.raises(UserError, match="data.block_size 65 is not a multiple"):
        check(gqa, 2, [64, 65])
    check(gqa, 4, [64, 128])  # (4 ranks share 2 key/value heads: each is replicated)
    # a plain process is one rank: SP=2 cannot divide it, one sentence before anything is written
    r = run_cli("train", *TINY, f"data.path={data_dir}", f"run.dir={tmp_path / 'r'}",
                "distributed.sequence_parallel_size=2")  # fmt: skip
    assert_clean_error(r, "distributed.sequence_parallel_size' is 2, which does not divide the 1 ranks")
    assert not (tmp_path / "r").exists()
    r = run_cli("train", *TINY, "distributed.sequence_parallel_size=0")
    assert_clean_error(r, "sequence_parallel_size' must be 1 (off) or more")
