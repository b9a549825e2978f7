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

The collectives' timeouts live in collectives.py; the sign of life that names a rank that stopped in
heartbeat.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from dist_clm import console
from dist_clm.errors import UserError
from dist_clm.parallel import ops
from dist_clm.parallel.collectives import (
    SETUP_TIMEOUT_S,
    all_gather_object,
    attach_recorder,
    detach_recorder,
    record_collectives,
)


def use_cpu_accelerator_if_no_gpu() -> None:
    """DeepSpeed picks its accelerator at import; without a GPU tell it to use the CPU one (gloo). A process that
    was given GPUs but cannot use them stops here (`refuse_unusable_gpus`) instead of training on the CPU at a
    thousandth of the speed; DS_ACCELERATOR=cpu says the CPU is meant."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            refuse_unusable_gpus()
            os.environ["DS_ACCELERATOR"] = "cpu"


# what says a process was given GPUs: SLURM's allocation (not CUDA_VISIBLE_DEVICES alone: the deepspeed launcher
# sets it on CPU-only machines too), a GPU UUID in CUDA_VISIBLE_DEVICES, or the NVIDIA driver listing GPUs
SLURM_GPU_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS")
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
NVIDIA_VERSION = Path("/proc/driver/nvidia/version")


def gpus_given(environ=os.environ, driver_gpus: Path | None = None) -> str:
    """Why this process should see a GPU ('' when nothing says so)."""
    driver_gpus = driver_gpus or NVIDIA_GPUS
    for name in SLURM_GPU_VARIABLES:
        value = environ.get(name, "")
        if value and value not in ("0", "N/A", "(null)"):
            return f"{name}={value}"
    visible = environ.get("CUDA_VISIBLE_DEVICES", "")
    if visible.startswith(("GPU-", "MIG-")):
        return f"CUDA_VISIBLE_DEVICES={visible}"
    with contextlib.suppress(OSError):
        found = sorted(p.name for p in driver_gpus.iterdir())
        if found:
            return f"the NVIDIA driver lists {len(found)} GPU{'s' if len(found) > 1 else ''}"
    return ""


def driver_version(version_file: Path | None = None) -> str:
    """The NVIDIA driver's version, from the kernel module or nvidia-smi; '' when neither says."""
    with contextlib.suppress(OSError):
        for word in (version_file or NVIDIA_VERSION).read_text().split():
            if word.count(".") >= 1 and word.replace(".", "").isdigit():
                return word
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
        return out.stdout.split()[0] if out.returncode == 0 and out.stdout.split() else ""
    return ""


def refuse_unusable_gpus(environ=os.environ) -> None:
    """One sentence when this process was given GPUs that torch cannot use (torch.cuda.is_available() is False):
    what gave them, torch's CUDA build, the driver's version and torch's own reason, and the ways out."""
    given = gpus_given(environ)
    if not given:
        return
    import torch

    reason = ""
    try:
        torch.cuda.init()
    except Exception as e:  # noqa: BLE001 (torch's own words for why CUDA is unusable: an old driver, no device)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    cuda = torch.version.cuda or "none (a CPU-only build)"
    driver = driver_version() or "unknown (no /proc/driver/nvidia/version, no nvidia-smi)"
    raise UserError(
        f"this process was given GPUs ({given}) but torch cannot use them: torch {torch.__version__} is built for "
        f"CUDA {cuda}, the NVIDIA driver is {driver}{f' ({reason})' if reason else ''}; install a torch wheel built "
        "for a CUDA the driver supports (pytorch.org's index for that CUDA version) or update the driver, or set "
        "DS_ACCELERATOR=cpu to run on the CPU on purpose."
    )


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


# a module that imports an optional package wherever it is installed, for a feature dist_clm never uses -> that
# package: DeepSpeed's autotuner imports mlflow (dist_clm's trackers extra), transformers' generation imports
# scikit-learn (lm-eval and mlflow pull it in), together ~2 s and ~100 MiB of every rank's start-up
OPTIONAL_IMPORTS = {"deepspeed.autotuning.autotuner": "mlflow", "transformers.utils.import_utils": "sklearn"}


class _WithoutOptional:
    """An import hook: while one of OPTIONAL_IMPORTS' modules runs its top level, its optional package reads as
    not installed (None in sys.modules: an import raises ImportError and importlib's find_spec says absent), and
    is importable again right after, for whoever asks for it (the MLflow tracker, lm-eval's metrics). Written by
    hand because neither library has a switch for it; a module it cannot wrap is imported as it was."""

    def find_spec(self, name, path=None, target=None):
        optional = OPTIONAL_IMPORTS.get(name)
        if optional is None:
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            if optional in sys.modules:  # (imported already: nothing to save)
                return run(module)
            sys.modules[optional] = None
            try:
                return run(module)
            finally:
                if optional in sys.modules and sys.modules[optional] is None:
                    del sys.modules[optional]

        spec.loader.exec_module = exec_module
        return spec


def lean_imports() -> None:
    """First thing in a dist_clm process (the command's entry point, a SLURM task): leave OPTIONAL_IMPORTS out of
    the libraries' start-up."""
    if not any(isinstance(f, _WithoutOptional) for f in sys.meta_path):
        sys.meta_path.insert(0, _WithoutOptional())


def import_deepspeed():
    """deepspeed, imported with the CPU accelerator where there is no GPU and without its autotuner's mlflow."""
    use_cpu_accelerator_if_no_gpu()  # (else DeepSpeed guesses, and says so: "Setting accelerator to CPU...")
    lean_imports()
    import deepspeed

    return deepspeed


def init(run_dir: str | None = None) -> DistEnv:
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
    ops.use_own_op_home()  # (the user's TORCH_EXTENSIONS_DIR if set; every rank computes the same)
    deepspeed = import_deepspeed()
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = torch.cuda.is_available()
    gpu = bind_gpu(local_rank) if on_gpu else 0
    if on_gpu:
        nccl_errors_raise()
    if run_dir:
        record_collectives(run_dir, on_gpu)
    if not torch.distributed.is_initialized():
        shm = None if on_gpu else _deepspeed_cpu_shm_segment()
        if shm is not None and shm.exists():  # our own name, so left by a killed run on this address and port
            console.warning(f"removing stale shared memory '{shm}' left by a killed run")
            shm.unlink(missing_ok=True)
        if not on_gpu:
            ops.announce_build(local_rank)
        with ops.quiet_build_report():
            deepspeed.init_distributed(
                dist_backend="nccl" if on_gpu else "gloo", verbose=False, timeout=timedelta(seconds=SETUP_TIMEOUT_S)
            )
        if run_dir and not on_gpu:
            attach_recorder()  # (gloo's flight recorder: NCCL has its own)
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

    use_cpu_accelerator_if_no_gpu()  # (the one place that decides the CPU: refuses GPUs given but unusable)
    return "cuda" if torch.cuda.is_available() else "cpu"


NCCL_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"


def nccl_errors_raise() -> None:
    """A collective that times out under NCCL must reach the code that names the rank and exits 75 (training/loop.py),
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


def launched_world() -> tuple[int, bool]:
    """(the number of ranks, whether they all run on this node), from what the launcher set (torchrun, the
    deepspeed launcher, srun; none: a world of one), before the process group forms."""
    env = os.environ
    if "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world)
        return world, local == world
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return int(env["SLURM_STEP_NUM_TASKS"]), env.get("SLURM_STEP_NUM_NODES", "1") == "1"
    return 1, True


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
    return f"{console.count(len(table), 'rank')} on {console.count(len(nodes), 'node')} ({', '.join(parts)})"


_keep_at_exit = False  # peers gone: tearing the group down could wait on them


def keep_group_at_exit() -> None:
    global _keep_at_exit
    _keep_at_exit = True


def shutdown() -> None:
    """Destroy the process group, if any, before the interpreter exits: left to static destructors at exit, its
    store's C++ threads can abort the process ("terminate called without an active exception"), which turns
    any exit code, 0, 2 or 75, into SIGABRT."""

    if _keep_at_exit or "torch.distributed" not in sys.modules:  # (nothing to do without torch)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        detach_recorder()  # (its hooks off the group before the group goes)
        with contextlib.suppress(Exception):  # (peers gone: what is left goes with the process)
            dist.destroy_process_group()


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
