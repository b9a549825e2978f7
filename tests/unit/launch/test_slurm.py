"""SLURM's decisions without a cluster (launch/slurm.py): requeues stop at max_requeues; the batch script's guard
requeues a failed step that no task explained."""

import subprocess

from dist_clm.launch.slurm import TrainJob


def test_requeueing_stops_at_max_requeues(capsys):
    class Job:  # the two JobEnvironment fields _requeue reads
        job_id, global_rank = "77", 0

    assert not TrainJob(None, [], max_requeues=2)._requeue(Job(), 2, "was preempted")  # no scontrol, no exit
    assert "was preempted after 2 requeues (max_requeues)" in capsys.readouterr().err


def test_a_failed_step_that_no_task_explained_is_requeued(tmp_path, monkeypatch, capsys):
    """The batch script's guard (after_srun): srun failed and no task recorded its end (they were killed by a
    signal) -> requeue, up to max_requeues; a task's own end (success, an error, a requeue it asked for), a
    success, or SLURM ending the job itself (TERM to the script) -> nothing (the batch script's lines that call it
    run in bash: tests/integration/launch/test_slurm_guard.py)."""
    from dist_clm.launch import slurm

    asked = []
    with monkeypatch.context() as m:  # (subprocess.run: scontrol is recorded, not run)
        m.setattr(subprocess, "run", lambda cmd, **k: asked.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", ""))
        monkeypatch.setenv("SLURM_JOB_ID", "41")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        assert slurm.after_srun(0, False, tmp_path, 3) == "nothing to do"
        assert slurm.after_srun(143, True, tmp_path, 3) == "nothing to do"
        assert slurm.after_srun(134, False, tmp_path, 3) == "requeued" and asked == [["scontrol", "requeue", "41"]]
        assert "no task said why: a rank was killed by a signal" in capsys.readouterr().err
        assert slurm.after_srun(134, False, tmp_path, 1) == "max requeues" and len(asked) == 1
        slurm.ended_marker(tmp_path, "41", 0, "2").touch()  # (an earlier attempt's)
        assert slurm.after_srun(134, False, tmp_path, 3) == "requeued"
        slurm.ended_marker(tmp_path, "41", 1, "2").touch()
        assert slurm.after_srun(2, False, tmp_path, 3) == "a task said why it ended"
