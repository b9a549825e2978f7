"""SLURM through submitit: `dist-clm launch slurm` (and `python launchers/slurm.py`).

The submitting side turns options into submitit's AutoExecutor parameters (one task per GPU, or per CPU
process when there are no GPUs) and submits a `TrainJob`; several override sets go in as one job array.

Inside the job every task runs `TrainJob.__call__`: submitit's environment gives the ranks, the node list
gives the master address (submitit's TorchDistributedEnvironment exports MASTER_ADDR/PORT, RANK,
WORLD_SIZE, LOCAL_RANK), and the same `train()` as under every other launcher runs.

Preemption and time limits: SLURM sends SIGUSR2 (`--signal USR2@signal_delay_s` before the time limit, or at
once on preemption with `preempt_send_user_signal`, or `scancel --signal=USR2`). The training loop, not a
signal handler, reacts: every rank records the signal, the ranks agree at the next step, all of them save
a checkpoint, and only then rank 0 runs `scontrol requeue` (no collective and no I/O inside a handler; a
requeue issued before the save would have SLURM kill the tasks mid-save). The requeued job runs the same
`TrainJob` again and training resumes from that checkpoint. If the signal arrives before
the loop runs (while imports load), submitit's own handler calls `TrainJob.checkpoint()`, which asks for the
same job again, and requeues it: there is no progress to lose yet. SIGTERM is left to submitit, which ignores
it: SLURM sends it just before a kill (scancel, an outside `scontrol requeue`, preemption after its grace
time), and whether the job comes back is SLURM's decision; it then resumes from its last complete checkpoint.

Lost ranks: a rank that finds another one gone (a collective failed or timed out) says which, and asks SLURM to
requeue the job (a dead node: SLURM requeues it itself). A task killed by a signal says nothing: an abort (torch's
NCCL watchdog after a collective timeout, a crash), the out-of-memory killer; srun --kill-on-bad-exit then kills
the others at once, before they can notice. So every task records that it ended on its own (ENDED/<job>.<restart>
.<rank>, whatever the ending: done, an error, a requeue asked for), and the batch script, once srun returns,
runs `after_srun`: srun failed and no task recorded its end, so ranks were lost without a word; it requeues the
job (up to max_requeues), as for any lost rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dist_clm import console
from dist_clm.errors import UserError
from dist_clm.launch.partition import DEFAULT_CPUS_PER_TASK, PendingWatch, fit_to_partition, pending_reasons


@dataclass(kw_only=True)
class SlurmSettings:
    nodes: int = 1
    gpus_per_node: int = 0  # one task per GPU; 0: CPU tasks (tasks_per_node of them)
    tasks_per_node: int = 0  # default: gpus_per_node, or 1 without GPUs
    cpus_per_task: int | None = None  # None: 8, or what a node of the partition has for each task where fewer
    mem_gb: float = 0  # per node (0: the partition's default)
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    time_min: int = 24 * 60  # the time limit
    job_name: str = "dist-clm"
    log_folder: str = ""  # default: RUN/slurm (one file per job and task, %j = job id)
    max_requeues: int = 10  # preemptions / time limits survived by requeueing; then the job stops
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: time for a step and a checkpoint
    sbatch: list[str] = field(default_factory=list)  # extra `#SBATCH --KEY=VALUE` lines, as KEY=VALUE

    def tasks(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    def executor_parameters(self, log_root: Path | None = None) -> dict:
        """submitit AutoExecutor parameters (the `slurm_` ones are SLURM-only); with `log_root`, the batch
        script's guard for tasks lost without a word (after_srun)."""
        extra = {}
        for item in self.sbatch:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UserError(f"--sbatch '{item}' is not KEY=VALUE; write e.g. --sbatch exclusive=user.")
            extra[key.lstrip("-").replace("-", "_")] = value or True  # KEY=: a flag (#SBATCH --KEY)
        params = {
            "nodes": self.nodes,
            "tasks_per_node": self.tasks(),
            "cpus_per_task": self.cpus_per_task or DEFAULT_CPUS_PER_TASK,
            "timeout_min": self.time_min,
            "name": self.job_name,
            "slurm_signal_delay_s": self.signal_delay_s,
            "slurm_additional_parameters": extra,
            # one task that fails ends the step's others at once, instead of leaving them in a collective
            "slurm_srun_args": ["--kill-on-bad-exit=1"],
        }
        if log_root is not None:
            params["slurm_setup"] = guard_lines(log_root, self.max_requeues)
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.mem_gb:
            params["mem_gb"] = self.mem_gb
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self, key):
                params[f"slurm_{key}"] = getattr(self, key)
        return params

    def check(self) -> None:
        problems = [
            (self.nodes >= 1, "--nodes must be at least 1"),
            (self.gpus_per_node >= 0 and self.tasks_per_node >= 0, "--gpus-per-node and --tasks-per-node must be >= 0"),
            (
                not (self.gpus_per_node and self.tasks_per_node and self.tasks_per_node != self.gpus_per_node),
                "--tasks-per-node must equal --gpus-per-node (one task per GPU); leave it out",
            ),
            (self.cpus_per_task is None or self.cpus_per_task >= 1, "--cpus-per-task must be at least 1"),
            (self.time_min >= 1, "--time must be at least 1 minute"),
            (self.max_requeues >= 0, "--max-requeues must be 0 or more"),
            (0 < self.signal_delay_s < self.time_min * 60, "--signal-delay must be more than 0 and below --time"),
        ]
        for ok, message in problems:
            if not ok:
                raise UserError(message + ".")


class TrainJob:
    """What each SLURM task runs: `dist-clm train` with these arguments, as rank `global_rank` of the job."""

    def __init__(self, config: str | None, overrides: list[str], max_requeues: int, log_root: str = ""):
        self.config, self.overrides, self.max_requeues = config, list(overrides), max_requeues
        self.log_root = log_root  # where ENDED lives (the submission's log folder)

    def __call__(self) -> dict:
        try:
            return self._run()
        finally:  # (not reached when a signal kills the task: after_srun tells those endings by this)
            if self.log_root:
                ended_marker(Path(self.log_root), os.environ.get("SLURM_JOB_ID", "0"), _restarts(),
                             os.environ.get("SLURM_PROCID", "0")).touch()  # fmt: skip

    def _run(self) -> dict:
        import submitit

        from dist_clm.config import load_config
        from dist_clm.errors import PeerLost
        from dist_clm.parallel.process_group import lean_imports

        lean_imports()
        from dist_clm.training.loop import train

        job = submitit.JobEnvironment()
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(job.num_tasks // max(1, job.num_nodes)))
        # SIGTERM stays with submitit (ignored): under SLURM it comes right before a kill (scancel, requeue,
        # preemption), and the job comes back, or not, by SLURM's decision, from its last checkpoint
        restarts = _restarts()
        try:
            trained = train(load_config(self.config, self.overrides), stop_signals=(signal.SIGUSR1, signal.SIGUSR2))
        except PeerLost as e:  # another rank or node is gone: the job comes back on the nodes SLURM gives it
            console.error(e)
            down = _unresponsive_nodes()
            if down:  # SLURM requeues the job itself (NODE_FAIL), without that node
                console.warning(f"node {', '.join(down)} stopped responding; SLURM requeues the job")
            else:  # a process died or stalled on a healthy node: ask for the requeue ourselves
                self._requeue(job, restarts, "lost a rank", every_rank=True)
            raise SystemExit(e.exit_code) from None
        except UserError as e:  # one sentence in the task's log, as on the command line (no traceback)
            console.error(e)
            raise SystemExit(e.exit_code) from None
        result = dataclasses.asdict(trained) | {
            "slurm_job_id": job.job_id,
            "rank": job.global_rank,
            "world_size": job.num_tasks,
            "restarts": restarts,
        }
        if result.get("preempted") and self._requeue(job, restarts, "was preempted"):
            from dist_clm.parallel.collectives import barrier

            barrier()
            raise SystemExit(0)  # no result: the requeued job writes the final one
        return result

    def _requeue(self, job, restarts: int, why: str, every_rank: bool = False) -> bool:
        """Ask SLURM to run the job again (rank 0, or each surviving rank when ranks were lost: the first one
        it hears from wins), unless max_requeues is used up; whether it was asked."""
        if restarts >= self.max_requeues:
            console.warning(f"job {job.job_id} {why} after {restarts} requeues (max_requeues); it stops here: submit "
                            "it again to continue from its last complete checkpoint.")  # fmt: skip
            return False
        if job.global_rank == 0 or every_rank:
            r = subprocess.run(["scontrol", "requeue", str(job.job_id)], capture_output=True, text=True)
            # preemption by another partition requeues the job itself: then SLURM refuses a second one
            answer = r.stdout.strip() or r.stderr.strip() or "ok"
            console.info(f"requeue of job {job.job_id}: {answer}", every_rank=True)
        return True

    def checkpoint(self):
        """submitit's USR2 handler, before the training loop took the signal over: run the same job again."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.overrides, self.max_requeues,
                                                           self.log_root))  # fmt: skip


def _restarts() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0"))


ENDED = "ended"  # under the log folder: one empty file per task that ended on its own


def ended_marker(log_root: Path, job: str, restart: int, rank: str) -> Path:
    folder = log_root / ENDED
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{job}.{restart}.{rank}"


def guard_lines(log_root: Path, max_requeues: int) -> list[str]:
    """Lines for the batch script, before its srun: when srun returns, run after_srun (a TERM to the script
    means SLURM ends or requeues the job itself: then nothing)."""
    import shlex

    call = (f'{shlex.quote(sys.executable)} -m dist_clm.launch.slurm after-srun "$1" "$dist_clm_signalled" '
            f"{shlex.quote(str(log_root))} {max_requeues}")  # fmt: skip
    return ["dist_clm_signalled=0", f"dist_clm_after_srun() {{ {call}; }}",
            "trap 'dist_clm_signalled=1; exit 143' TERM", "trap 'dist_clm_after_srun $?' EXIT"]  # fmt: skip


def after_srun(status: int, signalled: bool, log_root: Path, max_requeues: int) -> str:
    """In the batch script once srun returned with `status`: requeue the job when srun failed and none of its
    tasks recorded its end (ranks killed by a signal, see the module docstring); what was decided, in a word."""
    if signalled or status == 0:
        return "nothing to do"
    job, restart = os.environ.get("SLURM_JOB_ID", "0"), _restarts()
    if any((log_root / ENDED).glob(f"{job}.{restart}.*")):
        return "a task said why it ended"
    what = f"job {job}: srun ended with status {status} and no task said why: a rank was killed by a signal"
    what += " (an abort after a collective timeout, the out-of-memory killer, a crash)"
    if restart >= max_requeues:
        console.warning(f"{what}; it stops here after {restart} requeues (max_requeues): submit it again to "
                        "continue from its last complete checkpoint.")  # fmt: skip
        return "max requeues"
    # said before the requeue: it ends this script (and this process) at once
    console.warning(f"{what}; requeueing it to resume from its last complete checkpoint")
    r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    console.warning(f"scontrol requeue {job}: {r.stdout.strip() or r.stderr.strip() or 'ok'}")
    return "requeued"


def _unresponsive_nodes() -> list[str]:
    """The job's nodes SLURM finds not responding, waiting as long as SLURM takes to decide (SlurmdTimeout,
    and a margin): requeueing before it has would restart the job on the node that died."""
    import time

    nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ.get("SLURM_JOB_NODELIST", "")],
                           capture_output=True, text=True).stdout.split()  # fmt: skip
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    timeout = next((int(line.split("=")[1].split()[0]) for line in config.splitlines()
                    if line.startswith("SlurmdTimeout")), 300)  # fmt: skip
    deadline = time.monotonic() + min(timeout + 15, 600)
    while nodes and time.monotonic() < deadline:
        r = subprocess.run(["sinfo", "-h", "-N", "-n", ",".join(nodes), "-o", "%N %T"], capture_output=True, text=True)
        down = sorted({n for n, state in (line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)
                       if state.endswith("*") or state.startswith(("down", "fail"))})  # fmt: skip
        if down:
            return down
        time.sleep(1)
    return []


def make_executor(settings: SlurmSettings, folder: Path):
    """submitit's executor for `folder` (RUN/slurm/%j: the log root is its parent)."""
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder))
    executor.update_parameters(**settings.executor_parameters(folder.parent))
    return executor


def configured_run_dir(config: str | None, overrides: list[str]) -> Path:
    from dist_clm.config import load_config

    return Path(load_config(config, overrides).run.dir)


def submit(
    settings: SlurmSettings,
    config: str | None,
    overrides: list[str],
    sweep: list[list[str]] | None = None,
    dry_run: bool = False,
    plan_check: bool = True,
) -> list:
    """Submit one training run, or one per override set in `sweep` (a job array; each set is added to
    `overrides` and gets its own run directory: RUN/sweep_NN unless the set names run.dir)."""
    settings.check()
    runs = [_sweep_overrides(config, overrides, extra, i) for i, extra in enumerate(sweep)] if sweep else [overrides]
    dirs = [configured_run_dir(config, o) for o in runs]  # also checks every config before anything is submitted
    for o in runs:
        check_layout(config, o, settings)
    if plan_check:
        machine = planned_machine(settings)
        for o in runs:
            check_plan(config, o, machine)
    folder = Path(settings.log_folder) if settings.log_folder else dirs[0] / "slurm"
    if dry_run:
        return [_sbatch_script(settings, folder / "%j", len(runs))]
    settings = fit_to_partition(settings)
    folder.mkdir(parents=True, exist_ok=True)
    executor = make_executor(settings, folder / "%j")
    jobs = []
    with executor.batch() if len(runs) > 1 else contextlib.nullcontext():
        for o in runs:
            jobs.append(executor.submit(TrainJob(config, o, settings.max_requeues, str(folder))))
    return list(zip(jobs, dirs, strict=True))


def planned_machine(settings: SlurmSettings):
    """The job's ranks and each node's memory (--mem-gb, else the smallest node of the partition as sinfo tells),
    for the memory plan; GPU jobs: the GPUs' memory is not known here, so only the host's memory is planned
    against. None when the node's memory is not known."""
    from dist_clm.launch.partition import partitions
    from dist_clm.parallel.memory_plan import Machine

    host = int(settings.mem_gb * 1e9)
    if not host:
        known = partitions() or {}
        names = [n for n in settings.partition.split(",") if n] or [p.name for p in known.values() if p.default]
        nodes = [node for name in names if name in known for node in known[name].nodes if node.mem_mb]
        host = min((node.mem_mb for node in nodes), default=0) * 2**20
    if not host:
        return None
    world = settings.nodes * settings.tasks()
    return Machine(world, settings.nodes, 0, host, on_gpu=bool(settings.gpus_per_node))


def check_layout(config: str | None, overrides: list[str], settings: SlurmSettings) -> None:
    """One sentence, before anything is submitted, when the run's parallel groups do not fit the job's ranks: the
    sizes must divide them, and each tensor-parallel group must lie on one node (tasks are ranks node by node)."""
    from dist_clm.config import load_config
    from dist_clm.parallel.fit import check_layout

    check_layout(load_config(config, overrides).distributed, settings.nodes * settings.tasks(), settings.tasks())


def check_plan(config: str | None, overrides: list[str], machine) -> None:
    """One sentence when the memory plan says the job's nodes cannot hold the run (training/preflight.py)."""
    if machine is None:
        return
    from dist_clm.config import load_config
    from dist_clm.models.build import model_shape
    from dist_clm.parallel.memory_plan import FAMILY_DEFAULTS
    from dist_clm.training.preflight import check_memory, data_vocab

    cfg = load_config(config, overrides)
    shape = model_shape(cfg.model.preset, cfg.model.pretrained, cfg.model.overrides)
    if shape is not None and shape.model_type in FAMILY_DEFAULTS:
        check_memory(cfg, machine, data_vocab(cfg))


def _sweep_overrides(config: str | None, base: list[str], extra: list[str], i: int) -> list[str]:
    if any(o.startswith("run.dir=") for o in extra):
        return [*base, *extra]
    return [*base, *extra, f"run.dir={configured_run_dir(config, base) / f'sweep_{i:02d}'}"]


def _sbatch_script(settings: SlurmSettings, folder: Path, array: int) -> str:
    """The sbatch script submitit would submit, from its own template; nothing is written or submitted, and
    no SLURM is needed."""
    import shlex

    from submitit.slurm import slurm

    renamed = {"tasks_per_node": "ntasks_per_node", "timeout_min": "time", "name": "job_name"}
    params = {}
    for key, value in settings.executor_parameters(folder.parent).items():
        if key.startswith("slurm_"):
            key = key[len("slurm_") :]
        if key == "mem_gb":
            key, value = "mem", f"{int(value)}GB"
        params[renamed.get(key, key)] = value
    if array > 1:
        params["map_count"] = array
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return slurm._make_sbatch_string(command=command, folder=folder, **params)  # (private: submitit's template)


def launch_cli(a) -> None:
    """`dist-clm launch slurm ...`: submit, print where things are, and optionally wait for the result."""
    settings = SlurmSettings(
        nodes=a.nodes,
        gpus_per_node=a.gpus_per_node,
        tasks_per_node=a.tasks_per_node,
        cpus_per_task=a.cpus_per_task,
        mem_gb=a.mem_gb,
        partition=a.partition or "",
        account=a.account or "",
        qos=a.qos or "",
        constraint=a.constraint or "",
        time_min=a.time,
        job_name=a.job_name,
        log_folder=a.log_folder or "",
        max_requeues=a.max_requeues,
        signal_delay_s=a.signal_delay,
        sbatch=a.sbatch or [],
    )
    from dist_clm.config import env_overrides

    sweep = [s.split() for s in a.sweep] if a.sweep else None
    out = submit(settings, a.config, [*a.overrides, *env_overrides()], sweep, a.dry_run,  # (the job's own record)
                 plan_check=not a.no_plan_check)  # fmt: skip
    if a.dry_run:
        print(out[0])
        return
    for job, run_dir in out:
        print(f"submitted job {job.job_id}: run {run_dir}")
        print(f"  logs: {job.paths.stdout} / {job.paths.stderr} (task 0)")
        print(f"  tensorboard --logdir {run_dir / 'tensorboard'}")
    if a.wait:
        jobs, watch = [job for job, _ in out], PendingWatch()
        while not all(job.done() for job in jobs):
            watch.see(pending_reasons([job.job_id for job in jobs]))
            time.sleep(2)
        for job in jobs:
            print(f"job {job.job_id} finished: {job.results()[0]}")


if (
    __name__ == "__main__"
):  # the batch script's guard: python -m dist_clm.launch.slurm after-srun STATUS SIGNALLED ROOT MAX
    _, what, status, signalled, root, most = sys.argv
    assert what == "after-srun", what
    after_srun(int(status), signalled == "1", Path(root), int(most))
