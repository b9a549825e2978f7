"""What a SLURM partition can give, asked of `sinfo` before anything is submitted, and the pending reasons that
never clear by themselves, said while `--wait` waits.

A request that no node of the partition can ever satisfy (more CPUs, memory or GPUs per node than any node has,
more nodes than the partition holds or lets one job have, a time limit above the partition's, a partition SLURM
does not know) is one sentence before submission: SLURM would otherwise fail the job at once, reject it with
sbatch's words, or, depending on its configuration, queue it for good (reason PartitionConfig). Without
`sinfo`, or when it fails, nothing is checked here and sbatch has the last word. `--cpus-per-task` left out
asks for 8, or for what a node of the partition has for each task where that is fewer.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dist_clm import console
from dist_clm.errors import UserError

if TYPE_CHECKING:
    from dist_clm.launch.slurm import SlurmSettings

DEFAULT_CPUS_PER_TASK = 8
# one line per node and partition: the partition (a * marks the default), the node, its CPUs, its memory in
# MB, its GRES, the partition's time limit and its job size in nodes (min-max)
SINFO_FORMAT = "%P|%N|%c|%m|%G|%l|%s"


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    mem_mb: int
    gpus: int | None  # None: a GRES this does not read (then GPUs are not checked on that node)


@dataclass
class Partition:
    name: str
    default: bool = False
    max_nodes: int | None = None  # nodes one job may have (None: no limit)
    max_time_min: int | None = None  # (None: no limit)
    nodes: list[Node] = field(default_factory=list)


def parse_sinfo(text: str) -> dict[str, Partition]:
    """`sinfo -h -a -N -o SINFO_FORMAT`'s output -> the partitions by name."""
    parts: dict[str, Partition] = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 7:
            continue
        name, node, cpus, mem, gres, limit, size = fields
        p = parts.setdefault(name.rstrip("*"), Partition(name.rstrip("*"), name.endswith("*"), _size_max(size),
                                                         _minutes(limit)))  # fmt: skip
        if node not in ("", "n/a") and _number(cpus):
            p.nodes.append(Node(node, _number(cpus), _number(mem), _gpus(gres)))
    return parts


def _number(text: str) -> int:
    m = re.match(r"\d+", text)  # (sinfo adds a + where a figure varies)
    return int(m.group()) if m else 0


def _gpus(gres: str) -> int | None:
    """gpu:h100:8(S:0-1),mps:100 -> 8; (null) -> 0."""
    total = 0
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):
        fields = item.split(":")
        if fields[0] == "gpu":
            if not fields[-1].isdigit():
                return None
            total += int(fields[-1])
    return total


def _minutes(limit: str) -> int | None:
    """A SLURM time (D-H:M:S, H:M:S, M:S, M; D-H, D-H:M) -> whole minutes; infinite -> None."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", limit)
    if not m:
        return None
    days, *rest = m.groups()
    nums = [int(x) for x in rest if x is not None]
    if days is not None:
        h, mi, s = (nums + [0, 0])[:3]
    elif len(nums) == 3:
        h, mi, s = nums
    else:  # M:S or M
        h, mi, s = 0, nums[0], (nums + [0])[1]
    return (int(days or 0) * 86400 + h * 3600 + mi * 60 + s) // 60


def _size_max(size: str) -> int | None:
    """The partition's job size in nodes, 1-infinite or 1-4 or 2 -> its maximum (None: no limit)."""
    top = size.rsplit("-", 1)[-1]
    return int(top) if top.isdigit() else None


def fit(settings: SlurmSettings, partitions: dict[str, Partition]) -> int:
    """The --cpus-per-task to submit with (the one asked for, or the default); one sentence naming the request,
    what the partition's nodes have and the flag to change when no partition it names could ever run it."""
    known = ", ".join(sorted(partitions))
    names = [n for n in settings.partition.split(",") if n] or [p.name for p in partitions.values() if p.default]
    if not names:
        raise UserError(f"SLURM has no default partition: name one with --partition (its partitions: {known}).")
    problems = []
    for name in names:  # (several: SLURM runs the job on the first that can)
        p = partitions.get(name)
        if p is None:
            problems.append(f"SLURM has no partition {name} (its partitions: {known}): name one with --partition")
            continue
        cpus = settings.cpus_per_task or _default_cpus(settings, p)
        problem = _problem(settings, cpus, p)
        if problem is None:
            return cpus
        problems.append(problem)
    raise UserError(problems[0] + ".")


def _fits(settings: SlurmSettings, node: Node, cpus: int | None) -> bool:
    """Whether `node` gives one node's share of the job (cpus None: whatever its CPUs)."""
    return ((cpus is None or cpus * settings.tasks() <= node.cpus) and settings.mem_gb * 1024 <= node.mem_mb
            and (node.gpus is None or settings.gpus_per_node <= node.gpus))  # fmt: skip


def _default_cpus(settings: SlurmSettings, p: Partition) -> int:
    """8 CPUs per task, or fewer where the job's nodes (the biggest that fit it otherwise) have fewer."""
    cpus = sorted((n.cpus for n in p.nodes if _fits(settings, n, None)), reverse=True)
    if len(cpus) < settings.nodes:  # (_problem says why: then about anything but the CPUs, where it can)
        cpus = sorted((n.cpus for n in p.nodes), reverse=True)
    return max(1, min(DEFAULT_CPUS_PER_TASK, cpus[min(settings.nodes, len(cpus)) - 1] // settings.tasks()))


def _problem(settings: SlurmSettings, cpus: int, p: Partition) -> str | None:
    """Why no `settings.nodes` nodes of `p` can ever run the job, with the flag to change; None: some can."""
    tasks, where = settings.tasks(), f"partition {p.name}"
    if not p.nodes:
        return f"{where} has no nodes: name another with --partition"
    if p.max_time_min is not None and settings.time_min > p.max_time_min:
        return (f"--time {settings.time_min} is above the time limit of {where}, {p.max_time_min} minutes: ask "
                f"for --time {p.max_time_min} or less, or another --partition")  # fmt: skip
    if p.max_nodes is not None and settings.nodes > p.max_nodes:
        return (f"the job asks for {settings.nodes} nodes and {where} allows at most {p.max_nodes} nodes a job: "
                f"ask for --nodes {p.max_nodes} or fewer, or another --partition")  # fmt: skip
    if settings.nodes > len(p.nodes):
        return (f"the job asks for {settings.nodes} nodes and {where} has {len(p.nodes)}: ask for --nodes "
                f"{len(p.nodes)} or fewer, or another --partition")  # fmt: skip
    have = f"{where}'s nodes have at most {{}} ({_shapes(p.nodes)})"
    gpus = [n.gpus for n in p.nodes if n.gpus is not None]
    if settings.gpus_per_node and len(gpus) == len(p.nodes) and settings.gpus_per_node > max(gpus):
        if not max(gpus):
            return (f"the job asks for {console.count(settings.gpus_per_node, 'GPU')} per node (--gpus-per-node) and "
                    f"{where}'s nodes have none ({_shapes(p.nodes)}): name a --partition with GPUs, or leave "
                    "--gpus-per-node out (CPU tasks)")  # fmt: skip
        return (f"the job asks for {console.count(settings.gpus_per_node, 'GPU')} per node (--gpus-per-node) and "
                f"{have.format(console.count(max(gpus), 'GPU'))}: ask for --gpus-per-node {max(gpus)} or fewer, or "
                "another --partition")  # fmt: skip
    most = max(n.cpus for n in p.nodes)
    if cpus * tasks > most:
        flag = "--tasks-per-node" if settings.tasks_per_node else "--gpus-per-node"
        fix = f"{flag} {most} or fewer" if tasks > most else f"--cpus-per-task {most // tasks} or fewer"
        return (f"the job asks for {cpus * tasks} CPUs per node (--cpus-per-task {cpus} x "
                f"{console.count(tasks, 'task')}) and {have.format(most)}: ask for {fix}, or another "
                "--partition")  # fmt: skip
    memory = max(n.mem_mb for n in p.nodes)
    if settings.mem_gb * 1024 > memory:
        return (f"the job asks for {settings.mem_gb:g} GB of memory per node (--mem-gb) and "
                f"{have.format(f'{memory} MB')}: ask for --mem-gb {memory // 1024} or less, or another "
                "--partition")  # fmt: skip
    fitting = sum(_fits(settings, n, cpus) for n in p.nodes)
    if fitting < settings.nodes:
        each = [f"{cpus * tasks} CPUs"]
        each += [f"{settings.mem_gb:g} GB"] if settings.mem_gb else []
        each += [f"{settings.gpus_per_node} GPUs"] if settings.gpus_per_node else []
        return (f"the job asks for {settings.nodes} nodes with {', '.join(each)} each and {where} has only "
                f"{fitting} of them ({_shapes(p.nodes)}): ask for --nodes {fitting} or fewer, or for less per "
                "node")  # fmt: skip
    return None


def _shapes(nodes: list[Node], most: int = 4) -> str:
    """3 nodes of 2 CPUs, 5423 MB; 1 node of 64 CPUs, 515000 MB, 8 GPUs"""
    kinds: dict[tuple, int] = {}
    for n in nodes:
        kinds[(n.cpus, n.mem_mb, n.gpus)] = kinds.get((n.cpus, n.mem_mb, n.gpus), 0) + 1
    said = [f"{console.count(k, 'node')} of {cpus} CPUs, {mem} MB" + (f", {gpus} GPUs" if gpus else "")
            for (cpus, mem, gpus), k in list(kinds.items())[:most]]  # fmt: skip
    return "; ".join(said + ([f"{len(kinds) - most} more kinds"] if len(kinds) > most else []))


def partitions() -> dict[str, Partition] | None:
    """What sinfo says of every partition, hidden ones too; None without sinfo or when it fails."""
    if shutil.which("sinfo") is None:
        return None
    try:
        r = subprocess.run(["sinfo", "-h", "-a", "-N", "-o", SINFO_FORMAT], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        r = subprocess.CompletedProcess([], 1, "", str(e))
    if r.returncode != 0 or not r.stdout.strip():
        said = (r.stderr.strip().splitlines() or ["no partitions"])[-1]
        console.warning(f"sinfo failed ({said}); submitting without checking what the partition's nodes have")
        return None
    return parse_sinfo(r.stdout)


def fit_to_partition(settings: SlurmSettings) -> SlurmSettings:
    """`settings` with --cpus-per-task settled; a UserError when the partition could never run the job."""
    found = partitions()
    cpus = fit(settings, found) if found else settings.cpus_per_task or DEFAULT_CPUS_PER_TASK
    if settings.cpus_per_task is None and cpus < DEFAULT_CPUS_PER_TASK:
        tasks = settings.tasks()
        share = "what a node of the partition has" + ("" if tasks == 1 else f" for each of its {tasks} tasks")
        console.info(f"--cpus-per-task {cpus}: {share} (left out, it asks for {DEFAULT_CPUS_PER_TASK} where nodes "
                     "have as many)")  # fmt: skip
    return dataclasses.replace(settings, cpus_per_task=cpus)


# pending reasons that only a changed request or an administrator clears: the job cannot start as it is
NEVER_CLEARS = {
    "PartitionConfig": "the request does not fit the partition's nodes or limits",
    "PartitionNodeLimit": "its node count is outside the partition's limits, or the nodes it needs are down",
    "PartitionTimeLimit": "its time limit is above the partition's",
    "PartitionDown": "the partition is down",
    "PartitionInactive": "the partition is inactive",
    "BadConstraints": "no node has the features it asks for",
    "InvalidAccount": "its account is invalid",
    "InvalidQOS": "its QOS is invalid",
    "AccountNotAllowed": "its account may not use the partition",
    "QOSNotAllowed": "its QOS may not be used on the partition",
    "JobHeldUser": "it is held",
    "JobHeldAdmin": "an administrator holds it",
    "JobHoldMaxRequeue": "it was requeued too often and is held",
    "DependencyNeverSatisfied": "a job it depends on did not end as it needs",
    "ReservationDeleted": "its reservation was deleted",
    "MaxMemPerLimit": "it asks for more memory per CPU or node than allowed",
}
# the job alone goes over a per-job or per-node maximum of its association or QOS, or under a QOS minimum (the
# Grp*, PerUser and PerAccount limits clear as other jobs end)
_OVER_A_LIMIT = re.compile(r"^(Assoc|QOS)Max\w*Per(Job|Node)|^QOSMin")


def never_clears(reason: str) -> bool:
    return reason in NEVER_CLEARS or bool(_OVER_A_LIMIT.match(reason))


def pending_reasons(jobs: list[str]) -> dict[str, str]:
    """The pending ones of `jobs` (ids; an array's pending tasks are one entry, 42_[0-3]) -> SLURM's reason."""
    try:
        r = subprocess.run(["squeue", "-h", "-t", "PD", "-j", ",".join(jobs), "-o", "%i|%r"], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(line.split("|", 1) for line in r.stdout.splitlines() if "|" in line)


class PendingWatch:
    """Says, once per job and reason, that a job waits for a reason that never clears by itself.

    Waiting goes on after the line: SLURM looks at a pending job again whenever its partition, its limits or
    the job itself change (an administrator's fix, `scontrol update job`, `scontrol release`), and the job
    then starts with nothing submitted again; leaving would give up on a job that can still run, cancelling
    it would throw away the queue position. The line says how to change, release or cancel it, and that
    Ctrl-C stops the wait alone."""

    def __init__(self, say=console.warning):
        self.say, self.said = say, set()

    def see(self, reasons: dict[str, str]) -> None:
        for job, reason in reasons.items():
            if never_clears(reason) and (job, reason) not in self.said:
                self.said.add((job, reason))
                self.say(pending_line(job, reason))


def pending_line(job: str, reason: str) -> str:
    base = re.match(r"\d+", job).group() if re.match(r"\d+", job) else job  # (an array: all its tasks)
    why = NEVER_CLEARS.get(reason, "the job alone is over a limit of its account or QOS")
    if reason == "JobHeldUser":
        fix = f"`scontrol release {base}` lets it start, `scancel {base}` cancels it"
    else:
        fix = f"an administrator or `scontrol update job {base}` must change it, or `scancel {base}` cancels it"
    return (f"job {job} cannot start as it is: SLURM's reason {reason} ({why}) does not clear by itself; {fix}; "
            "still waiting (Ctrl-C stops the wait, the job stays queued)")  # fmt: skip
