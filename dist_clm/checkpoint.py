"""Checkpoints: DeepSpeed engine state + our train state, a completion marker written last, keep-k, export.

    RUN/checkpoints/step_00000100/   DeepSpeed's files (model, optimizer shards, scheduler, client_state)
                                     + config.json (the transformers model config)
                                     + complete.json  <- written last, atomically, after every rank saved

Only a directory holding complete.json is a checkpoint: a run killed while saving leaves a directory
without it, which resume ignores and the next save removes. The tokenizer lives once in RUN/tokenizer.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from pathlib import Path

from dist_clm.errors import UserError
from dist_clm.fsutil import atomic_dir, atomic_write_text, refuse_non_empty

COMPLETE = "complete.json"
PREFIX = "step_"


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob(f"{PREFIX}*") if (p / COMPLETE).is_file())


def save(engine, run_dir: Path, step: int, client_state: dict, model_config, keep_last: int, is_main: bool) -> Path:
    """Collective: every rank writes its shard, then rank 0 marks the checkpoint complete and prunes old ones."""
    from dist_clm.distributed import barrier

    tag = tag_for(step)
    ckdir = checkpoints_dir(run_dir)
    engine.save_checkpoint(str(ckdir), tag=tag, client_state=client_state, save_latest=False)
    _save_rng(ckdir / tag, engine.global_rank)
    barrier()  # every rank's files are on disk before the marker says so
    if is_main:
        model_config.save_pretrained(str(ckdir / tag))
        marker = {
            "step": step,
            "zero_stage": engine.zero_optimization_stage(),
            "world_size": engine.world_size,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_text(ckdir / tag / COMPLETE, json.dumps(marker, indent=2))
        _prune(ckdir, keep_last)
    barrier()
    return ckdir / tag


UNIVERSAL = "universal"


def _save_rng(tag_dir: Path, rank: int) -> None:
    """This rank's random number generators (python, numpy, torch CPU and GPU), for an exact continuation."""
    import random

    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, tag_dir / f"rng_rank{rank}.pt")


def restore_rng(tag_dir: Path, rank: int) -> None:
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


def needs_universal(tag_dir: Path, world_size: int, zero_stage: int) -> bool:
    """Whether resuming from `tag_dir` here needs DeepSpeed's universal checkpoint: ZeRO partitions the
    optimizer state by rank, so a checkpoint written by another number of ranks (or another stage) cannot be
    loaded as it is."""
    marker = json.loads((tag_dir / COMPLETE).read_text())
    saved = (marker["world_size"], marker["zero_stage"])
    return saved != (world_size, zero_stage) and max(marker["zero_stage"], zero_stage) > 0


def universal(tag_dir: Path, is_main: bool) -> Path:
    """Collective: `tag_dir/universal`, DeepSpeed's world-size independent form of the checkpoint, made once
    by rank 0 with DeepSpeed's own converter (ds_to_universal) and kept beside the original."""
    import subprocess
    import sys

    from dist_clm.distributed import barrier

    out = tag_dir / UNIVERSAL
    if is_main and not out.is_dir():
        print(f"the world size or ZeRO stage changed: converting {tag_dir} to a universal checkpoint", file=sys.stderr)
        with atomic_dir(out, "universal checkpoint conversion") as partial:
            r = subprocess.run(
                [
                    sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
                    "--output_folder", str(partial), "--num_extract_workers", "1", "--num_merge_workers", "1",
                    "--inject_missing_state",  # a plain data-parallel model: the default info is the right one
                ],
                capture_output=True,
                text=True,
            )  # fmt: skip
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise UserError(
                    f"DeepSpeed could not convert '{tag_dir}' to a universal checkpoint ({last}); resume it on "
                    f"the world size and ZeRO stage it was saved with."
                )
    barrier()
    return out


def _prune(ckdir: Path, keep_last: int) -> None:
    complete = sorted(p for p in ckdir.glob(f"{PREFIX}*") if (p / COMPLETE).is_file())
    for old in complete[:-keep_last]:
        (old / COMPLETE).unlink()  # first un-mark, so a crash mid-delete never leaves a "complete" fragment
        shutil.rmtree(old, ignore_errors=True)
    for partial in ckdir.glob(f"{PREFIX}*"):
        if not (partial / COMPLETE).is_file():  # left by a run killed while saving
            shutil.rmtree(partial, ignore_errors=True)


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


def run_dir_of(tag_dir: Path) -> Path:
    return tag_dir.parent.parent


def load_state_dict(tag_dir: Path) -> dict:
    """The model's weights from a checkpoint, consolidated in fp32 on the CPU, without GPUs or an engine.

    ZeRO 1-3 keep fp32 master weights partitioned in the optimizer shards; DeepSpeed's own zero_to_fp32
    gathers them. ZeRO 0 keeps the module's own weights in the model-states file.
    """
    import torch

    marker = json.loads((tag_dir / COMPLETE).read_text())
    if marker["zero_stage"] == 0:
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def load_model(path: str | Path):
    """(model in fp32 eval mode, tokenizer, source dir) from a checkpoint, a run, or an exported directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dist_clm.data.tokenizer import load_tokenizer

    p = Path(path)
    if (p / "config.json").is_file() and not (p / COMPLETE).is_file():  # an exported Hugging Face directory
        model = AutoModelForCausalLM.from_pretrained(str(p), attn_implementation="sdpa")
        return model.float().eval(), load_tokenizer(p), p
    tag_dir = resolve(p)
    config = AutoConfig.from_pretrained(str(tag_dir))
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(load_state_dict(tag_dir), strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise UserError(
            f"checkpoint '{tag_dir}' does not match its config.json (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); it was written by another model."
        )
    model.tie_weights()
    tok = load_tokenizer(run_dir_of(tag_dir) / "tokenizer")
    return model.float().eval(), tok, tag_dir


def export(path: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face directory (config, safetensors, tokenizer, generation config) from a checkpoint."""
    model, tok, tag_dir = load_model(path)
    if not (tag_dir / COMPLETE).is_file():
        raise UserError(f"'{tag_dir}' is already an exported Hugging Face directory; copy it instead of exporting.")
    out = Path(out_dir)
    refuse_non_empty(out)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        run_config = run_dir_of(tag_dir) / "config.yaml"
        if run_config.is_file():
            shutil.copy(run_config, tmp / "dist_clm_config.yaml")
        step = json.loads((tag_dir / COMPLETE).read_text())["step"]
        (tmp / "README.md").write_text(
            f"# {out.name}\n\nA causal language model trained with dist_clm ({model.config.model_type}, "
            f"{sum(p.numel() for p in model.parameters()):,} parameters), exported from `{tag_dir}` "
            f"(step {step}).\nThe training configuration is in `dist_clm_config.yaml`.\n"
        )
    return out
