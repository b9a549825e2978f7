"""Who am I, and bringing up the process group: the deepspeed launcher, torchrun, srun, or a plain process.

The deepspeed launcher (local or pdsh), torchrun and submitit export RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT. A task that `srun` started directly (also the deepspeed launcher's
`--launcher slurm`, which is srun) has SLURM's variables only: they are translated (ranks from
SLURM_PROCID/SLURM_LOCALID, the master from the step's first node, a port from the job and step ids). A
plain `python`/`dist-clm` process has none of them; DeepSpeed would then try MPI discovery (and fail without
mpi4py), so we declare a world of one on a free local port first.

Once up, every rank's identity (node, local rank, local world size) is gathered and checked (`world_table`):
a launcher that gave two ranks the same local rank on a node, or a local world size that is not the node's
rank count, is one sentence instead of two processes fighting over one GPU. The table is written to
RUN/ranks.json.

Timeouts: set-up, checkpoint saves and loads wait up to SETUP_TIMEOUT_S in a collective (a universal
checkpoint conversion or a large save can take minutes on one rank); training collectives wait
`distributed.collective_timeout_s` from the second step on (`set_collective_timeout`). A rank that dies makes its
peers' next collective fail at once; one that stalls makes it time out; either way every surviving rank ends
(see train.py) instead of waiting forever. Each rank keeps a counter moving in the process group's store
(`Heartbeat`), so the survivors can name the rank that stopped.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from dist_clm import console
from dist_clm.errors import UserError

SETUP_TIMEOUT_S = 1800.0  # collectives of set-up, resume and checkpointing (torch's gloo default)


def use_cpu_accelerator_if_no_gpu() -> None:
    """DeepSpeed picks its accelerator at import; without a GPU tell it to use the CPU one (gloo)."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: str  # "cuda:N" or "cpu"
    node: str = ""  # this rank's node: SLURM's node name, else the host name (+ torchrun's node rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_deepspeed():
    """deepspeed, imported without its autotuner's optional MLflow support: DeepSpeed's autotuner imports mlflow
    wherever it is installed (dist_clm's trackers extra), a second of start-up in every process for a feature
    dist_clm does not use. mlflow stays importable afterwards (the mlflow tracker imports it itself)."""
    import sys

    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # (an import of it raises ImportError, which the autotuner takes for "absent")
    try:
        import deepspeed
    finally:
        del sys.modules["mlflow"]
    return deepspeed


def init() -> DistEnv:
    """Initialise torch.distributed through DeepSpeed (nccl on GPU, gloo on CPU) and describe this process."""
    if "RANK" not in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        _from_srun()
    if "RANK" not in os.environ:  # a plain process: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    # libraries read the ranks per node from LOCAL_WORLD_SIZE (torchrun's name) or LOCAL_SIZE (the deepspeed
    # launcher's): give both names the same value
    if "LOCAL_WORLD_SIZE" not in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ.get("LOCAL_SIZE", os.environ["WORLD_SIZE"])
    use_cpu_accelerator_if_no_gpu()
    deepspeed = import_deepspeed()
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = torch.cuda.is_available()
    gpu = bind_gpu(local_rank) if on_gpu else 0
    if on_gpu:
        nccl_errors_raise()
    if not torch.distributed.is_initialized():
        shm = None if on_gpu else _deepspeed_cpu_shm_segment()
        if shm is not None and shm.exists():  # our own name, so left by a killed run on this address and port
            console.warning(f"removing stale shared memory '{shm}' left by a killed run")
            shm.unlink(missing_ok=True)
        deepspeed.init_distributed(
            dist_backend="nccl" if on_gpu else "gloo", verbose=False, timeout=timedelta(seconds=SETUP_TIMEOUT_S)
        )
        import atexit

        atexit.register(shutdown)  # any process that joined a group leaves it before the interpreter finalizes
        if shm is not None and shm.exists():
            torch.distributed.barrier()  # every local rank has mapped every segment: the names can go now
            shm.unlink(missing_ok=True)  # the memory lives on until the last process exits, even on kill -9
    env = DistEnv(
        rank=torch.distributed.get_rank(),
        local_rank=local_rank,
        world_size=torch.distributed.get_world_size(),
        device=f"cuda:{gpu}" if on_gpu else "cpu",
        node=node_name(),
    )
    console.bind(env.rank, env.world_size, env.node)
    return env


def bind_gpu(local_rank: int) -> int:
    """Make this process drive its GPU (gpu_index) and return its index. DeepSpeed takes the index of its device
    from LOCAL_RANK (engine, process group, ZeRO-3), so LOCAL_RANK becomes that index; the launcher's local rank
    stays in DistEnv.local_rank."""
    import torch

    gpu = gpu_index(local_rank, torch.cuda.device_count())
    torch.cuda.set_device(gpu)
    os.environ["LOCAL_RANK"] = str(gpu)
    return gpu


def gpu_index(local_rank: int, visible: int) -> int:
    """The GPU a rank drives, of the `visible` ones: its local rank, or the only one it sees (a launcher that
    binds one GPU to each task, as SLURM's --gpus-per-task=1 or --gpu-bind=single, shows every task its own
    GPU as device 0). Two ranks on one GPU are caught in world_table."""
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise UserError(
        f"local rank {local_rank} sees only {visible} GPUs (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}); start one rank per GPU on each node, or bind one GPU "
        "to each task."
    )


def gpu_id(device: str) -> str:
    """The identity of the GPU behind `device` (its UUID), '' on the CPU."""
    if not device.startswith("cuda"):
        return ""
    import torch

    return str(getattr(torch.cuda.get_device_properties(torch.device(device)), "uuid", "")) or device


def inference_device() -> str:
    """Where eval, generate and prepare-reference run outside a launcher: the first GPU this process sees (a
    launcher's rank uses its own), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


NCCL_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"


def nccl_errors_raise() -> None:
    """A collective that times out under NCCL must reach the code that names the rank and exits 75 (train.py),
    not kill the process. NCCL collectives return at once and the main thread waits later, in a host read; torch's
    watchdog sees the timeout, and by default (3, and torchrun's 1) ends the process with SIGABRT. 2: it aborts
    the communicators only, which ends the wait, and the next collective raises in the main thread. Set before
    the process group exists, whatever the launcher set (the old value is said)."""
    old = os.environ.get(NCCL_ERROR_HANDLING)
    if old not in (None, "2") and os.environ.get("RANK", "0") == "0":
        console.warning(f"{NCCL_ERROR_HANDLING}={old} becomes 2: a collective timeout ends the run with a sentence "
                        "naming the rank that stopped and exit 75, not with SIGABRT")  # fmt: skip
    os.environ[NCCL_ERROR_HANDLING] = "2"


def node_name() -> str:
    """The node this process runs on, as the launcher knows it."""
    if os.environ.get("SLURMD_NODENAME"):
        return os.environ["SLURMD_NODENAME"]
    host = socket.gethostname()
    group = os.environ.get("GROUP_RANK")  # torchrun's node rank: nodes may share a host name in containers
    return f"{host}/{group}" if group is not None and os.environ.get("TORCHELASTIC_RUN_ID") else host


def _from_srun() -> None:
    """RANK and the rest from the variables of a task srun started (no launcher set them)."""
    env = os.environ
    nodes = subprocess.run(
        ["scontrol", "show", "hostnames", env["SLURM_STEP_NODELIST"]], capture_output=True, text=True
    ).stdout.split() or [env["SLURM_STEP_NODELIST"]]
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE", "1").split("(")[0].split(",")[0]
    job, step = int(env.get("SLURM_JOB_ID", "0")), int(env.get("SLURM_STEP_ID", "0"))
    env.update(
        RANK=env["SLURM_PROCID"],
        LOCAL_RANK=env["SLURM_LOCALID"],
        WORLD_SIZE=env["SLURM_STEP_NUM_TASKS"],
        LOCAL_WORLD_SIZE=per_node,
        MASTER_ADDR=env.get("MASTER_ADDR", nodes[0]),
    )
    env.setdefault("MASTER_PORT", str(20000 + (job * 7 + step) % 20000))  # the same on every task of the step


def world_table(env: DistEnv) -> list[dict]:
    """Collective: every rank's identity, checked: on each node the local ranks are 0..n-1 once each and the
    local world size is n. One sentence (on every rank) when the launcher got it wrong."""
    from dist_clm.errors import agreed

    me = {"rank": env.rank, "node": env.node, "local_rank": env.local_rank, "pid": os.getpid(),
          "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", "1")), "device": env.device,
          "gpu": gpu_id(env.device)}  # fmt: skip
    table = all_gather_object(me)
    problem = table_problem(table)
    if problem:
        raise agreed(UserError(problem))  # (every rank saw the same table)
    return table


def table_problem(table: list[dict]) -> str | None:
    """What is wrong with the rank table, in one sentence (None: nothing): on each node the local ranks must be
    0..n-1 once each, the local world size n, and no two ranks may drive the same GPU."""
    for node in sorted({r["node"] for r in table}):
        here = [r for r in table if r["node"] == node]
        local = sorted(r["local_rank"] for r in here)
        sizes = {r["local_world_size"] for r in here}
        if local != list(range(len(here))) or sizes != {len(here)}:
            return (
                f"the launcher gave the {len(here)} ranks on node {node} local ranks {local} and local world sizes "
                f"{sorted(sizes)} (expected 0..{len(here) - 1} and {len(here)}); check its per-node process count."
            )
        gpus: dict[str, int] = {}
        for r in here:
            if r.get("gpu") and r["gpu"] in gpus:
                return (
                    f"ranks {gpus[r['gpu']]} and {r['rank']} on node {node} drive the same GPU ({r['device']}, "
                    f"{r['gpu']}); start one rank per GPU on each node, or bind one GPU to each task."
                )
            gpus[r.get("gpu") or f"cpu{r['rank']}"] = r["rank"]
    return None


def describe(table: list[dict]) -> str:
    """'4 ranks on 2 nodes (dn1: 0-1, dn2: 2-3)'."""
    nodes: dict[str, list[int]] = {}
    for r in table:
        nodes.setdefault(r["node"], []).append(r["rank"])
    parts = [f"{n}: {min(rs)}-{max(rs)}" if len(rs) > 1 else f"{n}: {rs[0]}" for n, rs in nodes.items()]
    return f"{len(table)} ranks on {len(nodes)} node{'s' if len(nodes) > 1 else ''} ({', '.join(parts)})"


def set_collective_timeout(seconds: float) -> None:
    """The timeout of every later collective, in every process group: the default one and the ones DeepSpeed
    made for ZeRO (a stalled rank blocks its peers in whichever they are in)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    setter = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout  # (torch < 2.12 name)
    groups = list(dist.distributed_c10d._world.pg_map) or [None]  # (torch lists its groups only privately)
    for group in groups:
        with contextlib.suppress(ValueError, RuntimeError):  # a group this rank is not part of
            setter(timedelta(seconds=seconds), group)


@contextlib.contextmanager
def long_collectives(restore_s: float | None) -> Iterator[None]:
    """Collectives inside the block may wait SETUP_TIMEOUT_S (a save or load on a slow filesystem); then back
    to `restore_s` (None: it stays long)."""
    set_collective_timeout(SETUP_TIMEOUT_S)
    try:
        yield
    finally:
        if restore_s is not None:
            set_collective_timeout(restore_s)


# what gloo and NCCL say when a peer is gone or a collective timed out (they raise plain RuntimeErrors)
_FAILURE_MARKS = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "Broken pipe",
                  "NCCL communicator was aborted", "ProcessGroupNCCL", "ProcessGroupGloo")  # fmt: skip


def is_collective_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another rank died, stalled or went unreachable."""
    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", ())
    return (dist_error and isinstance(error, dist_error)) or any(m in str(error) for m in _FAILURE_MARKS)


def failure_reason(error: BaseException, timeout_s: float) -> str:
    text = str(error)
    if "imed out" in text:
        return f"no answer within the collective timeout of {timeout_s:g} s"
    return "a peer closed its connection: its process died" if "by peer" in text else text.splitlines()[0][:160]


_keep_at_exit = False  # peers gone: tearing the group down could wait on them


def keep_group_at_exit() -> None:
    global _keep_at_exit
    _keep_at_exit = True


def shutdown() -> None:
    """Destroy the process group, if any, before the interpreter exits: left to static destructors at exit, its
    store's C++ threads can abort the process ("terminate called without an active exception"), which turns
    any exit code, 0, 2 or 75, into SIGABRT."""
    import contextlib

    if _keep_at_exit or "torch.distributed" not in sys.modules:  # (nothing to do without torch)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # (peers gone: what is left goes with the process)
            dist.destroy_process_group()


class Heartbeat:
    """Each rank's sign of life, in the process group's store (served by rank 0's process): a daemon thread
    adds 1 to this rank's counter every second, whatever the main thread is doing (computing, or blocked in a
    collective). When a collective fails, the survivors look at which counters stopped moving: those ranks'
    processes are dead or stopped. The store is torch's own (no public accessor: `_get_default_store`).
    `stop()` before the process exits: a daemon thread still inside the store's C++ client when the interpreter
    finalizes aborts the process ("terminate called without an active exception")."""

    PERIOD_S = 1.0

    def __init__(self, env: DistEnv):
        import threading

        import torch.distributed as dist

        self.env, self.store, self._thread = env, None, None
        self._stopped = threading.Event()
        if not (dist.is_initialized() and env.world_size > 1):
            return
        try:
            self.store = dist.distributed_c10d._get_default_store()
            self.store.set(f"dist_clm/node/{env.rank}", env.node)
        except Exception:  # noqa: BLE001 (no store, no names: failures are still reported, without them)
            self.store = None
            return
        self._thread = threading.Thread(target=self._beat, name="dist-clm-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        key = f"dist_clm/alive/{self.env.rank}"
        while not self._stopped.is_set():
            try:
                self.store.add(key, 1)
            except Exception:  # noqa: BLE001 (rank 0's process, which serves the store, is gone: nothing to do)
                return
            self._stopped.wait(self.PERIOD_S)

    def stop(self) -> None:
        """End the thread and wait for it (at most one store call: milliseconds, or an error once the store's
        server is gone)."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def laggards(self) -> str:
        """Who stopped, e.g. 'rank 3 (node dn2) stopped answering', or '' when it cannot be told."""
        import time

        if self.store is None:
            return ""
        try:
            self.store.set_timeout(timedelta(seconds=5))
            keys = [f"dist_clm/alive/{r}" for r in range(self.env.world_size)]
            before = [self.store.add(k, 0) for k in keys]
            time.sleep(3 * self.PERIOD_S)
            after = [self.store.add(k, 0) for k in keys]
            silent = [r for r in range(self.env.world_size) if after[r] == before[r]]
            nodes = {r: self.store.get(f"dist_clm/node/{r}").decode() for r in silent}
        except Exception:  # noqa: BLE001 (the store lives in rank 0's process: it may be the one that stopped)
            return "rank 0 (which serves the process group's store) stopped answering"
        if not silent or len(silent) == self.env.world_size:
            return ""
        named = ", ".join(f"rank {r} (node {nodes[r]})" for r in silent[:4]) + (" and more" if len(silent) > 4 else "")
        return f"{named} stopped answering (dead or stopped process)"


def _deepspeed_cpu_shm_segment() -> Path | None:
    """This rank's segment of DeepSpeed's CPU shared-memory all-reduce (made when every rank is local).

    DeepSpeed never unlinks it: each multi-process CPU run would leave 2 x 66 MB in /dev/shm (RAM) behind,
    and a killed run's segment would be reused, stale, by the next run on the same port. Its name is
    deepspeed_allreduce_buffer_<uid>_<master addr>_<master port>_<rank>, unique to this rank of this run.
    """
    env = os.environ
    if env.get("LOCAL_SIZE") != env.get("WORLD_SIZE") or env.get("WORLD_SIZE", "1") == "1":
        return None
    return Path(
        "/dev/shm",
        f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_"
        f"{env['RANK']}",
    )


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (a world of one: [obj])."""
    import torch

    if not torch.distributed.is_initialized():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def reduce_to_host(tensor, op=None) -> list:
    """Collective: all-reduce `tensor` (sum, or `op`) and read it back. Under NCCL a collective that timed out
    has its communicator aborted (nccl_errors_raise), which ends the wait with whatever the buffer held: the
    work's error is raised instead of those values."""
    import torch

    if not torch.distributed.is_initialized():
        return tensor.tolist()
    work = torch.distributed.all_reduce(tensor, op=op or torch.distributed.ReduceOp.SUM, async_op=True)
    work.wait()
    values = tensor.tolist()
    failed = work.exception() if torch.distributed.get_backend() == "nccl" else None  # (gloo's wait raised)
    if failed is not None:
        raise RuntimeError(f"ProcessGroupNCCL: the collective failed: {failed}")
    return values


def all_reduce_sum(values: list, device: str) -> list[float]:
    """Sum a few floats over all ranks (float64, so token counts stay exact); an entry may be a tensor of one or
    more values on the device, read with the sum (no host read of its own)."""
    import torch

    if all(isinstance(v, (int, float)) for v in values):
        t = torch.tensor(values, dtype=torch.float64, device=device)
    else:
        t = torch.cat([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(-1) for v in values])
    return reduce_to_host(t)


def agree_on_error(error: Exception | None, device: str) -> None:
    """Collective: when any rank holds an error, every rank raises one with the same sentence (the first
    rank's), so that the rank that prints (rank 0) says what went wrong wherever it happened, and no rank is
    left waiting in a collective for one that stopped."""
    import torch

    from dist_clm.errors import UserError, agreed

    if not torch.distributed.is_initialized():
        if error is not None:
            raise error
        return
    if not all_reduce_sum([float(error is not None)], device)[0]:
        return
    messages = all_gather_object(str(error) if error is not None else None)
    first = next(m for m in messages if m is not None)
    if isinstance(error, UserError) and str(error) == first:
        raise agreed(error)
    raise agreed(UserError(first))
