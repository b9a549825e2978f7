"""Tensor parallelism (distributed.tensor_parallel_size): each layer's matrices split over a group of ranks.

- tests/tp_probe.py under torchrun (2 ranks): for Llama and Qwen3, ZeRO 0, 1 and 3, packed documents or not,
  pretraining or fine-tuning labels, the fused (vocabulary-parallel) or plain loss head, the loss and every
  gradient after DeepSpeed's reduction equal the unsharded model's; without dist_clm's sum of their partial
  gradients, Qwen3's per-head norms would not.
- real runs (torchrun, the deepspeed launcher): TP=2 on 2 ranks trains and validates what TP=1 on 1 rank does,
  step by step (Llama under ZeRO-1, Qwen3 under ZeRO-3 with activation checkpointing, packed documents, two micro
  batches per step); a kill -9 of the whole process group in the middle resumes bitwise; a ZeRO-1 TP=2 checkpoint
  continues exactly at TP=1 on one rank, a ZeRO-3 one is refused in one sentence; export, eval and generate read a
  TP checkpoint, and its export is the TP=1 run's model.
- what cannot be split is one sentence.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from dist_clm.parallel.process_group import free_port
from tests.helpers import (
    BIN,
    assert_clean_error,
    kill_then_resume,
    metrics,
    rebuilt,
    run_cli,
    run_probe,
    same,
    weights,
)

# Adam's eps well above the gradients' rounding: an update then follows its gradient smoothly, so that TP=1 and
# TP=2, whose gradients differ by fp32 rounding only, stay within 1e-6 of each other (with eps 1e-8 a parameter
# whose gradient is ~1e-9, rounding noise, moves by the learning rate whichever way its sign fell)
COMMON = ["model.overrides.hidden_size=64", "model.overrides.intermediate_size=128", "data.block_size=64",
          "train.micro_batch_size=2", "train.global_batch_size=4", "train.max_steps=4", "train.log_every=1",
          "checkpoint.save_every=2", "train.eval_every=2", "train.eval_blocks=4", "optim.warmup_steps=2",
          "optim.lr=3e-3", "optim.eps=1e-5", "run.progress_bar=false", "data.document_mask=true"]  # fmt: skip
LLAMA = ["model.preset=tiny-llama", "distributed.zero_stage=1"]
QWEN3 = [
    "model.preset=tiny-qwen3",
    "model.overrides.head_dim=16",
    "distributed.zero_stage=3",
    "train.activation_checkpointing=true",
]
TP2 = ["distributed.tensor_parallel_size=2"]


def torchrun(n: int, *args: str) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(n), "--master_port", str(free_port()), "-m", "dist_clm",
            "train", *args]  # fmt: skip


@pytest.mark.slow
def test_every_loss_and_gradient_equals_the_unsharded_model(tmp_path):
    found = run_probe("tests.tp_probe", tmp_path)
    bare = found.pop("qwen3 without the partial sums")
    assert len(found) == 7
    for name, diff in found.items():
        assert diff["loss"] < 1e-5, (name, diff)
        assert diff["grad"] < 1e-5, (name, diff)  # (relative to the largest gradient of each parameter)
        assert diff["fused"] == ("head=fused" in name), name  # (the vocabulary-parallel head ran where asked)
    assert all(found[n]["norms"] > 0 for n in found if n.startswith("qwen3"))  # (the norms were compared)
    # each rank's norm gradient covers its own heads only: the sum over the group is the gradient
    assert bare["norms"] > 0.1 and "_norm" in bare["worst"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Llama (ZeRO-1) and Qwen3 (ZeRO-3), each at TP=1 on 1 rank and TP=2 on 2 ranks (torchrun, and the deepspeed
    launcher for Qwen3): 4 steps of packed documents with checkpoints at 2 and 4."""
    root, out = tmp_path_factory.mktemp("tp"), {}
    deepspeed = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "dist_clm",
                 "train"]  # fmt: skip
    for name, model, launcher in (("llama", LLAMA, torchrun(2)), ("qwen3", QWEN3, deepspeed)):
        one = run_cli("train", *COMMON, *model, f"data.path={data_dir}", f"run.dir={root / f'{name}1'}")
        assert one.returncode == 0, one.stderr[-3000:]
        cmd = [*launcher, *COMMON, *model, *TP2, f"data.path={data_dir}", f"run.dir={root / f'{name}2'}"]
        two = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert two.returncode == 0, two.stderr[-3000:]
        assert "1 tensor-parallel group(s) of 2 consecutive ranks, each on one node" in two.stdout + two.stderr
        out[name] = (root / f"{name}1", root / f"{name}2")
    return out


def per_step(run, skip: int = 0) -> dict[int, tuple[float, int]]:
    return {r["step"]: (r["train/loss"], r["data/token_sum"]) for r in metrics(run, skip) if "train/loss" in r}


def validations(run, skip: int = 0) -> dict[int, float]:
    return {r["step"]: r["val/loss"] for r in metrics(run, skip) if "val/loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_tp2_trains_and_validates_what_tp1_does(runs, name, data_dir):
    tp1, tp2 = runs[name]
    want, got = per_step(tp1), per_step(tp2)
    assert list(got) == [1, 2, 3, 4]
    for step, (loss, tokens) in got.items():
        assert tokens == want[step][1], step  # the same blocks, counted once per group
        assert loss == pytest.approx(want[step][0], abs=1e-5), step
    want_val, got_val = validations(tp1), validations(tp2)
    assert list(got_val) == [0, 2, 4]
    for step, loss in got_val.items():
        assert loss == pytest.approx(want_val[step], abs=1e-5), step
    ds = json.loads((tp2 / "ds_config.json").read_text())
    assert ds["tensor_parallel"] == {"autotp_size": 2} and ds["gradient_accumulation_steps"] == 2  # (one DP rank)
    # the documents behind a step: the group's blocks once (rank 1 reads what rank 0 does)
    r = run_cli("data", "batch", str(tp2), "--step", "3", "--rank", "1", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    printed = json.loads(r.stdout)
    assert printed["ranks_per_batch"] == 2 and printed["data_parallel_ranks"] == 1
    assert int(rebuilt(printed["blocks"], {"prepared": data_dir}).sum()) == got[3][1]
    assert run_cli("data", "batch", str(tp2), "--step", "3").stdout.count("ranks 0-1, micro batch") == 4
    marker = json.loads((tp2 / "checkpoints" / "step_00000004" / "complete.json").read_text())
    assert marker["tensor_parallel_size"] == 2
    # the weights after the same training: each TP rank's shards joined (ZeRO-3's partitions read from its layout
    # for Qwen3), against one rank's; the export of Llama's to 1e-6 below
    a, b = weights(tp1, 4), weights(tp2, 4)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 5e-6


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_tp_run_resumes_bitwise(runs, tmp_path, data_dir):
    _, tp2 = runs["qwen3"]
    run = tmp_path / "killed"
    cmd = torchrun(2, *COMMON, *QWEN3, *TP2, f"data.path={data_dir}", f"run.dir={run}")
    kill_then_resume(cmd, run, 3)  # past the step-2 checkpoint, in step 3 or 4
    assert same(weights(run, 4), weights(tp2, 4))  # bit for bit the uninterrupted run's


@pytest.mark.slow
def test_a_tp_checkpoint_continues_at_tp1_or_is_refused_in_one_sentence(runs, tmp_path, data_dir):
    _, llama2 = runs["llama"]
    moved = tmp_path / "llama"  # ZeRO-1 TP=2's step-2 checkpoint, resumed at TP=1 on one rank
    shutil.copytree(llama2, moved)
    shutil.rmtree(moved / "checkpoints" / "step_00000004")
    skip = len(metrics(moved))
    r = run_cli("train", *COMMON, *LLAMA, f"data.path={data_dir}", f"run.dir={moved}")
    assert r.returncode == 0, r.stderr[-3000:]
    want, after = per_step(llama2), per_step(moved, skip)
    assert list(after) == [3, 4]
    for step, (loss, tokens) in after.items():  # through DeepSpeed's universal checkpoint, exactly
        assert tokens == want[step][1] and loss == pytest.approx(want[step][0], abs=1e-6), step

    _, qwen2 = runs["qwen3"]
    moved = tmp_path / "qwen3"  # ZeRO-3: DeepSpeed's universal converter cannot read it
    shutil.copytree(qwen2, moved)
    r = run_cli("train", *COMMON, *QWEN3, f"data.path={data_dir}", f"run.dir={moved}")
    assert_clean_error(r, "was saved with tensor_parallel_size=2, 2 ranks, ZeRO-3", "export it")


@pytest.mark.slow
def test_export_eval_and_generate_read_a_tp_checkpoint(runs, tmp_path):
    from safetensors.torch import load_file

    tp1, tp2 = runs["llama"]
    for run, out in ((tp1, tmp_path / "one"), (tp2, tmp_path / "two")):
        r = run_cli("export", str(run), "--out", str(out))
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    scores = []
    for run in (tp1, tp2):
        r = run_cli("eval", str(run), "--max-blocks", "4", "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        scores.append(json.loads(r.stdout.strip().splitlines()[-1])["perplexity"])
    assert scores[1] == pytest.approx(scores[0], rel=1e-5)
    r = run_cli("generate", str(tp2), "--prompt", "def main(", "--max-new-tokens", "8")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr[-3000:]
