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
