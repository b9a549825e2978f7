"""The background checkpoint writer (checkpointing/writer.py)."""

from __future__ import annotations

import time
import zipfile
from types import SimpleNamespace

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo

from dist_clm.checkpointing.writer import BackgroundWriter


def test_writer_snapshots_at_save_and_writes_after_commit(tmp_path):
    """save copies the tensors then and there (a later in-place change is not written); nothing is written before
    commit; after drain the file loads with the saved values, a tensor saved twice still one storage."""
    w = BackgroundWriter()
    assert w.preserves_storage_sharing() is False and not w.busy()
    t = torch.arange(4.0)
    state = {"w": t, "alias": t, "nested": [t * 2, (1, "x")], "step": 3}
    path = tmp_path / "mp_rank_00_model_states.pt"
    w.save(state, str(path))
    t.add_(100)
    assert w.busy() and not path.exists()
    assert w.commit(CheckpointCommitInfo(tag="step_1", save_dir=str(tmp_path), save_latest=False)) is True
    deadline = time.monotonic() + 10
    while w.busy() and time.monotonic() < deadline:  # commit starts the writes; drain is not needed for them
        time.sleep(0.01)
    assert path.exists()
    w.drain()
    assert not w.busy() and w.take_error() is None
    got = torch.load(path, weights_only=False)
    assert torch.equal(got["w"], torch.arange(4.0)) and torch.equal(got["nested"][0], torch.arange(4.0) * 2)
    assert got["alias"].data_ptr() == got["w"].data_ptr()
    assert got["nested"][1] == (1, "x") and got["step"] == 3
    assert zipfile.is_zipfile(path)


def test_writer_reports_a_failed_write_once_and_writes_nothing_more_until_taken(tmp_path):
    """A write that fails (its directory does not exist) is kept as `error`: take_error returns it once, then None;
    the same checkpoint's later files are not written; after take_error the writer writes again."""
    w = BackgroundWriter()
    w.save({"a": torch.ones(2)}, str(tmp_path / "missing" / "a.pt"))
    w.save({"b": torch.ones(2)}, str(tmp_path / "b.pt"))
    w.drain()
    assert not w.busy()
    error = w.take_error()
    assert isinstance(error, Exception) and "missing" in str(error)
    assert w.take_error() is None
    assert not (tmp_path / "b.pt").exists()
    w.save({"c": torch.zeros(3)}, str(tmp_path / "c.pt"))
    w.drain()
    assert w.take_error() is None and torch.equal(torch.load(tmp_path / "c.pt")["c"], torch.zeros(3))


def test_replacing_installs_the_writer_keeping_the_serialization(tmp_path):
    """replacing(engine) makes the writer the engine's checkpoint engine with the old engine's zipfile setting
    (legacy, non-zip files when it was off); without a setting the zip format is used."""
    engine = SimpleNamespace(checkpoint_engine=SimpleNamespace(zipfile_serialization=False))
    w = BackgroundWriter.replacing(engine)
    assert engine.checkpoint_engine is w and w.zipfile_serialization is False
    w.save({"x": torch.ones(3)}, str(tmp_path / "legacy.pt"))
    w.drain()
    assert not zipfile.is_zipfile(tmp_path / "legacy.pt")
    assert torch.equal(torch.load(tmp_path / "legacy.pt")["x"], torch.ones(3))
    assert BackgroundWriter.replacing(SimpleNamespace(checkpoint_engine=object())).zipfile_serialization is True
