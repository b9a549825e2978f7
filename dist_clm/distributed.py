"""Who am I, and bringing up the process group: the deepspeed launcher, torchrun, or a plain process.

The deepspeed launcher and torchrun both export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT.
A plain `python`/`dist-clm` process has none of them; DeepSpeed would then try MPI discovery (and fail
without mpi4py), so we declare a world of one on a free local port first.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path


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

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init() -> DistEnv:
    """Initialise torch.distributed through DeepSpeed (nccl on GPU, gloo on CPU) and describe this process."""
    if "RANK" not in os.environ:  # a plain process: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    # libraries read the ranks per node from LOCAL_WORLD_SIZE (torchrun's name) or LOCAL_SIZE (the deepspeed
    # launcher's): give both names the same value
    if "LOCAL_WORLD_SIZE" not in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ.get("LOCAL_SIZE", os.environ["WORLD_SIZE"])
    use_cpu_accelerator_if_no_gpu()
    import deepspeed
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        shm = None if on_gpu else _deepspeed_cpu_shm_segment()
        if shm is not None and shm.exists():  # our own name, so left by a killed run on this address and port
            print(f"removing stale shared memory '{shm}' left by a killed run", file=sys.stderr)
            shm.unlink(missing_ok=True)
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)
        if shm is not None and shm.exists():
            torch.distributed.barrier()  # every local rank has mapped every segment: the names can go now
            shm.unlink(missing_ok=True)  # the memory lives on until the last process exits, even on kill -9
    return DistEnv(
        rank=torch.distributed.get_rank(),
        local_rank=local_rank,
        world_size=torch.distributed.get_world_size(),
        device=f"cuda:{local_rank}" if on_gpu else "cpu",
    )


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


def barrier() -> None:
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(values: list[float], device: str) -> list[float]:
    """Sum a few floats over all ranks (float64, so token counts stay exact)."""
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def agree_on_error(error: Exception | None, device: str) -> None:
    """Collective: when any rank holds an error, every rank raises one with the same sentence (the first
    rank's), so that the rank that prints (rank 0) says what went wrong wherever it happened, and no rank is
    left waiting in a collective for one that stopped."""
    import torch

    from dist_clm.errors import UserError

    if not torch.distributed.is_initialized():
        if error is not None:
            raise error
        return
    if not all_reduce_sum([float(error is not None)], device)[0]:
        return
    messages: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(messages, str(error) if error is not None else None)
    first = next(m for m in messages if m is not None)
    if error is not None and str(error) == first:
        raise error
    raise UserError(first)
