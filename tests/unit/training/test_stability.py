"""The loss guard, the objectives' spike rules, fault injection and skipped data windows, in one process
(training/stability.py, training/objectives.py, data/order.py)."""

import math
import re

import pytest
import torch

from dist_clm.data.order import SKIPS, DataPosition
from dist_clm.errors import UserError
from dist_clm.training.objectives import MeanRise, SpreadRise
from dist_clm.training.stability import LossGuard, LossInjector


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
