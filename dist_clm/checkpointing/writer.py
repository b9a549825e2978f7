"""Checkpoint files written behind the training step (checkpoint.async_save).

`BackgroundWriter` is a DeepSpeed checkpoint engine: DeepSpeed hands it each file's state dict during
`engine.save_checkpoint`; it copies every tensor to host memory there and then (a snapshot: the next step may
change the weights as soon as the call returns); when DeepSpeed commits the save, the snapshots go to one
background thread, which writes each with torch.save and fsyncs it (the writes start only after the last
snapshot, so that they do not slow the copies down). torch.save leaves the interpreter lock while it writes, so the step
loop runs on; `Checkpointer` (checkpointer.py) writes the completion marker only once every rank's writer has
drained. One checkpoint at a time is in flight: the host holds at most one snapshot of this rank's share.

DeepSpeed has its own decoupled engine, but it writes through its fast (async I/O) engine only, which needs
libaio and a GPU; this one runs wherever torch.save does, on the CPU as on a GPU.
"""

from __future__ import annotations

import queue
import threading

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

from dist_clm.fsutil import fsync_file


class BackgroundWriter(TorchCheckpointEngine):
    def __init__(self, zipfile_serialization: bool = True):
        super().__init__(None)
        self.zipfile_serialization = zipfile_serialization
        self.error: BaseException | None = None  # the first write that failed since the last take_error()
        self._queue: queue.Queue = queue.Queue()
        self._held: list = []  # this save's snapshots, until DeepSpeed commits it
        self._in_flight = 0
        self._idle = threading.Condition()
        threading.Thread(target=self._run, name="dist-clm-checkpoint-writer", daemon=True).start()

    @classmethod
    def replacing(cls, engine) -> BackgroundWriter:
        """Install a writer as `engine`'s checkpoint engine, keeping its serialization setting."""
        writer = cls(getattr(engine.checkpoint_engine, "zipfile_serialization", True))
        engine.checkpoint_engine = writer
        return writer

    def save(self, state_dict, path: str) -> None:
        snapshot = _to_host(state_dict, {})
        with self._idle:
            self._in_flight += 1
        self._held.append((snapshot, path))

    def commit(self, info) -> bool:
        """DeepSpeed's last call of a save: every file of this rank is snapshotted; now they are written (not
        before, so that the writes do not compete with the snapshots for the CPU and memory bandwidth)."""
        while self._held:
            self._queue.put(self._held.pop(0))
        return True

    def preserves_storage_sharing(self) -> bool:
        return False  # the snapshot already copies each tensor alone (what DeepSpeed's clone would do)

    def busy(self) -> bool:
        with self._idle:
            return self._in_flight > 0

    def drain(self) -> None:
        """Return once every file given so far is written and durable (or failed: see `error`)."""
        self.commit(None)
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0)

    def take_error(self) -> BaseException | None:
        error, self.error = self.error, None
        return error

    def _run(self) -> None:
        while True:
            snapshot, path = self._queue.get()
            try:
                if self.error is None:  # after a failure the checkpoint is lost anyway: write nothing more
                    torch.save(snapshot, path, _use_new_zipfile_serialization=self.zipfile_serialization)
                    fsync_file(path)
            except BaseException as e:  # reported by the Checkpointer on every rank, in the training thread
                self.error = self.error or e
            finally:
                del snapshot
                with self._idle:
                    self._in_flight -= 1
                    self._idle.notify_all()


def _to_host(obj, memo: dict):
    """A copy of `obj` whose tensors are fresh host copies (one per tensor object, so a tensor saved under two
    names stays one); containers are rebuilt, other values kept as they are."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.detach().to("cpu", copy=True)
        return memo[id(obj)]
    if isinstance(obj, dict):
        out = obj.copy()  # (keeps the dict's own type: OrderedDict, defaultdict)
        for key, value in obj.items():
            out[key] = _to_host(value, memo)
        return out
    if isinstance(obj, list):
        return [_to_host(v, memo) for v in obj]
    if isinstance(obj, tuple):
        items = [_to_host(v, memo) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj
