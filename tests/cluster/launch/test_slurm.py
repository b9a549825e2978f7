"""SLURM through submitit, against a real single-node cluster (launchers/local_slurm/start.sh; CI starts it):
a 2-task training job whose ranks both train, and that survives submitit's own preemption signal, a real
partition preemption and an outside `scontrol requeue`, each time resuming from its checkpoint with the step
count continuing and no data repeated; a job array of two override sets; the generated sbatch script; a request
no node can hold refused before anything is submitted; --wait naming a pending reason that never clears."""

import json
import re
import signal
import subprocess

import pytest

from dist_clm.errors import UserError
from dist_clm.launch.slurm import SlurmSettings, submit
from tests.helpers import (
    BIN,
    TINY,
    assert_clean_error,
    logged_steps,
    metrics,
    needs_slurm,
    restarts,
    run_cli,
    running,
    wait_for,
)


def test_dry_run_prints_the_sbatch_script(tmp_path):
    r = run_cli("launch", "slurm", "--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--cpus-per-task", "12",
                "--mem-gb", "400", "--partition", "gpu", "--account", "lm", "--qos", "high", "--constraint", "h100",
                "--time", "600", "--job-name", "llama", "--signal-delay", "180", "--sbatch", "exclusive=user",
                "--sbatch", "requeue=", f"run.dir={tmp_path / 'run'}", "data.path=/data")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    for line in ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12", "--mem=400GB",
                 "--partition=gpu", "--account=lm", "--qos=high", "--constraint=h100", "--time=600",
                 "--job-name=llama", "--signal=USR2@180", "--exclusive=user", "--requeue",
                 f"--output={tmp_path / 'run' / 'slurm'}"]:  # fmt: skip
        assert f"#SBATCH {line}" in r.stdout, line
    assert "#SBATCH --requeue\n" in r.stdout  # (--sbatch requeue=: a flag, with no value)
    assert "srun" in r.stdout and "submitit.core._submit" in r.stdout
    assert "trap 'dist_clm_after_srun $?' EXIT" in r.stdout  # the guard for ranks lost without a word
    assert not (tmp_path / "run").exists()  # nothing written, nothing submitted
    sweep = run_cli("launch", "slurm", "--dry-run", f"run.dir={tmp_path / 'run'}", "--sweep", "optim.lr=1e-3",
                    "--sweep", "optim.lr=3e-4")  # fmt: skip
    assert "#SBATCH --array=0-1" in sweep.stdout


def test_bad_slurm_options_are_one_sentence(tmp_path):
    for args, fragment in [
        (["--gpus-per-node", "8", "--tasks-per-node", "4"], "--tasks-per-node must equal --gpus-per-node"),
        (["--time", "2", "--signal-delay", "300"], "--signal-delay must be more than 0 and below --time"),
        (["--sbatch", "exclusive"], "is not KEY=VALUE"),
        (["train.nope=1"], "config key 'train.nope' is unknown"),
    ]:
        r = run_cli("launch", "slurm", "--dry-run", f"run.dir={tmp_path / 'r'}", *args)
        assert r.returncode == 2 and fragment in r.stderr, (args, r.stderr[-500:])
    with pytest.raises(UserError, match="--nodes must be at least 1"):
        SlurmSettings(nodes=0).check()


def test_a_request_no_node_can_satisfy_is_refused_before_anything_is_submitted(tmp_path):
    """--cpus-per-task 3 on multi, whose nodes have 2 CPUs each: this SLURM fails such a job at once (the merge's
    sbatch refuses it: a traceback), others queue it for good (PartitionConfig)."""
    needs_slurm("multi")
    out, run = tmp_path / "out", tmp_path / "run"
    prepare = run_cli("prepare", str(tmp_path / "corpus.jsonl"), "--tokenizer", str(tmp_path / "tok"), "--out",
                      str(out), "--tasks", "2", "--launch", "slurm", "--partition", "multi", "--cpus-per-task",
                      "3")  # fmt: skip
    launch = run_cli("launch", "slurm", "--partition", "multi", "--cpus-per-task", "3", f"run.dir={run}")
    submitted = re.findall(r"\b(?:arrays|job) ([\d, ]+\d)", prepare.stdout + launch.stdout)
    try:
        for r in (prepare, launch):
            assert_clean_error(r, "3 CPUs per node (--cpus-per-task 3 x 1 task)", "partition multi",
                               "3 nodes of 2 CPUs", "--cpus-per-task 2 or fewer")  # fmt: skip
        assert not out.exists() and not run.exists()  # nothing written, so nothing submitted
    finally:
        for ids in submitted:
            subprocess.run(["scancel", *ids.replace(",", " ").split()], capture_output=True)


def test_wait_says_once_why_a_job_waits_when_the_reason_never_clears_by_itself(tmp_path):
    """A held job (--sbatch hold=) waits until someone releases it: --wait says so in a line and keeps waiting. The
    job asks for no --cpus-per-task: it gets what multi's nodes have (2), not 8, which would never start."""
    needs_slurm("multi")
    log = tmp_path / "launch.txt"
    with log.open("w") as f:
        launcher = subprocess.Popen([str(BIN / "dist-clm"), "launch", "slurm", "--partition", "multi", "--sbatch",
                                     "hold=", "--wait", f"run.dir={tmp_path / 'run'}"], stdout=f, stderr=f)  # fmt: skip
    try:
        said = wait_for(lambda: "JobHeldUser" in log.read_text() and log.read_text(), "the held job's reason", 60)
        job = re.search(r"submitted job (\d+)", said).group(1)
        [line] = [line for line in said.splitlines() if "JobHeldUser" in line]
        assert f"job {job}" in line and f"scontrol release {job}" in line and f"scancel {job}" in line
        assert launcher.poll() is None  # still waiting
        assert "CPUs/Task=2 " in subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    finally:
        launcher.send_signal(signal.SIGINT)
        launcher.wait(30)
        for job in re.findall(r"submitted job (\d+)", log.read_text()):
            subprocess.run(["scancel", job], capture_output=True)


@pytest.mark.slow
def test_two_task_job_trains_and_survives_three_kinds_of_preemption(tmp_path, data_dir):
    needs_slurm()
    run = tmp_path / "run"
    settings = SlurmSettings(tasks_per_node=2, cpus_per_task=1, time_min=60, signal_delay_s=30, max_requeues=5)
    overrides = [*TINY, f"data.path={data_dir}", f"run.dir={run}", "train.max_steps=160", "checkpoint.save_every=10",
                 "checkpoint.keep_last=50", "train.log_every=1", "train.eval_every=0", "train.eval_blocks=2",
                 "stability.fault_injection=1-160:sleep0.05"]  # (paced: each preemption lands mid-run)  # fmt: skip
    [(job, run_dir)] = submit(settings, None, overrides)
    assert run_dir == run and (run / "slurm").is_dir()

    # 1. submitit's own preemption signal (SIGTERM, then USR2): checkpoint, requeue, resume
    wait_for(lambda: len(logged_steps(run)) >= 5, "the first steps")
    job._interrupt()
    wait_for(lambda: restarts(job.job_id) >= 1 and running(job.job_id), "the requeued job", 120)
    # 2. real preemption: a job on the higher-priority partition takes both CPUs
    wait_for(lambda: logged_steps(run)[-1] > logged_steps(run)[0] + 20 if logged_steps(run) else False, "progress")
    urgent = ["sbatch", "-p", "urgent", "-n", "2", "--output", str(tmp_path / "urgent-%j.out"), "--wrap", "sleep 2"]
    subprocess.run(urgent, check=True, capture_output=True)
    wait_for(lambda: restarts(job.job_id) >= 2 and running(job.job_id), "the job back after preemption", 180)
    # 3. an outside requeue: SIGTERM then SIGKILL, no checkpoint call; back from the last periodic checkpoint
    done = sorted((run / "checkpoints").glob("step_*/complete.json"))
    wait_for(lambda: len(sorted((run / "checkpoints").glob("step_*/complete.json"))) > len(done) + 1, "a checkpoint")
    subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    results = job.results()  # one per task

    assert [r["rank"] for r in results] == [0, 1] and all(r["world_size"] == 2 for r in results)
    assert all(r["step"] == 160 and r["preempted"] is None for r in results)
    assert results[0]["restarts"] == 3
    steps = logged_steps(run)
    # each restart continued from a checkpoint: steps after it are logged again from there, none skipped
    # the two signalled stops saved and resumed exactly where they stopped; the outside requeue came back from
    # the last periodic checkpoint and redid the steps after it (the only place where the step count goes back)
    went_back = [(a, b) for a, b in zip(steps, steps[1:], strict=False) if b <= a]
    assert len(went_back) == 1 and set(steps) == set(range(1, 161))
    text = "".join(p.read_text() for p in (run / "slurm").glob("*/*_0_log.out"))
    assert text.count("on signal SIGUSR2; checkpoint saved") == 2 and text.count("requeue of job") == 2
    assert text.count("resumed from") == 3 and f"at step {went_back[0][1] - 1}" in text
    marker = json.loads(sorted((run / "checkpoints").glob("step_*"))[-1].joinpath("complete.json").read_text())
    assert marker["world_size"] == 2
    states = json.loads(sorted((run / "checkpoints").glob("step_*"))[-1].joinpath("train_state.json").read_text())
    assert states["parts"]["data"]["blocks_consumed"] == 160 * 2 * 4  # no block read twice, none skipped


@pytest.mark.slow
def test_a_sweep_through_the_command_is_one_job_array_with_a_run_directory_per_member(tmp_path, data_dir):
    needs_slurm()
    sweep = tmp_path / "sweep"
    r = run_cli("launch", "slurm", "--tasks-per-node", "1", "--cpus-per-task", "1", "--time", "30",
                "--signal-delay", "30", "--sweep", "optim.lr=1e-3", "--sweep", "optim.lr=3e-3 train.seed=7",
                "--wait", *TINY, f"data.path={data_dir}", f"run.dir={sweep}", "train.max_steps=3",
                "train.eval_every=0", "train.log_every=1")  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ids = [line.split()[2].rstrip(":") for line in r.stdout.splitlines() if line.startswith("submitted job")]
    assert len(ids) == 2 and len({i.split("_")[0] for i in ids}) == 1  # one array, two members
    assert r.stdout.count("  logs: ") == 2 and f"tensorboard --logdir {sweep / 'sweep_00' / 'tensorboard'}" in r.stdout
    assert r.stdout.count("finished: {") == 2 and "'step': 3" in r.stdout
    runs = [sweep / "sweep_00", sweep / "sweep_01"]
    lrs = [[row["train/lr"] for row in metrics(d) if "train/lr" in row][-1] for d in runs]
    assert lrs[0] != lrs[1]  # each member trained with its own overrides
