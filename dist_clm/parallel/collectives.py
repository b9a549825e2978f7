"""The collectives dist_clm issues itself (a few small all-reduces and gathers), their timeouts, and telling a
collective that failed because a peer is gone from any other error.

Timeouts: set-up, checkpoint saves and loads wait up to SETUP_TIMEOUT_S in a collective (a universal
checkpoint conversion or a large save can take minutes on one rank); training collectives wait
`distributed.collective_timeout_s` from the second step on (`set_collective_timeout`). A rank that dies makes its
peers' next collective fail at once; one that stalls makes it time out; either way every surviving rank ends
(training/loop.py) instead of waiting forever.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

SETUP_TIMEOUT_S = 1800.0  # collectives of set-up, resume and checkpointing (torch's gloo default)
TRACES = "collectives"  # RUN/collectives/: each rank's flight recorder, dumped when a collective times out (GPUs)
TRACE_ENTRIES = 2000  # the collectives each rank's flight recorder keeps, the latest ones


def record_collectives(run_dir, on_gpu: bool) -> Path:
    """Before the process group forms: each rank's flight recorder keeps its last TRACE_ENTRIES collectives (what,
    which group, sizes, state). On GPUs it is NCCL's, which dumps them into RUN/collectives/rank_N itself when one
    times out; on the CPU torch's recorder hook is attached to gloo's default group once it exists
    (`attach_recorder`) and a rank that loses its peers dumps its own (`dump_collectives`). torch's analyzer
    (`torchfrtrace RUN/collectives`) matches NCCL's records. A user's own settings of these variables win."""
    import os

    folder = Path(run_dir) / TRACES
    settings = [("TORCH_FR_BUFFER_SIZE", str(TRACE_ENTRIES))]
    if on_gpu:  # (NCCL writes its dumps itself: the folder must be there; on the CPU a dump makes it)
        with contextlib.suppress(OSError):  # (a run directory that cannot be written is said by the lock)
            folder.mkdir(parents=True, exist_ok=True)
        settings += [("TORCH_NCCL_DUMP_ON_TIMEOUT", "1"), ("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", f"{folder}/rank_"),
                     ("TORCH_FR_DUMP_TEMP_FILE", f"{folder}/rank_")]  # fmt: skip
        if "TORCH_FR_BUFFER_SIZE" not in os.environ and not _knows_fr_names():
            settings.append(("TORCH_NCCL_TRACE_BUFFER_SIZE", str(TRACE_ENTRIES)))  # (the name older torch reads)
    for name, value in settings:
        os.environ.setdefault(name, value)
    return folder


def _knows_fr_names() -> bool:
    """Whether this torch reads the flight recorder's TORCH_FR_* names (2.12 and later; it then calls the
    TORCH_NCCL_TRACE_* ones deprecated, with a warning in every process)."""
    import torch

    return tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 12)


_RECORDER: list = []  # (the hook attached to gloo's default group: kept alive with the process)


def attach_recorder() -> bool:
    """The CPU's flight recorder: torch's recorder hook on the default (gloo) group, where this torch has one;
    whether it is on."""
    import torch.distributed as dist

    try:
        from torch._C._distributed_c10d import FlightRecorderHook
    except ImportError:  # (an older torch: the heartbeats still name the rank that stopped)
        return False
    _RECORDER.append(FlightRecorderHook.attach(dist.group.WORLD))
    return True


def detach_recorder() -> None:
    """The CPU's recorder hook off the default group (before the group is destroyed)."""
    while _RECORDER:
        with contextlib.suppress(Exception):
            _RECORDER.pop().remove()


def dump_collectives(run_dir, rank: int) -> str:
    """On a rank that lost its peers with the CPU's recorder on: its records into RUN/collectives/rank_N (the
    pickle torchfrtrace reads), and the collective it was waiting in, in words ("" when unknown)."""
    if not _RECORDER:
        return ""
    import json

    from torch._C import _distributed_c10d as c10d

    folder = Path(run_dir) / TRACES
    folder.mkdir(parents=True, exist_ok=True)
    try:
        records = c10d._dump_fr_trace(includeCollectives=True, includeStackTraces=False, onlyActive=False)
        active = json.loads(c10d._dump_fr_trace_json(includeCollectives=True, onlyActive=True)).get("entries", [])
    except (AttributeError, RuntimeError, ValueError):  # (a torch without the dump, or nothing recorded)
        return ""
    (folder / f"rank_{rank}").write_bytes(records)
    active = [e for e in active if not e.get("is_p2p")]
    if not active:
        return ""
    first = max(active, key=lambda e: e.get("collective_seq_id", 0))  # (the latest: older ones may stay unmarked)
    group = (first.get("process_group") or ["", ""])[-1]
    where = f", group {group}" if group not in ("", "undefined") else ""
    return f"collective {first.get('collective_seq_id')} ({first.get('profiling_name')}{where})"


def traces_note(run_dir, on_gpu: bool, waiting_in: str = "") -> str:
    """What the sentence of a lost peer adds: the collective this rank was waiting in, and where the ranks' flight
    recorders are dumped ("" where nothing was recorded). NCCL's dumps are what torch's analyzer (torchfrtrace)
    reads; gloo's records (torch 2.14) are of a shape it does not yet read, so on the CPU the files are named only."""
    folder = Path(run_dir) / TRACES
    if not on_gpu and not waiting_in:
        return ""
    said = f"; it was waiting in {waiting_in}" if waiting_in else ""
    if not on_gpu:
        return f"{said} (each rank's last collectives: {folder}/)"
    return (f"{said} (each rank's last collectives: {folder}/, `torchfrtrace {folder}` names the one a rank never "
            "reached)")  # fmt: skip


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
