"""GPU memory snapshots and the out-of-memory sentence (observability/memory.py), wired to a stand-in for
torch.cuda's allocator API on the CPU (the GPU suite runs the real one)."""

import pickle
from types import SimpleNamespace

import pytest

from dist_clm.observability import memory


class StandInCuda:
    """torch.cuda's part that memory.py calls: the history recorder, the snapshot dump, the allocator's figures."""

    def __init__(self):
        self.calls = []
        self.memory = SimpleNamespace(_record_memory_history=self.record, _dump_snapshot=self.dump)

    def record(self, enabled="all", max_entries=0):
        self.calls.append(("record", enabled, max_entries))

    def dump(self, path):
        self.calls.append(("dump", path))
        with open(path, "wb") as f:
            pickle.dump({"segments": [], "device_traces": []}, f)

    def memory_stats(self, device):
        return {"allocated_bytes.all.current": 70 * 2**30, "reserved_bytes.all.current": 75 * 2**30}

    def get_device_properties(self, device):
        return SimpleNamespace(total_memory=80 * 2**30)


@pytest.fixture
def cuda(monkeypatch):
    stand_in = StandInCuda()
    monkeypatch.setattr(memory, "_cuda", lambda: stand_in)
    return stand_in


def test_the_chosen_steps_are_recorded_and_dumped_on_a_gpu_only(cuda, tmp_path):
    on = memory.MemoryRecorder([2, 3], [0], 0, tmp_path, "cuda:0")
    other_rank = memory.MemoryRecorder([2, 3], [1], 0, tmp_path, "cuda:0")
    off = [other_rank, memory.MemoryRecorder([2, 3], [0], 0, tmp_path, "cpu")]
    for step in range(1, 6):
        for recorder in (on, *off):
            recorder.before(step)
            recorder.after(step)
    path = tmp_path / "memory" / "rank0.steps_2-3.pickle"
    assert cuda.calls == [("record", "all", memory.MAX_ENTRIES), ("dump", str(path)), ("record", None, 0)]
    assert pickle.loads(path.read_bytes())["segments"] == []
    early = memory.MemoryRecorder([2, 9], [0], 0, tmp_path, "cuda:0")  # the run stops before the last step
    early.before(2)
    early.after(2)
    assert early.close(2).name == "rank0.steps_2-2.pickle" and not early.recording


def test_an_out_of_memory_error_is_one_sentence_naming_the_snapshot_and_what_to_change(cuda, tmp_path):
    error = memory.out_of_memory(tmp_path, 3, 17, "cuda:3")
    text = str(error)
    path = tmp_path / "memory" / "rank3.oom-step-17.pickle"
    assert path.is_file() and str(path) in text
    assert text.startswith("rank 3 ran out of GPU memory at step 17: 70.0 GiB allocated")
    assert "75.0 GiB reserved of 80.0 GiB" in text and "train.micro_batch_size" in text and "\n" not in text


def test_a_cpu_model_holds_no_gpu_memory_by_kind():
    import torch

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    assert memory.by_kind(model, optimizer) == {"parameters": 0, "optimizer state": 0}
