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
  download left (its room, its partial file) is removed by the next one that needs room.
- A shard open for reading is never evicted: its reader holds a lease (`Lease`), a shared lock on the open
  file, taken before the shard is renamed into place (it arrives held) or as a cached one is opened; eviction
  probes each shard with a non-blocking exclusive lock and passes over a held one. The lock goes with its
  process (kill -9 included), so a dead reader pins nothing. A reader that opens a shard as it is evicted
  sees it unlinked (through its descriptor) and fetches it again. Each process reading remote data keeps
  one shard open at a time (data/stream.py), so the limit must hold one shard per such process of the node.
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


def check_room_for_readers(readers: int, largest: int) -> None:
    """Through a limited cache, each process reading remote data keeps the shard it reads open, held in the
    cache (data/stream.py): the limit must hold one of the largest shards per reading process of the node, or
    they would wait for each other forever. One sentence if it does not."""
    limit = _CONFIG.limit
    if limit is not None and readers * largest > limit:
        raise UserError(
            f"data.cache_limit ({limit:,} bytes) cannot hold the shards read at once on this node: {readers} "
            f"process{'es' if readers > 1 else ''} (ranks on the node x (data.num_workers + 1)) each keep one "
            f"shard of up to {largest:,} bytes open; raise data.cache_limit to at least {readers * largest:,} bytes."
        )


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


MADE, IN_FLIGHT, HELD_OPEN = "made", "in flight", "held open"  # what making room in the cache came to


class CacheHeld(Exception):
    """A prefetch gives up on a shard: the cache's bytes are held by shards open for reading."""


class Lease:
    """A cached shard open for reading, held in the cache: a shared lock on the open file, which eviction
    respects. The lock is the open file's (its memory maps too), so it lives until `release` or the end of the
    process; a forked child's copy leaves its parent's lock alone."""

    def __init__(self, file, path: Path):
        self.file, self.path, self.pid = file, path, os.getpid()

    @classmethod
    def take(cls, path: Path, name: Path | None = None) -> Lease | None:
        """The lease on the file at `path` (known as `name`, where it is about to be renamed), or None if it is
        not there (or was evicted between its opening and its lock)."""
        try:
            file = open(path, "rb")  # noqa: SIM115 (held open: it is the lease)
        except FileNotFoundError:
            return None
        fcntl.flock(file, fcntl.LOCK_SH)  # (an eviction holds its exclusive lock for an instant only)
        if os.fstat(file.fileno()).st_nlink == 0:  # evicted between the open and the lock
            file.close()
            return None
        return cls(file, name or path)

    def release(self) -> None:
        """Let go: the shard may be evicted now."""
        if self.file.closed:
            return
        if self.pid == os.getpid():  # (unlocking the file a forked child shares would unlock it for its parent)
            fcntl.flock(self.file, fcntl.LOCK_UN)  # (said: a memory map of the file keeps it open, and its lock)
        self.file.close()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


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

    def shard(
        self, split: str, basename: str, size: int, check: Callable[[Path], None] | None, patient: bool = True
    ) -> Lease:
        """A shard file of `size` bytes, open and held in the cache by a lease until released: downloaded if
        missing (and `check`ed before it is put in place); with a cache limit, room is made first, so the cache
        never holds more than the limit. Not `patient` (a prefetch): CacheHeld instead of waiting for readers
        to let go of the shards that fill the cache."""
        local = self.root / split / basename
        while True:
            lease = Lease.take(local)
            if lease is not None:
                os.utime(lease.file.fileno())  # recently used: the last to be evicted
                return lease
            reserve = None if self.config.limit is None else (lambda room: self._reserve(room, size, basename,
                                                                                         patient))  # fmt: skip
            lease = self._fetch(f"{split}/{basename}", local, check=check, fresh=False, reserve=reserve, hold=True)
            if lease is not None:
                return lease
            # (None: it was put in place while this one waited for its download lock; taken above, unless evicted)

    def _fetch(
        self,
        name: str,
        local: Path,
        check: Callable[[Path], None] | None,
        fresh: bool,
        reserve: Callable[[Path], None] | None = None,
        hold: bool = False,
    ) -> Lease | None:
        """Download `name` to `local` unless it is there (or `fresh`); with `hold`, the lease on what was
        downloaded, taken before it is put in place (so eviction never sees it free)."""
        local.parent.mkdir(parents=True, exist_ok=True)
        lock_name = f".{local.name}.lock"
        with open(local.parent / lock_name, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; the others wait, then find it
            try:
                if local.is_file() and not fresh:
                    return None
                for leftover in local.parent.glob(f".{local.name}.*"):  # a killed download's, if any
                    if leftover.name != lock_name:
                        leftover.unlink(missing_ok=True)
                part = local.with_name(f".{local.name}.part")  # what streaming's downloader writes
                if reserve is not None:
                    reserve(local.with_name(f".{local.name}.room"))
                _download(f"{self.url}/{name}", part, "shard" if check else "file")
                if check is not None:
                    check(part)
                size = part.stat().st_size
                lease = Lease.take(part, local) if hold else None
                os.replace(part, local)
                local.with_name(f".{local.name}.room").unlink(missing_ok=True)  # (the shard holds its room now)
                with open(self.root / "downloads.log", "a") as log:  # one line per download, for people and tests
                    log.write(f"{time.time():.3f} {os.getpid()} {name} {size}\n")
                return lease
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _reserve(self, room: Path, size: int, name: str, patient: bool = True) -> None:
        """Make room for `size` more bytes in the cache and hold it with `room`, a sparse file of that size,
        until the shard is in place. Waits while downloads in flight hold every byte, or shards open for
        reading (if `patient`; else CacheHeld)."""
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
                    outcome = self._make_room(size)
                    if outcome == MADE:
                        with open(room, "wb") as f:
                            f.truncate(size)
                        return
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
            if outcome == HELD_OPEN and not patient:
                raise CacheHeld(name)
            time.sleep(0.05)  # every byte is held by downloads in flight (one of them ends soon) or readers

    def _make_room(self, size: int) -> str:
        """Remove the least recently read shards of the whole cache, but those open for reading, until `size`
        more bytes fit beside the rest and the downloads in flight (each counted at its shard's full size; what
        a dead download left is removed): MADE, or what holds the bytes (IN_FLIGHT, HELD_OPEN)."""
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
            return IN_FLIGHT
        total = held + sum(n for _, n, _ in shards)
        for _, n, path in sorted(shards):
            if total + size <= self.config.limit:
                break
            if _evict(path):
                total -= n
        return MADE if total + size <= self.config.limit else HELD_OPEN


def _evict(shard: Path) -> bool:
    """Remove a cached shard unless a reader holds it (its lease); whether it is gone. Removed while this
    holds the exclusive lock, so a reader that opened it meanwhile sees it unlinked once its lease is taken."""
    try:
        fd = os.open(shard, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # open for reading
    else:
        shard.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


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
