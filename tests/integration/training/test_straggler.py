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


@pytest.mark.slow
def test_a_rank_stalled_past_the_collective_timeout_is_named_with_the_collective_the_others_waited_in(
    tmp_path, data_dir
):
    """Rank 1 stops answering at step 4 for longer than distributed.collective_timeout_s: rank 0's sentence names
    the collective it waited in, read from gloo's flight recorder, whose records each rank dumps into
    RUN/collectives/ (torch's pickles; NCCL dumps its own there on GPUs)."""
    import subprocess

    run = tmp_path / "run"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "dist_clm",
           "train", *TINY, f"data.path={data_dir}", f"run.dir={run}", "train.max_steps=8", "train.eval_every=0",
           "distributed.collective_timeout_s=4", "stability.fault_injection=4:sleep12@1"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    said = r.stdout + r.stderr
    assert r.returncode != 0, said[-3000:]
    line = next(x for x in said.splitlines() if "rank 0 (node " in x and "lost the other ranks" in x)
    assert "no answer within the collective timeout of 4 s" in line, line
    assert "; it was waiting in collective " in line and "(gloo:" in line, line
    folder = run / "collectives"
    assert f"each rank's last collectives: {folder}/" in line, line
    assert (folder / "rank_0").is_file() and (folder / "rank_1").is_file()  # (rank 1 too, once it woke to no peer)
    import pickle

    records = pickle.loads((folder / "rank_0").read_bytes())
    assert records["entries"] and any(e["profiling_name"].startswith("gloo:") for e in records["entries"])
