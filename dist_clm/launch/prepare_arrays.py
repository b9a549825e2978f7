"""`dist-clm prepare ... --launch slurm --tasks N`: a prepare in parts (data/parts.py) as SLURM job arrays
through submitit: one array of N tasks per stage (tokenize; with --dedup: hash, dedup, tokenize), each array
depending on the one before (afterok), then the merge as one job depending on the last array.

An array task runs `prepare_part` for its index; the part's marker makes a rerun skip it. A task killed by a
signal (kill -9, the out-of-memory killer) says nothing: the batch script's guard (slurm.after_srun, as for
training) finds that the task did not record its end and requeues that array task alone; preemption and time
limits come to submitit's handler, which requeues it too (`checkpoint`). A task that fails with a sentence
(bad input) is not requeued: its part stays incomplete, the merge never starts, and `--wait` says which part
failed and why; the same command, run again, skips the complete parts.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from dist_clm import console
from dist_clm.errors import UserError
from dist_clm.launch.partition import PendingWatch, fit_to_partition, pending_reasons
from dist_clm.launch.slurm import SlurmSettings, _restarts, ended_marker, make_executor
from dist_clm.parallel.process_group import lean_imports


@dataclass
class PartTask:
    """One array task: stage `stage` of part `index` (submitit calls it with the index)."""

    prepare: dict  # prepare_part's arguments but the index
    log_root: str

    def __call__(self, index: int) -> dict:
        lean_imports()
        from dist_clm.data.prepare import prepare_part

        return _said(lambda: prepare_part(**self.prepare, index=index), self.log_root)

    def checkpoint(self, index: int):
        """Preemption or the time limit (submitit's handler): the same task again; the part restarts."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, index)


@dataclass
class MergeTask:
    out: str
    log_root: str

    def __call__(self) -> dict:
        from dist_clm.data.merge import merge

        return _said(lambda: merge(self.out), self.log_root)


def _said(work, log_root: str):
    """Run `work`; a UserError is one sentence in the task's log (no traceback), and the task records that it
    ended on its own, whatever the ending (the batch script's guard requeues a task that did not)."""
    try:
        return work()
    except UserError as e:
        console.error(e)
        raise SystemExit(e.exit_code) from None
    finally:  # (not reached when a signal kills the task)
        job = os.environ.get("SLURM_JOB_ID", "0")
        ended_marker(Path(log_root), job, _restarts(), os.environ.get("SLURM_PROCID", "0")).touch()


def submit(settings: SlurmSettings, prepare: dict, tasks: int, folder: Path) -> tuple[list[str], object]:
    """Submit every stage's array and the merge; (the arrays' job ids, the merge's submitit job)."""
    settings.check()
    settings = fit_to_partition(settings)
    folder.mkdir(parents=True, exist_ok=True)
    executor = make_executor(settings, folder / "%j")
    extra = settings.executor_parameters()["slurm_additional_parameters"]
    stages = ["hash", "dedup", "tokenize"] if prepare["options"].get("dedup") else ["tokenize"]
    arrays: list[str] = []
    for stage in stages:
        dependency = {"dependency": f"afterok:{arrays[-1]}"} if arrays else {}
        executor.update_parameters(slurm_additional_parameters=extra | dependency, name=f"{settings.job_name}-{stage}")
        task = PartTask({**_flat(prepare), "tasks": tasks, "stage": stage}, str(folder))
        jobs = executor.map_array(task, range(tasks))
        arrays.append(jobs[0].job_id.split("_")[0])
    executor.update_parameters(slurm_additional_parameters=extra | {"dependency": f"afterok:{arrays[-1]}"},
                               name=f"{settings.job_name}-merge")  # fmt: skip
    merge_job = executor.submit(MergeTask(str(prepare["out"]), str(folder)))
    return arrays, merge_job


def _flat(prepare: dict) -> dict:
    return {k: v for k, v in prepare.items() if k != "options"} | prepare["options"]


def wait(merge_job, arrays: list[str], out: str, poll: float = 2.0) -> dict:
    """The merged manifest once the merge job ends; one sentence (UserError) when a part failed for good, so the
    merge will never run (its dependency, or a later stage's, cannot be met): those jobs are cancelled. A job
    that waits for a reason that never clears by itself is said once (PendingWatch)."""
    watch = PendingWatch()
    while True:
        if merge_job.done():
            try:
                return merge_job.result()
            except Exception:  # noqa: BLE001 (submitit's Failed/UncompletedJobError: the merge's own words below)
                pass
            said = [line for line in (merge_job.stderr() or "").splitlines() if line.startswith("dist-clm: error:")]
            raise UserError(said[-1].removeprefix("dist-clm: error:").strip() if said else
                            f"the merge, job {merge_job.job_id}, ended {merge_job.state}; its log: "
                            f"{merge_job.paths.stderr}.")  # fmt: skip
        reasons = pending_reasons([*arrays, merge_job.job_id])
        never = [job.split("_")[0] for job, reason in reasons.items() if reason == "DependencyNeverSatisfied"]
        if never:
            subprocess.run(["scancel", *dict.fromkeys([*never, merge_job.job_id])], capture_output=True)
            raise UserError(f"the merge cannot run: {_failed_parts(out, arrays)}; fix what it says and run the same "
                            "command again (complete parts are skipped).")  # fmt: skip
        watch.see(reasons)
        time.sleep(poll)


def _failed_parts(out: str, arrays: list[str]) -> str:
    from dist_clm.data.parts import status
    from dist_clm.data.store import store

    try:
        _, tasks, _ = status(store(out))
    except UserError:
        return f"a task of job {arrays[0]} failed before it started its part"
    bad = [t for t in tasks if t.state in ("failed", "stopped")]
    if not bad:
        return f"a task of the arrays {', '.join(arrays)} failed (see their logs)"
    first = bad[0]
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return f"part {first.index} failed in its {first.stage} stage{more}: {first.detail}"
