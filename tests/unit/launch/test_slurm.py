"""SLURM's decisions without a cluster (launch/slurm.py, partition.py): requeues stop at max_requeues; the batch
script's guard requeues a failed step that no task explained; a request no node of the partition can hold is
one sentence (from sinfo's lines); a pending reason that never clears is said once; a prepare's wait ends when a
stage can never run."""

import subprocess

import pytest

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


# what a partition can give (sinfo -h -a -N -o partition.SINFO_FORMAT): the machine's node on debug (the
# default), three small nodes on multi, two GPU nodes of another shape on gpu (at most 2 nodes, 2 hours a job)
SINFO = """\
debug*|vm|2|21694|(null)|infinite|1-infinite
multi|dn1|2|5423|(null)|infinite|1-infinite
multi|dn2|2|5423|(null)|infinite|1-infinite
multi|dn3|2|5423+|(null)|infinite|1-infinite
gpu|g1|64|515000|gpu:h100:8(S:0-1)|2:00:00|1-2
gpu|g2|32|257000|gpu:4,mps:100|2:00:00|1-2
"""


def test_a_request_no_node_of_the_partition_can_satisfy_is_one_sentence_naming_it_and_the_flag():
    from dist_clm.errors import UserError
    from dist_clm.launch.partition import fit, parse_sinfo
    from dist_clm.launch.slurm import SlurmSettings

    parts = parse_sinfo(SINFO)
    assert sorted(parts) == ["debug", "gpu", "multi"] and parts["debug"].default
    assert [n.gpus for n in parts["gpu"].nodes] == [8, 4] and parts["gpu"].max_time_min == 120
    # the default --cpus-per-task: 8, or what a node gives each of its tasks where that is less
    assert fit(SlurmSettings(), parts) == 2
    assert fit(SlurmSettings(partition="gpu", gpus_per_node=8, time_min=60), parts) == 8
    assert fit(SlurmSettings(partition="gpu", gpus_per_node=4, nodes=2, time_min=60), parts) == 8
    assert fit(SlurmSettings(partition="multi", tasks_per_node=2), parts) == 1
    assert fit(SlurmSettings(partition="multi", nodes=3, cpus_per_task=1, tasks_per_node=2), parts) == 1
    assert fit(SlurmSettings(partition="gpu,multi", cpus_per_task=1), parts) == 1  # (one of them fits)
    assert fit(SlurmSettings(partition="nope,multi", cpus_per_task=1), parts) == 1
    for settings, fragments in [
        (SlurmSettings(partition="multi", cpus_per_task=3),
         ["3 CPUs per node (--cpus-per-task 3 x 1 task)", "partition multi", "3 nodes of 2 CPUs",
          "--cpus-per-task 2 or fewer"]),
        (SlurmSettings(cpus_per_task=8), ["partition debug", "1 node of 2 CPUs, 21694 MB", "--cpus-per-task"]),
        (SlurmSettings(partition="multi", tasks_per_node=3), ["3 tasks", "--tasks-per-node 2 or fewer"]),
        (SlurmSettings(partition="multi", cpus_per_task=1, mem_gb=6), ["6 GB of memory per node",
                                                                      "--mem-gb 5 or less"]),
        (SlurmSettings(partition="gpu", gpus_per_node=16, time_min=60), ["16 GPUs per node", "8 GPUs",
                                                                         "--gpus-per-node 8 or fewer"]),
        (SlurmSettings(partition="gpu", gpus_per_node=8, nodes=2, time_min=60), ["2 nodes", "only 1 of them",
                                                                                 "--nodes"]),
        (SlurmSettings(partition="gpu", nodes=3, time_min=60), ["3 nodes", "at most 2 nodes a job", "--nodes 2"]),
        (SlurmSettings(partition="multi", nodes=4, cpus_per_task=1), ["4 nodes", "has 3", "--nodes 3 or fewer"]),
        (SlurmSettings(partition="gpu"), ["--time 1440", "120 minutes", "--time 120 or less"]),
        (SlurmSettings(partition="cpu"), ["no partition cpu", "debug, gpu, multi", "--partition"]),
    ]:  # fmt: skip
        with pytest.raises(UserError) as e:
            fit(settings, parts)
        sentence = str(e.value)
        assert sentence.endswith(".") and sentence.count(". ") == 0, sentence
        for f in fragments:
            assert f in sentence, (f, sentence)
    with pytest.raises(UserError, match="SLURM has no default partition"):
        fit(SlurmSettings(), parse_sinfo(SINFO.replace("debug*", "debug")))


def test_pending_reasons_that_never_clear_by_themselves_are_said_once_per_job():
    from dist_clm.launch.partition import PendingWatch, never_clears

    for reason in ["PartitionConfig", "PartitionTimeLimit", "PartitionNodeLimit", "PartitionDown", "InvalidAccount",
                   "BadConstraints", "JobHeldUser", "QOSMaxCpuPerJobLimit", "AssocMaxMemPerNode",
                   "QOSMinGRES"]:  # fmt: skip
        assert never_clears(reason), reason
    for reason in ["Resources", "Priority", "Dependency", "BeginTime", "AssocGrpCpuLimit", "QOSMaxJobsPerUserLimit",
                   "ReqNodeNotAvail, UnavailableNodes:dn1", "None", ""]:  # fmt: skip
        assert not never_clears(reason), reason
    said = []
    watch = PendingWatch(say=said.append)
    watch.see({"41": "Priority", "42_[0-3]": "PartitionConfig"})
    watch.see({"41": "PartitionTimeLimit", "42_[0-3]": "PartitionConfig"})
    watch.see({"41": "PartitionTimeLimit"})
    assert len(said) == 2 and all("\n" not in line for line in said)
    assert "job 42_[0-3]" in said[0] and "PartitionConfig" in said[0] and "scancel 42" in said[0]
    assert "job 41" in said[1] and "PartitionTimeLimit" in said[1] and "Ctrl-C" in said[1]


def test_the_wait_for_a_prepare_in_parts_ends_when_a_later_stage_can_never_run(tmp_path, monkeypatch):
    """With --dedup, a failed part leaves the next stage's array waiting for good (DependencyNeverSatisfied)
    while the merge still shows Dependency: the wait cancels both and says why, instead of waiting forever."""
    from dist_clm.errors import UserError
    from dist_clm.launch import prepare_arrays

    asked = []

    def run(cmd, **kwargs):  # (squeue and scancel are recorded, not run)
        asked.append(cmd)
        assert len(asked) < 20, "still waiting"
        out = "11_[0-3]|DependencyNeverSatisfied\n12|Dependency\n" if cmd[0] == "squeue" else ""
        return subprocess.CompletedProcess(cmd, 0, out, "")

    class Merge:
        job_id = "12"

        def done(self):
            return False

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(UserError, match="the merge cannot run: a task of job 10 failed"):
        prepare_arrays.wait(Merge(), ["10", "11"], str(tmp_path / "out"), poll=0)
    assert asked[-1] == ["scancel", "11", "12"]


def test_a_job_the_memory_plan_cannot_fit_is_refused_before_submission(tmp_path):
    """launch slurm plans the run for the job's nodes (--mem-gb, else sinfo's smallest node of the partition) and
    refuses, before submitting, what they cannot hold (the same sentence as train); --no-plan-check (plan_check
    False) submits; GPU jobs are planned against the nodes' host memory (the GPUs' is not known here)."""
    from dist_clm.errors import UserError
    from dist_clm.launch.slurm import SlurmSettings, check_plan, planned_machine, submit

    big = ["model.preset=llama-1b", "model.overrides.vocab_size=32000", f"run.dir={tmp_path / 'run'}"]
    cpu = SlurmSettings(nodes=1, tasks_per_node=2, mem_gb=24)
    machine = planned_machine(cpu)
    assert (machine.world, machine.nodes, machine.host_bytes, machine.on_gpu) == (2, 1, 24 * 10**9, False)
    with pytest.raises(UserError, match="this run needs .* per rank but 22.35 GiB of memory on a node of 2 rank"):
        submit(cpu, None, big, dry_run=True)
    assert "#SBATCH" in submit(cpu, None, big, dry_run=True, plan_check=False)[0]
    check_plan(None, ["model.preset=tiny", "model.overrides.vocab_size=512"], machine)  # (fits: nothing said)
    gpu = planned_machine(SlurmSettings(nodes=1, gpus_per_node=8, mem_gb=200))
    assert gpu.on_gpu and gpu.world == 8
    with pytest.raises(UserError, match="of host memory per node while building"):
        check_plan(None, [*big, "model.preset=llama-8b", "distributed.zero_stage=2"], gpu)
    check_plan(None, [*big, "model.preset=llama-8b", "distributed.zero_stage=3"], gpu)  # (built partitioned)


def test_parallel_groups_that_do_not_fit_the_job_are_refused_before_submission(tmp_path):
    """launch slurm: a tensor-parallel group is consecutive ranks, and ranks fill a node before the next, so a group
    larger than a node's tasks would cross nodes: one sentence before submission (unless asked); sizes that do not
    divide the job's ranks too."""
    from dist_clm.errors import UserError
    from dist_clm.launch.slurm import SlurmSettings, submit

    job = SlurmSettings(nodes=2, tasks_per_node=2)
    base = ["model.preset=tiny-llama", f"run.dir={tmp_path / 'run'}"]
    assert (
        "#SBATCH" in submit(job, None, [*base, "distributed.tensor_parallel_size=2"], dry_run=True, plan_check=False)[0]
    )
    with pytest.raises(UserError, match=r"ranks 0-3 form a tensor-parallel group, but they run on 2 nodes"):
        submit(job, None, [*base, "distributed.tensor_parallel_size=4"], dry_run=True, plan_check=False)
    across = [*base, "distributed.tensor_parallel_size=4", "distributed.tensor_parallel_across_nodes=true"]
    assert "#SBATCH" in submit(job, None, across, dry_run=True, plan_check=False)[0]
    with pytest.raises(UserError, match="'distributed.sequence_parallel_size' is 3, which does not divide the 4"):
        submit(job, None, [*base, "distributed.sequence_parallel_size=3"], dry_run=True, plan_check=False)
