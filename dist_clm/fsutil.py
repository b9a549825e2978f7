"""Atomic, durable file-system writes: nothing half-written is ever taken for complete, and what is marked
complete survives a power or node loss.

Durable means what torch's distributed checkpoint and databases do: write under a temporary name, fsync the
file (or every file of a directory, and the directories), rename into place, then fsync the parent directory
so the rename itself is on disk."""

from __future__ import annotations

import errno
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dist_clm import console
from dist_clm.errors import UserError


def refuse_non_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output directory '{out}' already exists and is not empty; choose a new path or remove it.")


@contextmanager
def atomic_dir(out: Path, what: str = "run") -> Iterator[Path]:
    """Yield `.NAME.partial` beside `out`; rename it to `out` only if the block succeeds, else delete it.

    A reader that finds `out` therefore always finds it whole, and durable (every file and directory is
    fsynced before the rename, the parent after it). A process killed inside the block leaves the
    partial directory (with an OWNER pid file): the next writer of `out` removes it, saying so, unless its
    owner is still alive, which it refuses. `what` names the writer in those messages.
    """
    partial = out.with_name(f".{out.name}.partial")
    _claim(partial, out, what)
    owner = partial / "OWNER"
    try:
        yield partial
        owner.unlink()
        fsync_tree(partial)
        if out.exists():
            out.rmdir()  # callers check it is empty first; rename needs it gone
        os.rename(partial, out)
        fsync_dir(out.parent)
    except BaseException:  # an error or Ctrl-C: nothing half-written stays
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _claim(partial: Path, out: Path, what: str) -> None:
    """Make `partial` this process's, atomically: a private directory holding OWNER is renamed to it, and a
    rename onto a directory that has files fails, so of two writers starting together one wins and the
    other is refused (never both, and never one deleting the other's files)."""
    for _ in range(3):
        mine = partial.with_name(f"{partial.name}.{os.getpid()}")
        shutil.rmtree(mine, ignore_errors=True)
        try:
            mine.mkdir(parents=True)
            (mine / "OWNER").write_text(f"{os.getpid()} {socket.gethostname()}\n")
            os.rename(mine, partial)
            return
        except OSError as e:
            shutil.rmtree(mine, ignore_errors=True)
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        try:
            pid = int((partial / "OWNER").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = None
        if pid is not None and pid != os.getpid() and _alive(pid):
            raise UserError(f"another {what} (pid {pid}) is writing '{out}'; wait for it or stop it first.")
        console.warning(f"found '{partial}' left by an interrupted {what}; removing it and starting over")
        shutil.rmtree(partial, ignore_errors=True)
    raise UserError(f"another {what} keeps writing '{out}' at the same time; wait for it or stop it first.")


@contextmanager
def held(path: Path, busy) -> Iterator[None]:
    """An exclusive flock on `path` for the block, naming its holder in the file (the kernel drops the lock when
    the process dies; NFS carries flock to the server); held by another process: UserError(busy(holder))."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            raise UserError(busy(lock.read().strip() or "pid unknown")) from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        yield


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same directory, fsync, rename over `path`, fsync the directory."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """atomic_write_text's bytes."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (files created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every regular file under `root`, then every directory, deepest first."""
    dirs = []
    for here, _, files in os.walk(root):
        dirs.append(Path(here))
        for name in files:
            p = Path(here, name)
            if p.is_file() and not p.is_symlink():
                fsync_file(p)
    for d in reversed(dirs):
        fsync_dir(d)
