"""Prepared data in object storage (s3://, gs://, oci://, ...: what mosaicml-streaming downloads), read through
a bounded node-local cache, and written there by `prepare --out URL`.

A remote prepared directory is mirrored in the cache as `CACHE/<16 hex digits of the URL>/`: its manifest.json,
tokenizer files and each split's index.json are fetched when the data is opened (small); a shard file when it
is first read. Streaming's own downloaders and uploaders move the bytes (its `S3_ENDPOINT_URL` convention and
credentials). Invariants:

- A file in the mirror is whole: it is downloaded to `.NAME.part` (streaming's downloader may write a temporary
  `.NAME.part.*` first), checked (a shard against its size and hash in index.json), and only then renamed into
  place. A kill at any moment leaves only `.NAME.*` files, which the next download of that file removes.
- One download per file per node: a download holds an exclusive lock on `.NAME.lock` beside the file; the other
  ranks of the node that need it wait, then find it in place.
- The shard files under the cache stay within the cache limit at every moment, partial downloads included:
  before a shard is downloaded, room is made for it (the least recently read shards of any mirror removed)
  and held by a sparse `.NAME.room` file of its full size that the others count until the shard is in place,
  all under one node-wide lock held for that bookkeeping only, so downloads run side by side. What a dead
  download left (its room, its partial file) is removed by the next one that needs room. A process still
  reading a removed shard keeps its memory map (the space is freed when it lets go of it).
- A failed download is retried with backoff (`RETRIES` times): then one sentence naming the file and the
  endpoint. A file that is not there is not retried.
- A remote directory is complete only once its manifest.json is there: prepare uploads it last.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dist_clm.errors import DataError, UserError

RETRIES = 4  # after the first try; waits 1, 2, 4, 8 s
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def is_remote(path: str | Path) -> bool:
    """A URL of object storage (scheme://...), not a local path."""
    scheme = str(path).split("://", 1)[0] if "://" in str(path) else ""
    return bool(scheme) and scheme != "file"


def parse_size(text: str | int | None) -> int | None:
    """'20GB' -> 20e9 bytes, '512MiB' -> 512 * 2**20, 0 or None -> None (no limit)."""
    if text in (None, "", 0):
        return None
    if isinstance(text, int):
        return text if text > 0 else None
    m = _SIZE.match(str(text))
    if not m:
        raise UserError(f"data.cache_limit {text!r} is not a size; write it like 20GB, 512MiB or 0 (no limit).")
    scale = (1024 if m.group(3) else 1000) ** " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * scale) or None


@dataclass
class CacheConfig:
    root: Path
    limit: int | None  # bytes of shard files; None: no limit


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIST_CLM_CACHE", Path.home() / ".cache" / "dist_clm" / "data"))


_CONFIG = CacheConfig(default_cache_dir(), None)
_MIRRORS: dict[str, Mirror] = {}


def configure(cache_dir: str | Path | None, cache_limit: str | int | None) -> None:
    """Where remote data is cached on this node, and how many bytes of shards it may hold."""
    global _CONFIG
    _CONFIG = CacheConfig(Path(cache_dir) if cache_dir else default_cache_dir(), parse_size(cache_limit))
    _MIRRORS.clear()


def mirror(url: str) -> Mirror:
    """The node-local mirror of the remote prepared directory `url` (opened once per process)."""
    url = url.rstrip("/")
    if url not in _MIRRORS:
        _MIRRORS[url] = Mirror(url, _CONFIG)
    return _MIRRORS[url]


def local_dir(path: str | Path) -> Path:
    """Where a prepared directory is read on this node: itself, or the mirror of a remote one (its manifest,
    tokenizer and indexes fetched; UserError when it has no manifest, i.e. is not complete)."""
    if not is_remote(path):
        return Path(path)
    m = mirror(str(path))
    try:
        m.manifest_path()
    except FileNotFoundError:
        raise UserError(
            f"'{m.url}' has no manifest.json, so it is not a complete prepared dataset (a prepare that was "
            f"interrupted leaves it so); run `dist-clm prepare --out {m.url}` (again)."
        ) from None
    except ValueError:  # not JSON
        raise DataError(f"'{m.url}/manifest.json' is not a readable manifest; prepare the data again.") from None
    return m.root


def mirror_of(path: str | Path) -> Mirror | None:
    return mirror(str(path)) if is_remote(path) else None


def refuse_complete_remote(url: str) -> None:
    """`prepare --out URL` never overwrites complete data: refused when URL/manifest.json exists. (Leftovers of
    an interrupted prepare, with no manifest, are overwritten by the next one.)"""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            _download(f"{url}/manifest.json", Path(tmp) / "manifest.json", "file")
        except FileNotFoundError:
            return
    raise UserError(f"'{url}' already holds a complete prepared dataset (its manifest.json); choose another --out.")


def upload_last(local: Path, url: str, names: list[str], manifest: str, rerun: str = "run the same prepare again to "
                "restart") -> None:  # fmt: skip
    """Upload `names` (relative to `local`) to `url`, then `manifest`: the mark that the data is complete."""
    from streaming.base.storage import CloudUploader

    quiet = logging.getLogger("streaming.base.storage.upload")  # (it warns that `local` is not empty: it is ours)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        uploader = CloudUploader.get(out=(str(local), url), keep_local=True, exist_ok=True)
        quiet.setLevel(level)
        for name in [*names, manifest]:
            uploader.upload_file(name)
    except Exception as e:  # noqa: BLE001 (each storage library raises its own types)
        raise UserError(
            f"uploading to '{url}' failed ({type(e).__name__}: {str(e).strip()[:200]}); {manifest} was not uploaded, "
            f"so nothing takes what was for complete: {rerun}."
        ) from None
    finally:
        quiet.setLevel(level)


# streaming's downloader per (process, scheme), kept with its client: `CloudDownloader.direct_download` makes a
# new client per file (~0.1 s of CPU, and new connections: a round trip or more to a distant bucket). Shared by
# the threads of a process (an S3 client is thread-safe); a forked loader worker makes its own.
_DOWNLOADERS: dict[tuple[int, str], object] = {}
_DOWNLOADERS_LOCK = threading.Lock()


def _downloader(remote: str, fresh: bool = False):
    from streaming.base.storage import CloudDownloader

    key = (os.getpid(), remote.split("://", 1)[0])
    with _DOWNLOADERS_LOCK:
        if fresh or key not in _DOWNLOADERS:
            _DOWNLOADERS[key] = CloudDownloader.get(remote)  # (its client is made by its first download; two
            # threads racing there make one each, both good)
        return _DOWNLOADERS[key]


def _download(remote: str, local: Path, what: str) -> None:
    """`remote` to `local` with streaming's downloader, retried with backoff; FileNotFoundError if absent."""
    for attempt in range(RETRIES + 1):
        try:
            _downloader(remote, fresh=attempt > 0).download(remote, str(local), timeout=120)  # a retry: new client
            return
        except Exception as e:  # noqa: BLE001 (each storage library raises its own types)
            if _not_found(e):
                raise FileNotFoundError(remote) from None
            if attempt == RETRIES:
                endpoint = os.environ.get("S3_ENDPOINT_URL")
                raise DataError(
                    f"could not download {what} '{remote}' after {RETRIES + 1} tries (last error: "
                    f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}); "
                    f"check that the storage{f' at {endpoint}' if endpoint else ''} is reachable and rerun."
                ) from None
            local.unlink(missing_ok=True)
            time.sleep(2**attempt)


def _not_found(e: BaseException) -> bool:
    if isinstance(e, FileNotFoundError):
        return True
    code = getattr(e, "response", {}).get("Error", {}).get("Code") if hasattr(e, "response") else None
    return code in ("404", "NoSuchKey", "NoSuchBucket")


class Mirror:
    """The node-local copy of one remote prepared directory, filled on demand (see the module's invariants)."""

    def __init__(self, url: str, config: CacheConfig):
        self.url, self.config = url, config
        self.root = config.root / hashlib.sha256(url.encode()).hexdigest()[:16]
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "SOURCE").write_text(url + "\n")  # which URL this mirror holds, for people
        self._manifest: dict | None = None

    def manifest_path(self) -> Path:
        """manifest.json, fetched anew when the mirror is first used in this process (it may have been
        prepared again), then the tokenizer and index files it names. FileNotFoundError: not complete."""
        if self._manifest is None:
            local = self.root / "manifest.json"
            self._fetch("manifest.json", local, check=None, fresh=True)
            manifest = json.loads(local.read_bytes())
            self._manifest = manifest
            # (a manifest of another format names no files here: reading it refuses it, data.format.read_manifest)
            names = manifest.get("tokenizer", {}).get("files", []) if isinstance(manifest, dict) else []
            for name in names:
                try:
                    self._fetch(f"tokenizer/{name}", self.root / "tokenizer" / name, check=None, fresh=True)
                except FileNotFoundError:
                    raise DataError(f"'{self.url}/tokenizer/{name}' is missing; prepare the data again.") from None
            for split in manifest.get("splits", {}) if isinstance(manifest, dict) else ():
                self._fetch(f"{split}/index.json", self.root / split / "index.json", check=None, fresh=True)
        return self.root / "manifest.json"

    def file(self, name: str, check: Callable[[Path], None] | None = None, fresh: bool = False) -> Path:
        """The local copy of the remote file `name` (relative to the directory), downloaded if missing or `fresh`,
        `check`ed before it is put in place. FileNotFoundError: the remote has no such file."""
        local = self.root / name
        self._fetch(name, local, check=check, fresh=fresh)
        return local

    def shard(self, split: str, basename: str, size: int, check: Callable[[Path], None]) -> Path:
        """The local path of a shard file of `size` bytes, downloaded if missing (and `check`ed before it is put
        in place); with a cache limit, room is made first, so the cache never holds more than the limit."""
        local = self.root / split / basename
        if local.is_file():
            os.utime(local)  # recently used: the last to be evicted
            return local
        reserve = None if self.config.limit is None else (lambda part: self._reserve(part, size, basename))
        self._fetch(f"{split}/{basename}", local, check=check, fresh=False, reserve=reserve)
        return local

    def _fetch(
        self,
        name: str,
        local: Path,
        check: Callable[[Path], None] | None,
        fresh: bool,
        reserve: Callable[[Path], None] | None = None,
    ) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        lock_name = f".{local.name}.lock"
        with open(local.parent / lock_name, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; the others wait, then find it
            try:
                if local.is_file() and not fresh:
                    return
                for leftover in local.parent.glob(f".{local.name}.*"):  # a killed download's, if any
                    if leftover.name != lock_name:
                        leftover.unlink(missing_ok=True)
                part = local.with_name(f".{local.name}.part")  # what streaming's downloader writes
                if reserve is not None:
                    reserve(local.with_name(f".{local.name}.room"))
                _download(f"{self.url}/{name}", part, "shard" if check else "file")
                if check is not None:
                    check(part)
                os.replace(part, local)
                local.with_name(f".{local.name}.room").unlink(missing_ok=True)  # (the shard holds its room now)
                with open(self.root / "downloads.log", "a") as log:  # one line per download, for people and tests
                    log.write(f"{time.time():.3f} {os.getpid()} {name} {local.stat().st_size}\n")
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _reserve(self, room: Path, size: int, name: str) -> None:
        """Make room for `size` more bytes in the cache and hold it with `room`, a sparse file of that size,
        until the shard is in place. Waits while downloads in flight hold every byte."""
        limit = self.config.limit
        if size > limit:
            raise UserError(
                f"data.cache_limit ({limit:,} bytes) cannot hold the shard '{name}' of '{self.url}' ({size:,} "
                "bytes); raise data.cache_limit to a few shards at least."
            )
        while True:
            with open(self.config.root / ".evict.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # the cache's bookkeeping, one process at a time on a node
                try:
                    if self._make_room(size):
                        with open(room, "wb") as f:
                            f.truncate(size)
                        return
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
            time.sleep(0.05)  # every byte is held by downloads in flight: one of them ends soon

    def _make_room(self, size: int) -> bool:
        """Remove the least recently read shards of the whole cache until `size` more bytes fit beside the
        rest and the downloads in flight (each counted at its shard's full size; what a dead download left is
        removed); False if they cannot."""
        shards, held = [], 0
        # (a merged dataset's shards lie one folder deeper: SPLIT/part-NNNNN/shard.*)
        for path in [*self.config.root.glob("*/*/*shard.*"), *self.config.root.glob("*/*/*/*shard.*")]:
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if path.name.startswith("shard."):
                shards.append((st.st_mtime, st.st_size, path))
            elif path.name.endswith(".room"):
                if _in_flight(path):
                    held += st.st_size
                else:  # its download died (kill -9): its room and partial files go
                    for leftover in path.parent.glob(path.name.removesuffix(".room") + ".*"):
                        if not leftover.name.endswith(".lock"):
                            leftover.unlink(missing_ok=True)
        if held + size > self.config.limit:  # downloads in flight hold it: wait, keeping what is cached
            return False
        total = held + sum(n for _, n, _ in shards)
        for _, n, path in sorted(shards):
            if total + size <= self.config.limit:
                break
            path.unlink(missing_ok=True)
            total -= n
        return total + size <= self.config.limit


def _in_flight(room: Path) -> bool:
    """Whether the download that holds `.NAME.room` is alive: its `.NAME.lock` is locked."""
    try:
        fd = os.open(room.with_name(room.name.removesuffix(".room") + ".lock"), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # (closing drops the lock if it was taken here)
    return False
