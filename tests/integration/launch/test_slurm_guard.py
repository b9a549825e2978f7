"""The batch script's guard as SLURM runs it: its generated lines in bash, after srun failed, succeeded, or while
SLURM terminated the script, hand the guard (launch/slurm.py: after_srun) srun's status and whether the script
was signalled."""

import subprocess


def test_the_batch_scripts_lines_hand_the_guard_sruns_status(tmp_path, monkeypatch):
    from dist_clm.launch import slurm

    # the lines in a batch script: srun failing, srun succeeding, the script terminated by SLURM
    log, fake = tmp_path / "guard.log", tmp_path / "python"
    # (the guard runs `python -m dist_clm.launch.slurm after-srun STATUS SIGNALLED ...`: the fake logs those two)
    fake.write_text(f'#!/bin/sh\necho "$4 $5" >> {log}\n')
    fake.chmod(0o755)
    monkeypatch.setattr(slurm.sys, "executable", str(fake))
    for srun in ("(exit 134)", "true", "kill -TERM $$; sleep 1"):
        subprocess.run(["bash", "-c", "\n".join([*slurm.guard_lines(tmp_path, 3), srun])], check=False)
    assert log.read_text().splitlines() == ["134 0", "0 0", "143 1"]
