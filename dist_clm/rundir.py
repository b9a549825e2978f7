"""A run directory has one owner, and a run that resumes in it continues the same training.

Ownership: rank 0 holds an exclusive `flock` on RUN/.lock for the whole run. The kernel drops it when the
process ends, however it ends (kill -9 included), so a dead holder never blocks the next run. On Linux, flock
on NFS is carried out with POSIX locks by the server (NFSv3 lockd, NFSv4), so it holds between nodes; Lustre
needs its `flock` mount option (the default on current releases). A filesystem that refuses locks is refused
with one sentence rather than trained on unguarded. The file names its holder (host, pid, start time), which
a second trainer is told.

Continuity, checked before anything is written: when the directory holds checkpoints, the new run must be the
same training. The settings that change the math (model, data shape, mixture, optimizer, schedule shape,
precision, seed) must equal RUN/config.yaml's; the data must be what the newest checkpoint was trained on
(each source's tokenizer and token counts: a fingerprint, not a path, so a moved directory still resumes);
the global batch (blocks per step) must be the checkpoint's. `train.resume=false` in a directory with
checkpoints is refused too. `run.overwrite=true` deletes what a different run left (checkpoints, metrics,
TensorBoard files, skips) and starts afresh; a resume of the same training is never touched by it. Free
choices stay free: train.max_steps (to extend a run), the ZeRO stage and the number of ranks (elastic
resume), intervals, logging, offload, compilation.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

import yaml

from dist_clm.checkpoint import SKIPS, complete_checkpoints, read_train_state
from dist_clm.config import Config
from dist_clm.data.loader import Source
from dist_clm.distributed import DistEnv, agree_on_error
from dist_clm.errors import UserError
from dist_clm.metrics import say

LOCK = ".lock"

# config keys whose change makes a resumed run another training (see the module docstring)
MATH_KEYS = (
    "model.preset", "model.pretrained", "model.overrides",
    "data.block_size", "data.document_mask", "data.shuffle",
    "train.seed", "train.lr", "train.min_lr_ratio", "train.warmup_steps", "train.schedule", "train.decay_fraction",
    "train.weight_decay", "train.beta1", "train.beta2", "train.eps", "train.grad_clip", "train.precision",
)  # fmt: skip
# what a different run leaves in a run directory; run.overwrite=true deletes these
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", SKIPS, "tokenizer", "config.yaml", "ds_config.json",
               "ranks.json")  # fmt: skip


def data_fingerprint(sources: list[Source]) -> list[dict]:
    """What identifies the training data: per source, its weight, tokenizer and token stream's shape."""
    out = []
    for s in sources:
        m = s.manifest
        splits = {k: [v["documents"], v["tokens"], v["chunks"]] for k, v in sorted(m["splits"].items())}
        out.append({"weight": s.weight, "tokenizer": m["tokenizer"]["fingerprint"],
                    "chunk_tokens": m["chunk_tokens"], "splits": splits})  # fmt: skip
    return out


class RunOwner:
    """Rank 0's hold on the run directory (other ranks hold nothing); `release()` or process exit ends it."""

    def __init__(self, run_dir: Path, fd: int | None):
        self.run_dir, self._fd = run_dir, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunOwner:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(cfg: Config, env: DistEnv, sources: list[Source], global_batch: int) -> RunOwner:
    """Collective: take the run directory for this run (rank 0 locks it) and check that resuming in it
    continues the same training. Every rank raises the same UserError when it may not."""
    run_dir = Path(cfg.run.dir)
    fd, problem = None, None
    if env.is_main:
        try:
            fd = _lock(run_dir)
            _check_continuity(cfg, run_dir, sources, global_batch)
        except UserError as e:
            problem = e
            if fd is not None:
                os.close(fd)
                fd = None
    agree_on_error(problem, env.device)
    return RunOwner(run_dir, fd)


def _lock(run_dir: Path) -> int:
    """RUN/.lock, exclusively locked by this process; its text names the holder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UserError(
                f"run directory '{run_dir}' is in use by {holder}; wait for that run to end or stop it, or "
                "choose another run.dir."
            ) from None
        raise UserError(
            f"cannot lock '{path}' ({e.strerror}): its filesystem does not support file locks, so two trainers "
            "could write one run; put run.dir on a filesystem with locking (e.g. Lustre mounted with -o flock)."
        ) from None
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} (since {started})".encode(), 0)
    return fd


def _check_continuity(cfg: Config, run_dir: Path, sources: list[Source], global_batch: int) -> None:
    done = complete_checkpoints(run_dir)
    if not done:
        return
    fresh = "choose a new run.dir, or set run.overwrite=true to delete its checkpoints and start afresh"
    if not cfg.train.resume:
        if cfg.run.overwrite:
            return _overwrite(run_dir, "train.resume=false")
        raise UserError(
            f"train.resume=false but run directory '{run_dir}' holds checkpoints (the newest: {done[-1].name}); "
            f"{fresh}."
        )
    differences = _math_differences(run_dir, cfg)
    state = read_train_state(done[-1])
    if state.data is not None and state.data != data_fingerprint(sources):
        differences.append("the training data (tokenizer, sources, weights or token counts)")
    if state.global_batch is not None and state.global_batch != global_batch:
        differences.append(f"the global batch ({state.global_batch} -> {global_batch} blocks per step)")
    if not differences:
        return
    if cfg.run.overwrite:
        return _overwrite(run_dir, "; ".join(differences))
    raise UserError(
        f"run directory '{run_dir}' holds checkpoints of another training ({'; '.join(differences)}); resume "
        f"with the same settings, {fresh}."
    )


def _math_differences(run_dir: Path, cfg: Config) -> list[str]:
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return []
    saved, now = _flat(yaml.safe_load(saved_path.read_text()) or {}), _flat(cfg.to_dict())
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in MATH_KEYS if saved.get(k) != now.get(k)]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name != "model.overrides":
            out |= _flat(value, f"{name}.")
        else:
            out[name] = value
    return out


def _overwrite(run_dir: Path, why: str) -> None:
    say(True, f"run.overwrite=true: deleting the earlier run in '{run_dir}' ({why}) and starting afresh")
    for name in RUN_OUTPUTS:
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def write_run_files(cfg: Config, tok, ds_config: dict, world: list[dict]) -> None:
    """Rank 0, once the run is set up: config.yaml, the tokenizer (kept if it is the data's), ds_config.json,
    ranks.json (every rank's node, local rank and pid)."""
    from dist_clm.data.tokenizer import fingerprint, load_tokenizer

    run_dir = Path(cfg.run.dir)
    cfg.save(run_dir / "config.yaml")
    tok_dir = run_dir / "tokenizer"
    if (
        tok_dir.is_dir()
        and not complete_checkpoints(run_dir)
        and fingerprint(load_tokenizer(tok_dir)) != fingerprint(tok)
    ):
        shutil.rmtree(tok_dir)  # left by an earlier start that saved no checkpoint
    if not tok_dir.is_dir():
        tok.save_pretrained(str(tok_dir))
    (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    (run_dir / "ranks.json").write_text(json.dumps(world, indent=1))
