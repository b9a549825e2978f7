"""A prepare in parts: one corpus tokenized by N tasks (any scheduler: a SLURM array, a Kubernetes indexed job,
a shell loop), then merged into one prepared dataset. This module owns the layout under OUT (a shared
directory or a bucket prefix), the job's record, each part's completion marker and heartbeat, and the status.

    parts/job.json            the job: N, the settings that shape the output, the inputs (count, bytes, digest);
                              written by the first task, every later task checks it is the same job
    parts/progress-NNNNN.json task NNNNN's heartbeat: its stage, host, pid, bytes read, records, tokens; failed
                              with the sentence that ended it
    parts/hash-NNNNN.*        --dedup: the task's record hashes, partitioned by hash into N sections (.bin), and
    parts/dedup-NNNNN.*       task NNNNN's decisions for hash section NNNNN: which records of each part are
                              duplicates of an earlier one (dedup.py); the .json is the marker
    train/part-NNNNN/, val/part-NNNNN/   the part's MDS shards and their index.json
    parts/part-NNNNN/tokenizer/          the tokenizer as the part used it
    parts/part-NNNNN.json     the part's completion marker, written last (fsynced; in a bucket: uploaded last):
                              its settings, tokenizer fingerprint, figures and its shard files' names and sizes

A marker is the only sign that a stage of a part is complete: a task that finds its marker skips the work, one
that does not removes what an earlier attempt left and does it all again. The merge (merge.py) reads the
markers and writes the dataset's own train/index.json, val/index.json, tokenizer/ and, last, manifest.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from dataclasses import dataclass

from dist_clm.console import duration
from dist_clm.data.store import Store
from dist_clm.errors import UserError

STAGES = ("hash", "dedup", "tokenize")
STALE_S = 90  # a heartbeat older than this: the task stopped without a word (killed, its node lost)
# the options that shape the output: a part written with others is not part of the same dataset
SETTINGS = ("fmt", "text_column", "val_fraction", "dedup", "chunk_tokens", "shard_bytes", "compression",
            "block_size", "chat_template", "dataset", "dataset_config", "split")  # fmt: skip


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def marker(stage: str, index: int) -> str:
    return f"parts/{part_name(index)}.json" if stage == "tokenize" else f"parts/{stage}-{index:05d}.json"


def progress_name(index: int) -> str:
    return f"parts/progress-{index:05d}.json"


def settings_of(o) -> dict:
    return {k: getattr(o, k) for k in SETTINGS}


def inputs_record(files: dict) -> dict:
    """What identifies the inputs: their names and sizes, in order (a digest), their count and bytes."""
    h = hashlib.sha256()
    for name, size in files.items():
        h.update(f"{name}\0{size}\n".encode())
    return {"count": len(files), "bytes": sum(files.values()), "digest": h.hexdigest()[:16]}


def check_job(st: Store, job: dict) -> None:
    """Record the job under OUT, or check that OUT's job is this one (the same N, settings and inputs)."""
    known = st.read_json("parts/job.json")
    if known is None:
        if st.read_json("manifest.json") is not None:
            raise UserError(f"'{st.url}' already holds a complete prepared dataset (its manifest.json); choose "
                            "another --out.")  # fmt: skip
        from dist_clm.data.store import LocalStore

        ours = {"parts", "train", "val", "tokenizer"}
        if isinstance(st, LocalStore) and st.root.is_dir() and any(p.name not in ours for p in st.root.iterdir()):
            raise UserError(f"output directory '{st.url}' holds other files; give a prepare in parts a new or empty "
                            "--out.")  # fmt: skip
        st.write_json("parts/job.json", job)
        return
    for key in ("tasks", "settings", "inputs"):
        if known.get(key) != job.get(key):
            theirs, ours = known.get(key), job.get(key)
            if isinstance(theirs, dict) and isinstance(ours, dict):
                diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
                what = f"{key} ({', '.join(f'{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here' for k in diff)})"
            else:
                what = f"{key} ({theirs!r} there, {ours!r} here)"
            raise UserError(f"'{st.url}' holds parts of another prepare: its {what} differ; use the same options "
                            "and inputs as that prepare, or another --out.")  # fmt: skip


@contextlib.contextmanager
def task_lock(st: Store, index: int, tasks: int):
    """One writer per part at a time on a local (shared) OUT: an exclusive lock held while the task runs (the
    kernel drops it when the process dies; NFS carries flock to the server). A bucket has no lock: a scheduler
    runs one attempt of a task at a time."""
    from dist_clm.data.store import LocalStore

    if not isinstance(st, LocalStore):
        yield
        return
    from dist_clm.fsutil import held

    def busy(holder: str) -> str:
        return (
            f"part {index} of {tasks} under '{st.url}' is being written by another task ({holder}); wait for "
            "it or stop it first."
        )

    with held(st.root / "parts" / f".task-{index:05d}.lock", busy):
        yield


class Heartbeat:
    """A task's progress under OUT, written every `every` seconds by a thread (and at its end), so that
    `dist-clm data status` sees it from any machine that sees OUT."""

    def __init__(self, st: Store, stage: str, index: int, tasks: int, total_bytes: int, every: float = 5.0):
        self.st, self.name, self.every = st, progress_name(index), every
        self.state = {"stage": stage, "task": index, "tasks": tasks, "host": socket.gethostname(),
                      "pid": os.getpid(), "started": time.time(), "state": "running", "bytes_total": total_bytes,
                      "bytes_done": 0, "records": 0, "tokens": 0}  # fmt: skip
        self._stop = threading.Event()
        self._write()
        self._thread = threading.Thread(target=self._run, daemon=True, name="dist-clm-heartbeat")
        self._thread.start()

    def advance(self, nbytes: int = 0, records: int = 0, tokens: int = 0) -> None:
        self.state["bytes_done"] += nbytes
        self.state["records"] += records
        self.state["tokens"] += tokens

    def _write(self) -> None:
        self.state["updated"] = time.time()
        with contextlib.suppress(OSError, UserError):  # a heartbeat is for people: a failed one stops nothing
            self.st.write_json(self.name, dict(self.state))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._write()

    def end(self, state: str, error: str | None = None) -> None:
        self._stop.set()
        self._thread.join()
        self.state["state"] = state
        if error:
            self.state["error"] = error
        self._write()


@dataclass
class TaskStatus:
    index: int
    state: str  # done, running, failed, stopped (no heartbeat for STALE_S), waiting
    stage: str = ""
    detail: str = ""
    tokens: int = 0
    bytes_done: int = 0
    started: float = 0.0


def status(st: Store, now: float | None = None) -> tuple[dict, list[TaskStatus], dict | None]:
    """(the job, each task's state in the stage it is at, the merged manifest or None)."""
    now = time.time() if now is None else now
    job = st.read_json("parts/job.json")
    if job is None:
        raise UserError(f"'{st.url}' holds no prepare in parts (no parts/job.json); start one with `dist-clm prepare "
                        f"... --out {st.url} --tasks N`.")  # fmt: skip
    stages = [s for s in STAGES if job["settings"]["dedup"] or s == "tokenize"]
    files = set(st.names("parts"))

    def one(i: int) -> TaskStatus:
        beat = st.read_json(progress_name(i)) or {}
        stage = next((s for s in stages if marker(s, i).removeprefix("parts/") not in files), None)
        if stage is None:
            done = st.read_json(marker("tokenize", i)) or {}
            tokens = sum(s["tokens"] for s in done.get("splits", {}).values())
            return TaskStatus(i, "done", "tokenize", tokens=tokens, bytes_done=job["task_bytes"][i],
                              started=beat.get("started", 0.0))  # fmt: skip
        if beat.get("stage") != stage:
            return TaskStatus(i, "waiting", stage)
        t = TaskStatus(i, beat.get("state", "running"), stage, tokens=beat.get("tokens", 0),
                       bytes_done=beat.get("bytes_done", 0), started=beat.get("started", 0.0))  # fmt: skip
        where = f"{beat.get('host')} pid {beat.get('pid')}"
        if t.state == "failed":
            t.detail = f"{where}: {beat.get('error', 'no reason recorded')}"
        elif t.state == "running" and now - beat.get("updated", 0) > STALE_S:
            t.state, t.detail = "stopped", f"{where}, no heartbeat for {now - beat.get('updated', 0):.0f} s (killed?)"
        else:
            t.detail = where
        return t

    return job, st.map(one, range(job["tasks"])), st.read_json("manifest.json")


def describe_status(st: Store) -> str:
    job, tasks, manifest = status(st)
    n = job["tasks"]
    counts = {s: sum(t.state == s for t in tasks) for s in ("done", "running", "stopped", "failed", "waiting")}
    lines = [f"{st.url}: a prepare in {n} parts of {job['inputs']['count']} inputs ({job['inputs']['bytes']:,} bytes)"
             + (" with --dedup" if job["settings"]["dedup"] else "")]  # fmt: skip
    lines.append("parts: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    tokens = sum(t.tokens for t in tasks if t.stage == "tokenize")
    lines.append(f"tokens so far: {tokens:,}")
    for t in tasks:
        if t.state != "done":
            lines.append(f"  part {t.index}: {t.state} ({t.stage})" + (f" - {t.detail}" if t.detail else ""))
    if manifest is not None:
        lines.append(f"merged: {st.url}/manifest.json ({sum(s['tokens'] for s in manifest['splits'].values()):,} "
                     "tokens)")  # fmt: skip
        return "\n".join(lines)
    left = time_left(job, tasks)
    if counts["done"] == n:
        lines.append(f"every part is done: merge with `dist-clm prepare --merge {st.url}`")
    elif left is not None:
        lines.append(f"time left: about {duration(left)} at the rate so far")
    return "\n".join(lines)


def time_left(job: dict, tasks: list[TaskStatus], now: float | None = None) -> float | None:
    """Seconds until every part is tokenized at the rate so far (bytes read per second since the first task
    started its tokenize stage, over all tasks), None before any progress."""
    now = time.time() if now is None else now
    tok = [t for t in tasks if t.stage == "tokenize" and t.started]
    done = sum(t.bytes_done for t in tok)
    if not tok or done <= 0:
        return None
    rate = done / max(1e-3, now - min(t.started for t in tok))
    return max(0.0, (job["inputs"]["bytes"] - done) / rate)
