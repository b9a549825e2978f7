"""The memory plan against the memory real runs take (parallel/memory_plan.py): ZeRO 1-3 at 1 and 2 CPU ranks.

Measured in the rank processes: the peak resident memory of the processes a command started (a wrapper's
RUSAGE_CHILDREN, the largest of its descendants: the ranks). What the plan claims is the memory the model and its
run add, so each figure is taken above the same run of a near-empty model (one layer of width 16), which carries
what every run holds whatever its model: the imports, the process group, DeepSpeed's engine, the loader; the plan
of that near-empty model is taken off the planned figure likewise."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dist_clm.config import load_config
from dist_clm.parallel import memory_plan as mp
from dist_clm.parallel.process_group import free_port
from tests.helpers import BIN

MODEL = ["model.overrides.n_embd=512", "model.overrides.n_layer=4"]  # 13 M parameters: ~0.3-0.5 GiB planned
EMPTY = ["model.overrides.n_embd=16", "model.overrides.n_layer=1", "model.overrides.n_head=1"]
RUN = ["model.preset=tiny", "model.overrides.n_positions=64", "data.block_size=64", "train.micro_batch_size=4",
       "train.max_steps=1", "optim.warmup_steps=0", "train.eval_every=0", "train.eval_blocks=1",
       "checkpoint.save_every=0", "run.loggers=[jsonl]", "run.progress_bar=false"]  # fmt: skip
TOLERANCE = 0.2

WRAPPER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
           "sys.stderr.write(r.stderr[-4000:]); print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN)"
           ".ru_maxrss)")  # fmt: skip


def peak_bytes(command: list[str]) -> int:
    """The largest resident memory any process `command` started reached (Linux reports KiB)."""
    r = subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True, text=True, timeout=600)
    code, kib = r.stdout.split()
    assert code == "0", r.stderr
    return int(kib) * 1024


def command(ranks: int, settings: list[str]) -> list[str]:
    launcher = ([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "dist_clm"]
                if ranks == 2 else [str(BIN / "dist-clm")])  # fmt: skip
    return [*launcher, "train", *RUN, *settings]


def planned(ranks: int, settings: list[str], vocab: int) -> int:
    cfg = load_config(None, [*RUN, *settings])
    machine = mp.Machine(ranks, 1, 0, 2**40, on_gpu=False)
    return mp.plan(cfg, mp.size_of_run(cfg, vocab), machine, levers=False).device_peak


@pytest.mark.slow
def test_the_planned_peak_is_within_a_fifth_of_the_measured_one(tmp_path, data_dir):
    """Each ZeRO stage at 1 and 2 ranks: planned and measured memory above the near-empty model's run agree within
    TOLERANCE. (Measured 2026-12, 2-core VM: planned/measured 0.96, 1.01, 0.92 at 1 rank for stages 1-3; 0.83,
    0.85, 0.90 at 2 ranks: each rank's gloo buffers and its share of the loader grow a little with the model.)"""
    import json

    vocab = json.loads((data_dir / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    rows, base = {}, {}
    for ranks in (1, 2):
        data = [f"data.path={data_dir}"]
        base[ranks] = peak_bytes(command(ranks, [*data, f"run.dir={tmp_path / f'empty{ranks}'}", *EMPTY]))
        for stage in (1, 2, 3):
            settings = [*data, f"run.dir={tmp_path / f'r{ranks}z{stage}'}", f"distributed.zero_stage={stage}"]
            measured = peak_bytes(command(ranks, [*settings, *MODEL])) - base[ranks]
            plan = planned(ranks, [*settings, *MODEL], vocab) - planned(ranks, [*settings, *EMPTY], vocab)
            rows[(ranks, stage)] = (plan >> 20, measured >> 20, round(plan / measured, 2))
    print("ranks, stage: planned MiB, measured MiB, ratio", rows)
    for key, (_, _, ratio) in rows.items():
        assert abs(ratio - 1) <= TOLERANCE, (key, rows)
