"""A run directory has one owner, and what it holds.

Ownership: rank 0 holds an exclusive `flock` on RUN/.lock for the whole run. The kernel drops it when the
process ends, however it ends (kill -9 included), so a dead holder never blocks the next run. On Linux, flock
on NFS is carried out with POSIX locks by the server (NFSv3 lockd, NFSv4), so it holds between nodes; Lustre
needs its `flock` mount option (the default on current releases). A filesystem that refuses locks is refused
with one sentence rather than trained on unguarded. The file names its holder (host, pid, start time), which
a second trainer is told.

Whether a run may continue the training its directory holds is not decided here but by the parts of the run
(checkpointer.py); `clear` deletes what an earlier run left when run.overwrite=true says to start afresh.
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

from dist_clm import console
from dist_clm.checkpointing.checkpointer import complete_checkpoints
from dist_clm.data.order import SKIPS
from dist_clm.errors import UserError
from dist_clm.parallel.collectives import agree_on_error
from dist_clm.parallel.process_group import DistEnv

LOCK = ".lock"
# what a run leaves in a run directory; run.overwrite=true deletes these (RUN/collectives/ stays: on GPUs NCCL
# dumps into it from the process group's start, and each dump is one rank's, overwritten by the next)
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", SKIPS, "tokenizer", "config.yaml", "ds_config.json",
               "ranks.json", "trackers.json", "wandb", "mlflow.db", "profile", "incidents", "end.json",
               "memory")  # fmt: skip


class RunOwner:
    """Rank 0's hold on the run directory (other ranks hold nothing); `release()` or process exit ends it."""

    def __init__(self, run_dir: Path, fd: int | None):
        self.run_dir, self._fd = run_dir, fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an ended run names no holder (a killed one's name stays, for the next run)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunOwner:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(run_dir: str | Path, env: DistEnv) -> RunOwner:
    """Collective: take the run directory for this run (rank 0 locks it). Every rank raises the same UserError
    when it may not."""
    run_dir = Path(run_dir)
    fd, problem = None, None
    if env.is_main:
        try:
            fd = _lock(run_dir)
        except UserError as e:
            problem = e
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


def holder(run_dir: str | Path) -> str | None:
    """Who trains the run in `run_dir` now (the lock's text: pid, host, since when), or None when no process holds
    its lock (a finished, stopped or never started run)."""
    path = Path(run_dir) / LOCK
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def clear(run_dir: Path, why: str) -> None:
    """run.overwrite=true: delete what an earlier run left in `run_dir` (rank 0) and start afresh."""
    console.info(f"run.overwrite=true: deleting the earlier run in '{run_dir}' ({why}) and starting afresh")
    for name in RUN_OUTPUTS:
        p = run_dir / name
        if p.is_symlink() and p.is_dir():  # e.g. checkpoints/ on other storage: emptied, the link kept
            for child in p.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():  # (a link to nothing, too)
            p.unlink()


def write_run_files(run_dir: str | Path, config: dict, tok, ds_config: dict, world: list[dict]) -> None:
    """Rank 0, once the run is set up: config.yaml (the settled config, as a dict), the tokenizer (kept if it
    is the data's), ds_config.json, ranks.json (every rank's node, local rank and pid)."""
    from dist_clm.data.tokenizer import fingerprint, load_tokenizer

    run_dir = Path(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
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
