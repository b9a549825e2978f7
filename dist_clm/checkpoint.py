"""Training checkpoints: what a run saves, how it resumes, and the record of data windows skipped by rollbacks.

    RUN/checkpoints/step_00000100/   DeepSpeed's files (model, optimizer shards, scheduler, client_state =
                                     the TrainState: step, tokens seen, the loader's position)
                                     + rng_rank{r}.pt (each rank's random generators)
                                     + config.json (the transformers model config)
                                     + complete.json  <- written last, atomically, after every rank saved
    RUN/skips.json                   data windows skipped after rollbacks (a resume skips them again)

Only a directory holding complete.json is a checkpoint: a run killed while saving leaves a directory without
it, which resume ignores and the next save removes. The tokenizer lives once in RUN/tokenizer.

`Checkpointer` is the one place that decides how a run continues: which checkpoint (the newest complete
one), whether it goes through DeepSpeed's universal checkpoint (written by another number of ranks or
another ZeRO stage), and whether each rank's random generators come back (only when the same ranks wrote
them). Loading weights for inference and exporting live in export.py.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dist_clm.distributed import DistEnv, barrier
from dist_clm.errors import UserError
from dist_clm.fsutil import atomic_dir, atomic_write_text
from dist_clm.metrics import say

COMPLETE = "complete.json"
PREFIX = "step_"
UNIVERSAL = "universal"
SKIPS = "skips.json"


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def run_dir_of(tag_dir: Path) -> Path:
    """The run directory a checkpoint directory belongs to."""
    return tag_dir.parent.parent


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
        raise UserError(f"'{p}' holds no complete checkpoint; train with train.save_every > 0 or point at another run.")
    return found[-1]


@dataclass
class TrainState:
    """What a checkpoint carries besides the engine: where the run stands at a step boundary."""

    step: int = 0  # optimizer steps applied or skipped (a rollback sets it back)
    tokens_seen: int = 0  # training tokens of those steps (skipped data windows are not counted)
    loader: dict | None = None  # TrainLoader.state_dict(): the global blocks consumed (None: the start)

    def advance(self, tokens: int, loader_state: dict) -> None:
        """One more optimizer step of `tokens` tokens; the loader now stands at `loader_state`."""
        self.step += 1
        self.tokens_seen += tokens
        self.loader = loader_state

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "loader": self.loader}

    @classmethod
    def from_state_dict(cls, state: dict) -> TrainState:
        return cls(step=state["step"], tokens_seen=state["tokens_seen"], loader=dict(state["loader"]))


class Checkpointer:
    """Saves and restores a run's checkpoints, for this rank; keeps the last `keep_last` complete ones."""

    def __init__(self, run_dir: str | Path, keep_last: int, env: DistEnv, zero_stage: int):
        self.run_dir, self.dir = Path(run_dir), checkpoints_dir(run_dir)
        self.keep_last, self.env, self.zero_stage = keep_last, env, zero_stage

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        done = complete_checkpoints(self.run_dir)
        return done[-1] if done else None

    def save(self, engine, state: TrainState, model_config) -> Path:
        """Collective: every rank writes its shard and generators, then rank 0 marks the checkpoint complete
        and prunes old ones."""
        tag = tag_for(state.step)
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=state.state_dict(), save_latest=False)
        _save_rng(self.dir / tag, self.env.rank)
        barrier()  # every rank's files are on disk before the marker says so
        if self.env.is_main:
            model_config.save_pretrained(str(self.dir / tag))
            marker = {
                "step": state.step,
                "zero_stage": engine.zero_optimization_stage(),
                "world_size": engine.world_size,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            atomic_write_text(self.dir / tag / COMPLETE, json.dumps(marker, indent=2))
            self._prune()
        barrier()
        return self.dir / tag

    def restore(self, engine, tag_dir: Path) -> TrainState:
        """Collective: load a complete checkpoint into the engine (directly, or through DeepSpeed's universal
        checkpoint when it was written by another number of ranks or ZeRO stage), put back this rank's random
        generators when the same ranks wrote them, and return the train state with the loader moved past
        every data window a rollback skipped from there."""
        elastic = self._needs_universal(tag_dir)
        # DeepSpeed reads this flag at every load_checkpoint and has no public setter; a run may load both
        # kinds (an elastic resume, then a rollback to a checkpoint of its own)
        engine._config.load_universal_checkpoint = elastic
        where = self._universal(tag_dir) if elastic else tag_dir
        _, client = engine.load_checkpoint(str(where.parent), tag=where.name)
        if elastic and self.zero_stage == 3:
            say(
                self.env.is_main,
                "warning: DeepSpeed's universal checkpoint restores ZeRO-3 weights exactly, but the optimizer "
                "state is approximate (losses drift ~5e-4 relative from an uninterrupted run); data and step "
                "count continue exactly",
            )
        if not elastic:  # each rank continues its own random streams (dropout); on other ranks they start anew
            _restore_rng(tag_dir, self.env.rank)
        state = TrainState.from_state_dict(client)
        state.loader["blocks_consumed"] = self.past_skipped(state.loader["blocks_consumed"])
        return state

    def record_skip(self, start: int, end: int, at_step: int, reason: str) -> None:
        """Remember (in RUN/skips.json) that training blocks [start, end) were skipped after a rollback, so that
        a resume from a checkpoint at `start` skips them again instead of replaying the data that diverged."""
        if not self.env.is_main:
            return
        path = self.run_dir / SKIPS
        skips = json.loads(path.read_text()) if path.is_file() else []
        skips.append({"from_block": start, "to_block": end, "diverged_at_step": at_step, "reason": reason})
        atomic_write_text(path, json.dumps(skips, indent=2))

    def past_skipped(self, blocks_consumed: int) -> int:
        """The loader position to continue from: `blocks_consumed`, moved past every skipped window starting
        there."""
        path = self.run_dir / SKIPS
        if not path.is_file():
            return blocks_consumed
        ends = {s["from_block"]: s["to_block"] for s in json.loads(path.read_text())}  # the latest record wins
        while blocks_consumed in ends and ends[blocks_consumed] > blocks_consumed:
            blocks_consumed = ends[blocks_consumed]
        return blocks_consumed

    def _needs_universal(self, tag_dir: Path) -> bool:
        """ZeRO partitions the optimizer state by rank, so a checkpoint written by another number of ranks (or
        another stage) cannot be loaded as it is."""
        marker = read_marker(tag_dir)
        saved = (marker["world_size"], marker["zero_stage"])
        return saved != (self.env.world_size, self.zero_stage) and max(marker["zero_stage"], self.zero_stage) > 0

    def _universal(self, tag_dir: Path) -> Path:
        """Collective: `tag_dir/universal`, DeepSpeed's world-size independent form of the checkpoint, made once
        by rank 0 with DeepSpeed's own converter (ds_to_universal) and kept beside the original."""
        import subprocess
        import sys

        out = tag_dir / UNIVERSAL
        if self.env.is_main and not out.is_dir():
            print(
                f"the world size or ZeRO stage changed: converting {tag_dir} to a universal checkpoint",
                file=sys.stderr,
            )
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
                    raise UserError(
                        f"DeepSpeed could not convert '{tag_dir}' to a universal checkpoint ({last}); resume it "
                        "on the world size and ZeRO stage it was saved with."
                    )
        barrier()
        return out

    def _prune(self) -> None:
        for old in complete_checkpoints(self.run_dir)[: -self.keep_last]:
            (old / COMPLETE).unlink()  # first un-mark, so a crash mid-delete never leaves a "complete" fragment
            shutil.rmtree(old, ignore_errors=True)
        for partial in self.dir.glob(f"{PREFIX}*"):
            if not (partial / COMPLETE).is_file():  # left by a run killed while saving
                shutil.rmtree(partial, ignore_errors=True)


def _save_rng(tag_dir: Path, rank: int) -> None:
    """This rank's random number generators (python, numpy, torch CPU and GPU), for an exact continuation."""
    import random

    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, tag_dir / f"rng_rank{rank}.pt")


def _restore_rng(tag_dir: Path, rank: int) -> None:
    """Put back what _save_rng saved for `rank` (checkpoints from before it existed have none: skipped)."""
    import random

    import numpy as np
    import torch

    path = tag_dir / f"rng_rank{rank}.pt"
    if not path.is_file():
        return
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
