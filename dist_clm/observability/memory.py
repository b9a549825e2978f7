"""Where a GPU's memory went: snapshots of the CUDA caching allocator with the history of its allocations (the
file pytorch.org/memory_viz opens), over chosen steps (train.memory_snapshot_steps on train.profile_ranks) and at
an out-of-memory error, in RUN/memory/; and the sentence such an error ends the run with.

The allocation history is torch's own recorder (torch.cuda.memory._record_memory_history): each allocation with
its Python and C++ stack, kept for the last MAX_ENTRIES events. It costs a little on every allocation, so it
records only over the chosen steps; an out-of-memory error outside them still dumps the allocator's segments and
blocks (without stacks).
"""

from __future__ import annotations

from pathlib import Path

from dist_clm.errors import UserError

MAX_ENTRIES = 100_000
FOLDER = "memory"


def _cuda():
    import torch

    return torch.cuda


class MemoryRecorder:
    """train.memory_snapshot_steps [first, last] on the ranks `ranks`: the allocation history recorded from the
    start of step `first` and dumped after step `last` (or when the run stops first). Only on a GPU."""

    def __init__(self, steps: list[int], ranks: list[int], rank: int, run_dir: Path, device: str):
        self.first, self.last = (steps[0], steps[-1]) if steps else (0, -1)
        self.on = bool(steps) and rank in ranks and device.startswith("cuda")
        self.rank, self.out = rank, Path(run_dir) / FOLDER
        self.recording, self.started = False, 0

    def before(self, step: int) -> None:
        if self.on and not self.recording and self.first <= step <= self.last:
            _cuda().memory._record_memory_history(max_entries=MAX_ENTRIES)
            self.recording, self.started = True, step

    def after(self, step: int) -> None:
        if self.recording and step >= self.last:
            self.close(step)

    def close(self, step: int) -> Path | None:
        """Dump the snapshot of steps [started, step] and stop recording; its path, or None."""
        if not self.recording:
            return None
        from dist_clm import console

        path = dump(self.out, f"rank{self.rank}.steps_{self.started}-{step}.pickle")
        _cuda().memory._record_memory_history(enabled=None)
        self.recording = False
        console.info(f"the memory snapshot of steps {self.started}-{step} is in {path} (open it at "
                     "pytorch.org/memory_viz)", every_rank=True)  # fmt: skip
        return path


def dump(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    _cuda().memory._dump_snapshot(str(path))
    return path


def by_kind(model, optimizer) -> dict[str, int]:
    """Bytes of GPU memory this rank holds in the model's parameters (its partitions under ZeRO-3) and in the
    optimizer's state tensors, as far as they can be found; the rest of what is allocated is gradients,
    activations and buffers."""
    import torch

    def on_gpu(t) -> int:
        return t.numel() * t.element_size() if torch.is_tensor(t) and t.is_cuda else 0

    params = sum(on_gpu(getattr(p, "ds_tensor", p)) for p in model.parameters())
    inner = getattr(optimizer, "optimizer", optimizer)  # (DeepSpeed's ZeRO optimizers wrap torch's)
    state = sum(on_gpu(v) for s in getattr(inner, "state", {}).values() for v in s.values())
    for holder in {id(optimizer): optimizer, id(inner): inner}.values():  # ZeRO's fp32 master partitions
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            state += sum(on_gpu(t) for t in getattr(holder, name, None) or [])
    return {"parameters": params, "optimizer state": state}


def out_of_memory(run_dir: Path, rank: int, step: int, device: str, model=None, optimizer=None) -> UserError:
    """After torch's out-of-memory error on this rank at step `step`: a snapshot into RUN/memory/, and the
    sentence that names it, what was allocated and by what, and what to change."""
    cuda = _cuda()
    path = dump(Path(run_dir) / FOLDER, f"rank{rank}.oom-step-{step}.pickle")
    stats = cuda.memory_stats(device)
    gib = 2**30
    allocated, reserved = stats.get("allocated_bytes.all.current", 0), stats.get("reserved_bytes.all.current", 0)
    total = cuda.get_device_properties(device).total_memory
    kinds = by_kind(model, optimizer) if model is not None else {}
    rest = allocated - sum(kinds.values())
    parts = ", ".join(f"{k} {v / gib:.1f}" for k, v in [*kinds.items(), ("the rest (gradients, activations, "
                                                                            "buffers)", rest)] if v > 0)  # fmt: skip
    return UserError(
        f"rank {rank} ran out of GPU memory at step {step}: {allocated / gib:.1f} GiB allocated ({parts} GiB), "
        f"{reserved / gib:.1f} GiB reserved of {total / gib:.1f} GiB; the allocator's snapshot is in {path} (open "
        "it at pytorch.org/memory_viz; train.memory_snapshot_steps records the allocations' stacks too). Lower "
        "train.micro_batch_size, turn on train.activation_checkpointing or raise distributed.zero_stage "
        "(`dist-clm plan` shows what each saves)."
    )
