"""The checks before the process group (training/preflight.py): which ranks the launcher planned, and what is
checked where the ranks span nodes."""

from __future__ import annotations

import sys

import pytest

from dist_clm.config import load_config
from dist_clm.errors import UserError
from dist_clm.parallel.process_group import launched_world
from dist_clm.training.preflight import preflight


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, (1, True)),
        ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, (4, True)),  # torchrun, one node
        ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, (16, False)),  # torchrun, two nodes
        ({"WORLD_SIZE": "16", "LOCAL_SIZE": "8"}, (16, False)),  # the deepspeed launcher
        ({"SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NUM_NODES": "1"}, (8, True)),  # srun
        ({"SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NUM_NODES": "2"}, (8, False)),
    ],
)
def test_the_launchers_world_is_read_before_the_group(monkeypatch, env, expected):
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NUM_NODES"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launched_world() == expected


def test_across_nodes_only_what_every_rank_sees_alike_is_checked_before_the_group(tmp_path):
    """On one node a missing data directory is refused at once (every rank sees the same files); across nodes
    it waits for the process group, where the ranks agree (a node with other files must not leave the rest
    waiting in the rendezvous), while config and world mistakes are refused at once everywhere; no torch."""
    missing = load_config(None, [f"data.path={tmp_path / 'nowhere'}"])
    with pytest.raises(UserError, match="does not exist") as e:
        preflight(missing, 2, one_node=True)
    assert getattr(e.value, "agreed", False)  # (said once, by the main rank)
    assert preflight(missing, 16, one_node=False) is missing
    bad_world = load_config(None, [f"data.path={tmp_path / 'nowhere'}", "distributed.sequence_parallel_size=3"])
    with pytest.raises(UserError, match="does not divide the 16 ranks"):
        preflight(bad_world, 16, one_node=False)
    bad_shape = load_config(None, [f"data.path={tmp_path / 'nowhere'}", "data.block_size=100000"])
    with pytest.raises(UserError, match="more than the model's"):
        preflight(bad_shape, 16, one_node=False)  # (a preset's shape is config)
    elsewhere = load_config(None, [f"data.path={tmp_path}", f"model.pretrained={tmp_path / 'model'}"])
    assert preflight(elsewhere, 16, one_node=False) is elsewhere  # (a model directory is a file)


def test_the_checks_import_no_torch():
    """What makes them fast: training/preflight.py and what it imports leave torch, DeepSpeed and transformers'
    models alone (checked in a clean interpreter state: the modules are reloaded without torch in reach)."""
    import importlib

    blocked = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] in ("torch",
               "deepspeed", "transformers") or name.startswith("dist_clm")}  # fmt: skip

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "deepspeed", "transformers"):
                raise ImportError(f"the checks before the process group imported {name}")
            return None

    finder = NoTorch()
    sys.meta_path.insert(0, finder)
    try:
        importlib.import_module("dist_clm.training.preflight")
        importlib.import_module("dist_clm.parallel.process_group")
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.startswith("dist_clm")]:
            del sys.modules[name]
        sys.modules.update(blocked)


def test_the_memory_check_refuses_what_cannot_fit_and_steps_aside_where_it_cannot_plan(tmp_path, caplog):
    """check_memory: a model the machine cannot hold is one sentence; a config.json whose fields the counts
    cannot read is a warning (the run starts without the check), never a traceback; no vocabulary, no check."""
    from dist_clm.parallel.memory_plan import Machine
    from dist_clm.training.preflight import check_memory

    small = Machine(1, 1, 0, 4 * 10**9, on_gpu=False)
    with pytest.raises(UserError, match="the memory plan says this run needs"):
        check_memory(load_config(None, ["model.preset=llama-1b"]), small, 32000)
    check_memory(load_config(None, ["model.preset=llama-1b"]), small, None)
    (tmp_path / "config.json").write_text('{"model_type": "llama", "vocab_size": 100, "hidden_size": "wide"}')
    check_memory(load_config(None, [f"model.pretrained={tmp_path}"]), small, None)
    assert "no memory plan for this run (TypeError" in caplog.text
