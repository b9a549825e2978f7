"""NCCL's flight recorder for a run (parallel/collectives.py): where each rank's last collectives are dumped on a
GPU, and what the sentence of a lost peer says of them. (On the CPU gloo has no recorder.)"""

import os

from dist_clm.parallel.collectives import TRACE_ENTRIES, record_collectives, traces_note

NAMES = ("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE",
         "TORCH_FR_DUMP_TEMP_FILE", "TORCH_FR_BUFFER_SIZE")  # fmt: skip


def test_the_recorder_dumps_into_the_run_directory_and_a_users_own_settings_win(tmp_path, monkeypatch):
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", "50")  # the user's
    folder = record_collectives(tmp_path / "run", on_gpu=True)
    assert folder == tmp_path / "run" / "collectives" and folder.is_dir()
    assert os.environ["TORCH_FR_BUFFER_SIZE"] == "50" and TRACE_ENTRIES == 2000
    assert "TORCH_NCCL_TRACE_BUFFER_SIZE" not in os.environ  # (torch 2.12+ reads the TORCH_FR_ names, and warns
    # in every process about the old one)
    assert os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert os.environ["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == os.environ["TORCH_FR_DUMP_TEMP_FILE"] == f"{folder}/rank_"
    for name in NAMES:  # on the CPU: the recorder's size only (the dump is this process's own, not NCCL's)
        monkeypatch.delenv(name, raising=False)
    record_collectives(tmp_path / "cpu", on_gpu=False)
    assert os.environ["TORCH_FR_BUFFER_SIZE"] == "2000" and "TORCH_NCCL_DUMP_ON_TIMEOUT" not in os.environ
    assert not (tmp_path / "cpu").exists()  # (a rank that dumps makes the folder)


def test_the_lost_peer_sentence_names_the_collective_the_dumps_and_the_analyzer_where_there_are_any(tmp_path):
    note = traces_note(tmp_path, on_gpu=True)
    assert f"{tmp_path / 'collectives'}/" in note and f"`torchfrtrace {tmp_path / 'collectives'}`" in note
    assert traces_note(tmp_path, on_gpu=False) == ""  # (gloo, nothing recorded)
    waiting = traces_note(tmp_path, on_gpu=False, waiting_in="collective 7 (gloo:all_reduce, group default_pg)")
    assert waiting == (f"; it was waiting in collective 7 (gloo:all_reduce, group default_pg) (each rank's last "
                       f"collectives: {tmp_path / 'collectives'}/)")  # fmt: skip
