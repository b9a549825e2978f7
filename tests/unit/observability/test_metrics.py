"""The logged numbers (observability/metrics.py): metrics.jsonl and TensorBoard on the main rank, the window's scalars
and stragglers, peak FLOP/s by card and precision."""

from __future__ import annotations

import json
import time

import psutil
import pytest

from dist_clm.observability.metrics import LogWindow, Metrics, peak_flops, peak_for


def test_metrics_jsonl_rows_and_notes_on_main_only(tmp_path):
    """The main rank appends one JSON row per log/note call (none for empty scalars), no TensorBoard unless
    asked; a reopened Metrics appends; other ranks write nothing."""
    m = Metrics(tmp_path, is_main=True, tensorboard=False)
    m.log(3, {"train/loss": 1.5, "train/lr": 0.01})
    m.log(4, {})
    m.note(5, "train/skipped", "spike")
    m.close()
    m = Metrics(tmp_path, is_main=True, tensorboard=False)  # a resumed run appends
    m.log(6, {"val/loss": 2.0})
    m.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = [{"step": 3, "train/loss": 1.5, "train/lr": 0.01}, {"step": 5, "train/skipped": "spike"}]
    assert rows == [*expected, {"step": 6, "val/loss": 2.0}]
    assert not (tmp_path / "tensorboard").exists()
    (other := tmp_path / "rank1").mkdir()
    w = Metrics(other, is_main=False, tensorboard=True)
    w.log(1, {"train/loss": 1.0})
    w.note(1, "x", "y")
    w.close()
    assert list(other.iterdir()) == []


def test_metrics_tensorboard_events_hold_the_scalars(tmp_path):
    """With tensorboard=True the scalars also go to an event file under RUN/tensorboard, readable back."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    m = Metrics(tmp_path, is_main=True, tensorboard=True)
    m.log(7, {"train/loss": 2.5})
    m.note(8, "train/skipped", "why")
    m.close()
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    seen = {(v.tag, e.step) for e in EventFileLoader(str(events)).Load() for v in e.summary.value}
    assert ("train/loss", 7) in seen and any(tag.startswith("train/skipped") and s == 8 for tag, s in seen)


def _window(world=1, sources=("a", "b")):
    return LogWindow(list(sources), tokens_per_step=1000, flops_per_token=6e6, world=world, device="cpu")


def test_log_window_emit_computes_the_window_scalars():
    """Mean loss over good steps only, tokens/s and data-wait fraction over the window's time, token sum,
    per-source shares, MFU against the peak (none on the CPU), the process's RSS on CPU; then a fresh window."""
    w = _window()
    assert w.peak is None and peak_flops("cpu") is None  # the CPU has no peak: no MFU
    w.peak = 1e12
    w.add(2.0, True, 0.5, [2, 1], [0.1], token_sum=10)
    w.add(50.0, False, 0.0, [1, 0], [0.1], token_sum=20)  # a skipped step: its loss does not count
    w.add(4.0, True, 0.3, [0, 0], [0.1], token_sum=5)
    w.start = time.perf_counter() - 2.0  # the window lasted 2 s
    out = w.emit(lr=0.01, grad_norm=0.7, tokens_seen=3000, skipped_steps=1)
    assert out["train/loss"] == 3.0
    rates = [out["train/tokens_per_s"], out["train/data_wait_frac"], out["train/mfu"]]  # 3000 tokens in 2 s ...
    assert rates == pytest.approx([1500, 0.8 / 2, 1500 * 6e6 / 1e12], rel=1e-3)
    assert out["data/token_sum"] == 35 and (out["data/mix/a"], out["data/mix/b"]) == (0.75, 0.25)
    assert (out["train/lr"], out["train/grad_norm"], out["train/tokens_seen"], out["train/skipped_steps"]) == (
        0.01, 0.7, 3000, 1
    )  # fmt: skip
    assert out["memory/rss_gib"] == pytest.approx(psutil.Process().memory_info().rss / 2**30, rel=0.2)  # on CPU
    assert "train/straggler_rank" not in out  # one rank
    w.peak = None
    w.add(9.0, False, 0.0, [0, 1], [0.1])
    again = w.emit(lr=0.01, grad_norm=0.0, tokens_seen=4000, skipped_steps=2)
    assert "train/loss" not in again and "train/mfu" not in again and again["data/token_sum"] == 0
    assert (again["data/mix/a"], again["data/mix/b"]) == (0.0, 1.0)  # the new window alone
    one = _window(sources=("only",))
    one.add(1.0, True, 0.0, [3], [0.0])
    assert not any(k.startswith("data/mix/") for k in one.emit(lr=0, grad_norm=0, tokens_seen=0, skipped_steps=0))


def test_log_window_straggler_and_persistent_straggler():
    """The straggler is the rank arriving last on average, its lag over the (lower) median rank; it is persistent
    only when the same rank lags by STRAGGLER_LAG or more two windows in a row."""
    two = _window(world=2)
    two.add(1.0, True, 0.6, [1, 0], [1.0, 3.0])
    assert two.straggler() == (1, 3.0)
    two.start = time.perf_counter() - 2.0
    out = two.emit(lr=0, grad_norm=0, tokens_seen=0, skipped_steps=0)
    assert out["train/data_wait_frac"] == pytest.approx(0.6 / (2 * 2.0), rel=1e-3)  # the mean over the ranks
    assert (out["train/straggler_rank"], out["train/straggler_lag"]) == (1, 3.0)
    w = _window(world=3)
    persistent = []
    for arrivals in ([1.0, 1.0, 2.0], [1.0, 1.0, 2.0], [1.0, 1.0, 2.0], [1.0, 1.2, 1.0], [2.0, 1.0, 1.0]):
        w.add(1.0, True, 0.0, [1, 1], arrivals)
        out = w.emit(lr=0, grad_norm=0, tokens_seen=0, skipped_steps=0)
        persistent.append(w.persistent_straggler)
    assert (out["train/straggler_rank"], out["train/straggler_lag"]) == (0, 2.0)
    assert persistent == [None, 2, 2, None, None]


SXM, PCIE, V100 = "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "Tesla V100-SXM2-32GB"


PEAK_CASES = [  # (card name as torch reports it, precision, train.tf32, peak): variants told apart by their words
    (SXM, "bf16", True, 989e12), (PCIE, "bf16", True, 756e12), ("NVIDIA H100 NVL", "fp16", True, 835e12),
    (SXM, "fp32", True, 495e12), (SXM, "fp32", False, 67e12), (PCIE, "fp32", False, 51e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", True, 312e12), ("NVIDIA GH200 480GB", "bf16", True, 989e12),
    ("NVIDIA L40S", "bf16", True, 362e12), ("NVIDIA L4", "bf16", True, 121e12), ("Tesla T4", "fp16", True, 65e12),
    (V100, "bf16", True, None), ("NVIDIA GeForce RTX 4090", "bf16", True, None), ("AMD MI300X", "bf16", True, None),
]  # fmt: skip


@pytest.mark.parametrize("name, precision, tf32, peak", PEAK_CASES)
def test_peak_for_card_and_precision(name, precision, tf32, peak):
    """PEAKS' figure for the card's name (variants told apart) in the precision; an unknown card has none."""
    assert peak_for(name, precision, tf32) == peak


def test_peak_for_fp32_falls_back_when_the_card_has_no_tf32():
    """A V100 runs fp32 on its CUDA cores whatever train.tf32 says, so MFU uses its fp32 figure (15.7 TFLOP/s)."""
    assert peak_for(V100, "fp32", tf32=True) == 15.7e12


def test_the_console_shows_a_small_loss_as_itself():
    """A preference loss near 0 (a DPO run whose pairs are all ranked right) reads as its value, never 0.000;
    others keep four significant digits."""
    from dist_clm.observability.metrics import loss_text

    assert loss_text(3.3039166e-06) == "3.304e-06" and loss_text(0.00042) == "0.00042"
    assert loss_text(2.3456789) == "2.346" and loss_text(0.6931472) == "0.6931" and loss_text(11.04) == "11.04"
    assert loss_text(float("nan")) == "nan"
