"""A straggler, measured on the step's agreement and named (two ranks on this machine)."""

import pytest

from dist_clm.parallel.process_group import free_port
from tests.helpers import (
    BIN,
    TINY,
    launch,
    metrics,
)


@pytest.mark.slow
def test_a_straggler_is_measured_on_the_steps_agreement_and_named(tmp_path, data_dir):
    """Rank 1 reaches every step's agreement 0.3 s late (a drill): train/straggler_* say so, and the log names
    it once it has been slow for two windows in a row. (No SLURM needed: two ranks on this machine.)"""
    run = tmp_path / "run"
    r = launch([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())], *TINY,
               f"data.path={data_dir}", f"run.dir={run}", "train.max_steps=8", "train.log_every=2",
               "train.eval_every=0", "stability.fault_injection=1-8:sleep0.3@1")  # fmt: skip
    windows = [row for row in metrics(run) if "train/straggler_lag" in row]
    assert [w["step"] for w in windows] == [2, 4, 6, 8]
    assert all(w["train/straggler_rank"] == 1 and w["train/straggler_lag"] > 1.5 for w in windows)
    assert "step 4: rank 1 (node " in r.stdout + r.stderr and "is a straggler" in r.stdout + r.stderr
