"""Trackers that fail: a warning, and the numbers still go to the others (observability/trackers.py)."""

from __future__ import annotations

import json


def test_a_tracker_that_cannot_be_reached_is_a_warning_and_the_numbers_still_go_elsewhere(tmp_path, capsys):
    from dist_clm.config import RunConfig
    from dist_clm.observability.metrics import Metrics

    settings = RunConfig(dir=str(tmp_path), loggers=["mlflow", "jsonl"], mlflow_tracking_uri="http://127.0.0.1:9")
    m = Metrics(tmp_path, is_main=True, settings=settings, config={"optim": {"lr": 1.0}})
    m.log(1, {"train/loss": 2.5})
    m.close()
    said = capsys.readouterr().err
    assert said.count("warning: the mlflow tracker failed") == 1 and "the run goes on without it" in said
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "train/loss": 2.5}


def test_each_tracker_takes_its_own_environment_where_the_config_is_silent(tmp_path):
    from dist_clm.config import RunConfig
    from dist_clm.observability.trackers import mlflow_settings, wandb_settings

    env = {"WANDB_PROJECT": "lab", "WANDB_ENTITY": "team", "WANDB_MODE": "online", "WANDB_DIR": "/scratch/wb",
           "MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_EXPERIMENT_NAME": "pretrain"}  # fmt: skip
    silent = RunConfig()
    assert wandb_settings(silent, tmp_path, env) == {"project": "lab", "entity": "team", "mode": "online",
                                                     "dir": "/scratch/wb"}  # fmt: skip
    assert mlflow_settings(silent, tmp_path, env) == {"uri": "http://mlflow:5000", "experiment": "pretrain"}
    said = RunConfig(wandb_project="p", wandb_mode="offline", mlflow_tracking_uri="sqlite:///x.db",
                     mlflow_experiment="e")  # fmt: skip
    assert wandb_settings(said, tmp_path, env) == {"project": "p", "entity": "team", "mode": "offline",
                                                   "dir": "/scratch/wb"}  # fmt: skip
    assert mlflow_settings(said, tmp_path, env) == {"uri": "sqlite:///x.db", "experiment": "e"}
    assert wandb_settings(silent, tmp_path, {}) == {"project": "dist-clm", "entity": None, "mode": "offline",
                                                    "dir": str(tmp_path)}  # fmt: skip
    assert mlflow_settings(silent, tmp_path, {}) == {"uri": f"sqlite:///{tmp_path.absolute()}/mlflow.db",
                                                     "experiment": "dist-clm"}  # fmt: skip
