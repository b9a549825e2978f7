"""Context extension as a data stage: data.stages changes data.block_size at a step; the run trains each step at
its stage's length, counts its tokens, evaluates at every length, and resumes exactly across and inside the
stages (inside the long stage under sequence parallelism too); a block size changed where no stage says so, or
a begun stage's, is refused naming it. RoPE settings reach the model."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from dist_clm.parallel.process_group import free_port
from tests.helpers import BIN, TINY, assert_clean_error, metrics, run_cli, train_losses

STAGES = "data.stages=[{until: 3}, {block_size: 128}]"  # steps 1-3 in blocks of 64 tokens, then of 128


COMMON = [*TINY, "train.micro_batch_size=2", "train.global_batch_size=4", "train.max_steps=6", "train.log_every=1",
          "checkpoint.save_every=2", "checkpoint.keep_last=3", "train.eval_every=0", "train.eval_blocks=2",
          STAGES]  # fmt: skip


@pytest.fixture(scope="module")
def extended(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("ctx") / "run"
    r = run_cli("train", *COMMON, f"data.path={data_dir}", f"run.dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    return run, r.stdout


def resumed_from(run, step: int, dest, data_dir, launcher: list[str] | None = None, *overrides: str):
    """RUN copied without its checkpoints after `step`, then resumed (the losses of the steps it trained)."""
    shutil.copytree(run, dest)
    for later in range(step + 2, 7, 2):
        shutil.rmtree(dest / "checkpoints" / f"step_{later:08d}")
    skip = len(metrics(dest))
    cmd = launcher or [str(BIN / "dist-clm"), "train"]
    r = subprocess.run([*cmd, *COMMON, f"data.path={data_dir}", f"run.dir={dest}", *overrides], capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {dest / 'checkpoints' / f'step_{step:08d}'}" in r.stdout + r.stderr
    return train_losses(metrics(dest, skip))


@pytest.mark.slow
def test_a_stage_extends_the_context_and_resumes_exactly_across_and_inside_it(extended, tmp_path, data_dir):
    run, out = extended
    rows = metrics(run)
    seen = {r["step"]: r["train/tokens_seen"] for r in rows if "train/tokens_seen" in r}
    assert seen == {1: 256, 2: 512, 3: 768, 4: 1280, 5: 1792, 6: 2304}  # 4 blocks of 64, then of 128 tokens
    assert "data stage 2 of 2 (steps 4-): prepared 100.0% of the blocks, 128 tokens each" in out
    final = [r for r in rows if "val/at_128/loss" in r][-1]  # both lengths evaluated; val/loss at the one trained
    assert final["val/loss"] == final["val/at_128/loss"] and "val/at_64/loss" in final
    first = [r for r in rows if "val/at_64/loss" in r][0]
    assert first["val/loss"] == first["val/at_64/loss"]
    losses = train_losses(rows)

    across = resumed_from(run, 2, tmp_path / "across", data_dir)  # from stage 1 into stage 2
    assert across == {s: v for s, v in losses.items() if s > 2}  # bit for bit
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "dist_clm",
                "train"]  # fmt: skip
    inside = resumed_from(run, 4, tmp_path / "inside", data_dir, torchrun, "distributed.sequence_parallel_size=2")
    assert inside == pytest.approx({s: v for s, v in losses.items() if s > 4}, abs=1e-5)  # (SP: another sum order)

    # the step-4 checkpoint's data part refuses a begun stage's other block size, and data.block_size's
    from dist_clm.config import load_config
    from dist_clm.data.order import DataPosition
    from dist_clm.data.run_data import training_sources
    from dist_clm.errors import Mismatch
    from tests.helpers import train_state

    saved = train_state(run, 4)["data"]
    for overrides, fragment in [
        (["data.stages=[{until: 3}, {block_size: 96}]"], "their block size included"),
        (["data.block_size=32"], "data.block_size: 64 -> 32"),
        (["data.stages=[{until: 5}, {block_size: 128}]"], "the data mixture of the 4 steps already trained"),
    ]:
        cfg = load_config(None, [*COMMON, f"data.path={data_dir}", *overrides])
        position = DataPosition.from_config(cfg.data, None, training_sources(cfg.data), 4)
        with pytest.raises(Mismatch, match=fragment):
            position.load_state_dict(saved)
    appended = "data.stages=[{until: 3}, {until: 8, block_size: 128}, {block_size: 64}]"  # (a stage not begun: fine)
    cfg = load_config(None, [*COMMON, f"data.path={data_dir}", appended])
    DataPosition.from_config(cfg.data, None, training_sources(cfg.data), 4).load_state_dict(saved)


def test_stage_block_sizes_are_checked(tmp_path, data_dir):
    r = run_cli("train", *TINY, f"data.path={data_dir}", f"run.dir={tmp_path / 'r'}",
                "data.stages=[{until: 2}, {block_size: 256}]")  # fmt: skip
    assert_clean_error(r, "a block size in data.stages is 256, more than the model's 128 positions")
    from dist_clm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="block sizes must be at least 2"):
        load_config(None, ["data.stages=[{until: 2}, {block_size: 1}]"])
