"""Training checkpoints: choosing one, and moving the bytes of the parts a run is made of.

    RUN/checkpoints/step_00000100/   DeepSpeed's files (model, optimizer shards, scheduler)
                                     + random_rank{r}.pt (each rank's random generators: RandomState)
                                     + train_state.json ({"format", "parts": {name: the part's state_dict()}},
                                       written by rank 0; see below)
                                     + config.json (the transformers model config)
                                     + READERS (readers lock it; pruning leaves a checkpoint being read alone)
                                     + complete.json  <- written last, after every rank's files are durable;
                                       it lists every file with its size (with checkpoint.async_save, DeepSpeed's
                                       files are written by a background thread from a host snapshot and
                                       the marker comes at the first step boundary after they are durable)

A run is made of named parts, each with `state_dict()` and `load_state_dict(state)`: the loop's progress, the
settings that make it the same training (config.Settings), the data's order and position
(data/order.DataPosition), the loss guard (stability.LossGuard), each rank's random generators (RandomState), and
the DeepSpeed engine, saved and loaded through DeepSpeed's own save_checkpoint / load_checkpoint. Each part
decides whether it can continue from its saved state: `load_state_dict` raises errors.Mismatch naming what
changed. The Checkpointer only chooses the checkpoint (the newest one complete and whole on every rank's view:
agreed, so that ranks on a shared filesystem with caching never resume from different steps; a damaged one is
reported and the one before it used, never a mix) and moves the bytes, through DeepSpeed's universal checkpoint
when another number of ranks or another ZeRO stage wrote it.

Only a directory holding complete.json is a checkpoint: a run killed while saving leaves a directory without
it, which resume ignores and the next save removes. Every file is fsynced by the rank that sees it after its
own writes, before the marker, which is itself written to a temporary name, fsynced and renamed (the recipe
of torch's distributed checkpoint). The project's own files load without running code (JSON, and tensors with
torch.load(weights_only=True)); DeepSpeed's own files are pickles that it unpickles, so a run directory must
be as trusted as code. The tokenizer lives once in RUN/tokenizer. Loading weights for inference and exporting
live in evaluation/export.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from dist_clm import console
from dist_clm.errors import Mismatch, UserError
from dist_clm.fsutil import atomic_dir, atomic_write_text, fsync_dir, fsync_tree
from dist_clm.parallel.collectives import (
    agree_on_error,
    all_gather_object,
    all_reduce_sum,
    barrier,
    is_collective_failure,
)
from dist_clm.parallel.process_group import DistEnv

if TYPE_CHECKING:
    from dist_clm.checkpointing.writer import BackgroundWriter

COMPLETE = "complete.json"
TRAIN_STATE = "train_state.json"
FORMAT = 2  # train_state.json's layout: {"format": 2, "parts": {name: state}}
READERS = "READERS"  # readers hold a shared flock on it; pruning skips a checkpoint they hold
PREFIX = "step_"
UNIVERSAL = "universal"


class Stateful(Protocol):
    """A part of a run that a checkpoint carries (see the module docstring)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...  # raises errors.Mismatch for what it cannot continue


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def run_dir_of(tag_dir: Path) -> Path:
    """The run directory a checkpoint directory belongs to."""
    return tag_dir.parent.parent


def saved_tensor_parallel(tag_dir: Path) -> int:
    """The tensor-parallel size a checkpoint was saved with: DeepSpeed writes a model-parallel rank's files apart."""
    ranks = {m.group(1) for f in tag_dir.iterdir() if (m := re.search(r"mp_rank_(\d+)_model_states", f.name))}
    return max(len(ranks), 1)


def read_marker(tag_dir: Path) -> dict:
    """complete.json: step, ZeRO stage and world size the checkpoint was written with."""
    return json.loads((tag_dir / COMPLETE).read_text())


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob(f"{PREFIX}*") if (p / COMPLETE).is_file())


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a run directory (its latest complete checkpoint) or a step directory."""
    p = Path(path)
    if not p.exists():
        raise UserError(
            f"checkpoint path '{p}' does not exist; give a run directory or one of its checkpoints/step_* directories."
        )
    if (p / COMPLETE).is_file():
        return p
    if p.name.startswith(PREFIX):
        raise UserError(
            f"checkpoint '{p}' is incomplete (no {COMPLETE}: its save was interrupted); use an earlier one."
        )
    found = complete_checkpoints(p.parent if p.name == "checkpoints" else p)
    if not found:
        raise UserError(
            f"'{p}' holds no complete checkpoint; train with checkpoint.save_every > 0 or point at another run."
        )
    return found[-1]


@dataclass
class _Pending:
    """A save whose files are being written: not a checkpoint until _complete marks it."""

    tag_dir: Path
    step: int
    zero_stage: int
    world_size: int
    writer: BackgroundWriter | None
    start: float  # perf_counter at the save's start
    blocked_s: float  # seconds the step loop has waited for it so far


def read_parts(tag_dir: Path) -> dict[str, dict]:
    """The parts' states a checkpoint carries (train_state.json), by part name."""
    saved = json.loads((tag_dir / TRAIN_STATE).read_text())
    if saved.get("format") != FORMAT:
        raise UserError(
            f"checkpoint '{tag_dir}' was written by another version of dist_clm (format {saved.get('format', 1)}, "
            f"this one reads {FORMAT}); resume it with that version, or start a new run directory."
        )
    return saved["parts"]


@contextlib.contextmanager
def reading(path: str | Path) -> Iterator[Path]:
    """The complete checkpoint `path` resolves to, held for reading: keep-k pruning leaves a checkpoint alone
    while any reader (eval, generate, export) holds it. A shared flock on its READERS file; one that was
    pruned between resolving and locking is resolved again."""
    for _ in range(3):
        tag_dir = resolve(path)
        try:
            fd = os.open(tag_dir / READERS, os.O_RDONLY)
        except FileNotFoundError:  # pruned in between, or written before readers were tracked
            if not (tag_dir / COMPLETE).is_file():
                continue
            yield tag_dir
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if (tag_dir / COMPLETE).is_file():
                yield tag_dir
                return
        finally:
            os.close(fd)
    raise UserError(f"the checkpoints of '{path}' were removed while being opened; try again.")


class Checkpointer:
    """Saves and restores a run's checkpoints, for this rank; keeps the last `keep_last` complete ones."""

    def __init__(self, run_dir: str | Path, keep_last: int, env: DistEnv, zero_stage: int, size_hint: int = 0,
                 background: bool = False, tensor_parallel: int = 1):  # fmt: skip
        self.run_dir, self.dir = Path(run_dir), checkpoints_dir(run_dir)
        self.keep_last, self.env, self.zero_stage = keep_last, env, zero_stage
        self.tensor_parallel = tensor_parallel  # distributed.tensor_parallel_size: DeepSpeed's files per group rank
        self.size_hint = size_hint  # bytes a checkpoint takes, before the first one exists (a pre-flight check)
        self.background = background  # DeepSpeed's files written behind the step loop (writer.py)
        self.pending: _Pending | None = None  # the save in flight, not yet marked complete
        self.done: list[dict[str, float]] = []  # poll()'s reports of the saves completed since its last call

    def latest(self) -> Path | None:
        """Collective: the newest checkpoint that every rank sees complete, or None (agreed, so that ranks
        on a shared filesystem with caching never resume from different steps)."""
        steps = self._complete_steps()
        return self.dir / tag_for(steps[0]) if steps else None

    def choose(self) -> Path | None:
        """Collective: the newest complete checkpoint that is whole on every rank's view, or None. One whose
        files are missing or truncated is reported, loudly, and the one before it is chosen: never a mix."""
        self.wait()  # (a rollback: the save in flight may be the checkpoint to go back to)
        for step in self._complete_steps():
            tag_dir = self.dir / tag_for(step)
            problem = _damage(tag_dir)
            damaged = all_reduce_sum([float(problem is not None)], self.env.device)[0]
            if not damaged:
                return tag_dir
            console.warning(f"checkpoint {tag_dir} is damaged ({problem or 'on another rank'}); falling back to "
                            "the previous complete checkpoint", every_rank=False)  # fmt: skip
        if complete_checkpoints(self.run_dir):
            raise UserError(
                f"no checkpoint in '{self.dir}' can be loaded whole (each lacks or has a truncated file); restore "
                "the files, or start afresh with run.overwrite=true."
            )
        return None

    def load_parts(self, tag_dir: Path, parts: dict[str, Stateful]) -> None:
        """Each part continues from its state in `tag_dir`, or refuses (errors.Mismatch, every change of every
        part named at once)."""
        saved, changes = read_parts(tag_dir), []
        for name, part in parts.items():
            try:
                part.load_state_dict(saved[name])
            except Mismatch as e:
                changes += e.changes
        if changes:
            raise Mismatch(changes)

    def load_engine(self, engine, tag_dir: Path, random: RandomState) -> None:
        """Collective: DeepSpeed's state from `tag_dir` (directly, or through DeepSpeed's universal checkpoint
        when another number of ranks or ZeRO stage wrote it), and this rank's random generators (`random`
        decides whether they continue)."""
        elastic = self._needs_universal(tag_dir)
        if elastic and engine.optimizer_name() == "muon":
            marker = read_marker(tag_dir)
            raise UserError(
                f"'{tag_dir}' was saved by {marker['world_size']} ranks with ZeRO-{marker['zero_stage']}, and a "
                "Muon run resumes only there: DeepSpeed's universal checkpoint has no form for Muon's momentum yet; "
                "resume it on that world size and stage."
            )
        if elastic and read_marker(tag_dir)["zero_stage"] == 3 and self.zero_stage != 3:
            raise UserError(
                f"'{tag_dir}' was saved with ZeRO-3, whose model states DeepSpeed keeps partitioned, and its universal "
                "checkpoint resumes them only under ZeRO-3; resume with distributed.zero_stage=3 (on any number of "
                "ranks), or export the checkpoint and train on from it with model.pretrained."
            )
        # DeepSpeed reads this flag at every load_checkpoint and has no public setter; a run may load both
        # kinds (an elastic resume, then a rollback to a checkpoint of its own)
        engine._config.load_universal_checkpoint = elastic
        where = self._universal(tag_dir) if elastic else tag_dir
        optimizer = getattr(engine, "optimizer", None)
        sequence_parallel = hasattr(getattr(optimizer, "mpu", None), "initialize_sequence_parallel")
        if elastic and sequence_parallel:
            # DeepSpeed 0.19's universal loader takes its sequence-parallel groups for tensor parallelism (a
            # slice of each parameter per group rank); they hold whole parameters: load as without groups
            optimizer.mpu, groups = None, optimizer.mpu
        try:
            engine.load_checkpoint(str(where.parent), tag=where.name)
        finally:
            if elastic and sequence_parallel:
                optimizer.mpu = groups
        if elastic and self.zero_stage == 3:
            console.warning(
                "DeepSpeed's universal checkpoint restores ZeRO-3 weights exactly, but the optimizer state is "
                "approximate (losses drift ~5e-4 relative from an uninterrupted run); data and step count continue "
                "exactly",
                every_rank=False,
            )
        mine = tag_dir / random.file(self.env.rank)  # (none for a rank the writer did not have)
        random.load_state_dict(torch_load(mine) if mine.is_file() else None)

    def save(self, engine, step: int, parts: dict[str, Stateful], random: RandomState, model_config,
             wait: bool = False) -> Path:  # fmt: skip
        """Collective: the checkpoint of `step`: rank 0 writes the model config and the parts' states; every
        rank writes its DeepSpeed files and its random generators. Synchronous saving then completes the
        checkpoint here; background saving (`background`) returns once DeepSpeed's files are snapshotted, and
        `poll` completes it at the first step boundary where every rank's files are written (`wait=True`, or the
        next save, waits for that).
        Completing: every rank makes its files durable, and rank 0 writes the marker, which lists every file
        with its size, then prunes old checkpoints."""
        self.wait()  # one checkpoint in flight at a time
        start = time.perf_counter()
        tag_dir = self.dir / tag_for(step)
        self._check_space(tag_dir)
        writer = self._writer(engine)
        try:
            tag_dir.mkdir(parents=True, exist_ok=True)
            if self.env.is_main:  # before DeepSpeed's last barrier: every rank sees them whole after it
                model_config.save_pretrained(str(tag_dir))
                states = {name: part.state_dict() for name, part in parts.items()}
                atomic_write_text(tag_dir / TRAIN_STATE, json.dumps({"format": FORMAT, "parts": states}, indent=2))
                (tag_dir / READERS).touch()
            torch_save(random.state_dict(), tag_dir / random.file(self.env.rank))
            engine.save_checkpoint(str(self.dir), tag=tag_dir.name, save_latest=False)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            if is_collective_failure(e):
                raise  # another rank is gone: not this filesystem's doing (training/loop.py reports it)
            raise self._write_failed(tag_dir, e) from None
        blocked = time.perf_counter() - start
        self.pending = _Pending(tag_dir, step, engine.zero_optimization_stage(), engine.world_size, writer, start,
                                blocked)  # fmt: skip
        if wait or writer is None:
            self.wait()
        return tag_dir

    def poll(self) -> list[dict[str, float]]:
        """Collective, at every step boundary: complete the save in flight once no rank's writer is busy.
        Returns checkpoint/* scalars for each save completed since the last call: its step, the seconds the
        step loop was blocked by it, and the seconds from its start to its marker."""
        p = self.pending
        if p is not None and not all_reduce_sum([float(p.writer.busy())], self.env.device)[0]:
            self._complete()
        done, self.done = self.done, []
        return done

    def wait(self) -> None:
        """Collective: complete the save in flight, if any, waiting for every rank's writer."""
        if self.pending is None:
            return
        start = time.perf_counter()
        if self.pending.writer is not None:
            self.pending.writer.drain()
        self.pending.blocked_s += time.perf_counter() - start
        self._complete()

    def _complete(self) -> None:
        """Collective: the pending save's files made durable on every rank; then rank 0 writes its marker."""
        p, start = self.pending, time.perf_counter()
        self.pending = None
        error = p.writer.take_error() if p.writer is not None else None
        agree_on_error(self._write_failed(p.tag_dir, error) if error else None, self.env.device)
        try:
            sizes = _durable_sizes(p.tag_dir)  # every file this rank sees, fsynced: its own ones among them
        except OSError as e:
            raise self._write_failed(p.tag_dir, e) from None
        views = all_gather_object(sizes)
        if self.env.is_main:
            files: dict[str, int] = {}
            for view in views:  # a writer's own view of its file is the freshest
                for name, size in view.items():
                    files[name] = max(size, files.get(name, 0))
            marker = {
                "step": p.step,
                "zero_stage": p.zero_stage,
                "world_size": p.world_size,
                "tensor_parallel_size": self.tensor_parallel,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "files": dict(sorted(files.items())),
            }
            atomic_write_text(p.tag_dir / COMPLETE, json.dumps(marker, indent=2))
            fsync_dir(self.dir)
            self._prune()
        barrier()
        now = time.perf_counter()
        self.done.append({"checkpoint/step": p.step, "checkpoint/blocked_s": p.blocked_s + now - start,
                          "checkpoint/save_s": now - p.start})  # fmt: skip

    def _writer(self, engine) -> BackgroundWriter | None:
        """The engine's background writer (installed at the first save), or None when saving synchronously."""
        if not self.background:
            return None
        from dist_clm.checkpointing.writer import BackgroundWriter  # (imports DeepSpeed)

        if not isinstance(engine.checkpoint_engine, BackgroundWriter):
            BackgroundWriter.replacing(engine)
        return engine.checkpoint_engine

    def _write_failed(self, tag_dir: Path, error: BaseException) -> UserError:
        free = shutil.disk_usage(self.dir).free
        detail = getattr(error, "strerror", None) or str(error).splitlines()[0][:120]
        return UserError(
            f"could not save checkpoint '{tag_dir}' ({detail}; {_size(free)} free on its filesystem); free "
            "space or fix the filesystem, then rerun: training resumes from the last complete checkpoint."
        )

    def _needs_universal(self, tag_dir: Path) -> bool:
        """ZeRO partitions the optimizer state by rank, and tensor parallelism the model by group rank, so a
        checkpoint written by another number of ranks (or another stage, or tensor-parallel size) cannot be loaded
        as it is; DeepSpeed's universal checkpoint resumes it where it can, the rest is refused in one sentence."""
        marker = read_marker(tag_dir)
        saved_tp = saved_tensor_parallel(tag_dir)
        saved = (marker["world_size"], marker["zero_stage"], saved_tp)
        if saved == (self.env.world_size, self.zero_stage, self.tensor_parallel):
            return False
        stages = (marker["zero_stage"], self.zero_stage)
        if max(saved_tp, self.tensor_parallel) > 1 and (3 in stages or max(stages) == 0):
            was = f"tensor_parallel_size={saved_tp}, {marker['world_size']} ranks, ZeRO-{marker['zero_stage']}"
            raise UserError(
                f"'{tag_dir}' was saved with {was}, and DeepSpeed's universal checkpoint converts tensor-parallel "
                "checkpoints of ZeRO stages 1 and 2 only; resume it with those settings, or export it (`dist-clm "
                "export`) and train on from the export with model.pretrained."
            )
        return saved_tp != self.tensor_parallel or max(stages) > 0

    def _universal(self, tag_dir: Path) -> Path:
        """Collective: `tag_dir/universal`, DeepSpeed's world-size independent form of the checkpoint, made once
        by rank 0 with DeepSpeed's own converter (ds_to_universal) and kept beside the original."""
        import subprocess

        out, problem = tag_dir / UNIVERSAL, None
        if self.env.is_main and not out.is_dir():
            console.info(f"the world size or ZeRO stage changed: converting {tag_dir} to a universal checkpoint")
            with atomic_dir(out, "universal checkpoint conversion") as partial:
                r = subprocess.run(
                    [
                        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                        str(tag_dir), "--output_folder", str(partial), "--num_extract_workers", "1",
                        "--num_merge_workers", "1",
                        "--inject_missing_state",  # a plain data-parallel model: the default info is the right one
                    ],
                    capture_output=True,
                    text=True,
                )  # fmt: skip
                if r.returncode != 0:
                    last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
                    problem = UserError(
                        f"DeepSpeed could not convert '{tag_dir}' to a universal checkpoint ({last}); resume it "
                        "on the world size and ZeRO stage it was saved with."
                    )
                    raise problem
        agree_on_error(problem, self.env.device)  # (the other ranks wait here for the conversion)
        return out

    def _complete_steps(self) -> list[int]:
        """Collective: the steps of the checkpoints every rank sees complete, newest first."""
        mine = [int(p.name[len(PREFIX) :]) for p in complete_checkpoints(self.run_dir)]
        common = set(mine)
        for view in all_gather_object(mine):
            common &= set(view)
        return sorted(common, reverse=True)

    def _check_space(self, tag_dir: Path) -> None:
        """Collective: refuse, on every rank alike, to start a save that cannot fit (the size of the newest
        checkpoint, or the size hint before there is one) instead of failing halfway through it."""
        done = complete_checkpoints(self.run_dir)
        need = _tree_bytes(done[-1]) if done else self.size_hint
        self.dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.dir).free
        problem = None
        if free < need:
            problem = UserError(
                f"not enough space to save checkpoint '{tag_dir}': {_size(free)} free on its filesystem, "
                f"~{_size(need)} needed; free space (or lower checkpoint.keep_last), then rerun: training resumes "
                "from the last complete checkpoint."
            )
        agree_on_error(problem, self.env.device)

    def _prune(self) -> None:
        for old in complete_checkpoints(self.run_dir)[: -self.keep_last]:
            with _exclusive(old) as free:
                if not free:
                    console.warning(f"keeping {old} a while: a reader (eval, generate or export) has it open")
                    continue
                (old / COMPLETE).unlink()  # first un-mark, so a crash mid-delete never leaves a "complete" fragment
                shutil.rmtree(old, ignore_errors=True)
        for partial in self.dir.glob(f"{PREFIX}*"):
            if not (partial / COMPLETE).is_file():  # left by a run killed while saving
                shutil.rmtree(partial, ignore_errors=True)


class RandomState:
    """A rank's random number generators (python, numpy, torch CPU and GPU), for an exact continuation: a part
    saved by every rank in its own file. They continue where the same ranks wrote them; on another number of
    ranks each rank's streams start anew (there is no rank they would belong to)."""

    def __init__(self, env: DistEnv):
        self.env = env

    @staticmethod
    def file(rank: int) -> str:
        return f"random_rank{rank}.pt"

    def state_dict(self) -> dict:
        import random

        import numpy as np
        import torch

        version, internal, gauss = random.getstate()
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state = {  # plain containers, numbers and tensors: torch.load(weights_only=True) reads it back
            "world_size": self.env.world_size,
            "python": [version, list(internal), gauss],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict | None) -> None:
        import random

        import numpy as np
        import torch

        if state is None or state["world_size"] != self.env.world_size:
            return
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


def torch_save(obj, path: Path) -> None:
    import torch

    torch.save(obj, path)


def torch_load(path: Path):
    import torch

    return torch.load(path, weights_only=True)  # runs no code


@contextlib.contextmanager
def _exclusive(tag_dir: Path) -> Iterator[bool]:
    """Whether no reader holds `tag_dir` (an exclusive flock on its READERS file, kept for the block)."""
    try:
        fd = os.open(tag_dir / READERS, os.O_RDONLY)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _damage(tag_dir: Path) -> str | None:
    """What is wrong with a complete checkpoint's files as this rank sees them (missing, or another size
    than its marker lists), or None."""
    for name, size in read_marker(tag_dir).get("files", {}).items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def _durable_sizes(tag_dir: Path) -> dict[str, int]:
    """fsync every file under `tag_dir` (and the directories); their sizes by relative name."""
    fsync_tree(tag_dir)
    return {
        str(p.relative_to(tag_dir)): p.stat().st_size
        for p in tag_dir.rglob("*")
        if p.is_file() and p.name not in (COMPLETE, READERS) and not p.name.startswith(".")  # (temporary files)
    }


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
