"""`dist-clm status`'s screen from a run's figures (training/status.py): the lines a GPU run shows."""

from dist_clm.training.status import screen


def test_a_gpu_run_that_trains_shows_its_rate_mfu_time_left_split_and_incidents():
    figures = {
        "run": "runs/big", "running": "pid 7 on host n1 (since 2026-12-08T01:00:00+0000)", "max_steps": 1000,
        "step": 250, "tokens_seen": 250 * 4_000_000, "loss": 2.5, "lr": 3e-4, "tokens_per_s": 1_000_000.0,
        "mfu": 0.412, "time": {"forward_backward": 0.8, "optimizer": 0.1, "data_wait": 0.07, "eval": 0.001,
                               "other": 0.029},
        "val": (200, 2.61), "checkpoint": (200, 1000.0), "incidents": [(57, "a spike"), (90, "1 micro-batch losses "
        "were not finite"), (120, "a spike"), (130, "a spike")], "end": None,
    }  # fmt: skip
    lines = screen(figures, now=1000.0 + 600).splitlines()
    assert lines[0] == "run runs/big: training (pid 7 on host n1 (since 2026-12-08T01:00:00+0000))"
    assert lines[1] == "step 250 of 1000 (25%), 1 B tokens of about 4 B; about 50 min left at 1,000,000 tokens/s"
    assert lines[2] == "loss 2.5, validation 2.61 at step 200, lr 0.0003, 1,000,000 tokens/s, MFU 41.2%"
    assert lines[3] == "time (the last log window): forward backward 80%, optimizer 10%, data wait 7%, other 3%"
    assert lines[4] == "last complete checkpoint: step 200 (10 min ago)"
    assert lines[5].startswith("incidents: step 90: 1 micro-batch")
    assert lines[5].endswith("(and 1 earlier); in runs/big/incidents/")


def test_a_run_that_stopped_with_an_error_says_its_sentence_and_no_time_left():
    figures = {"run": "r", "running": None, "max_steps": 10, "step": 4, "tokens_seen": 400, "loss": float("nan"),
               "lr": None, "tokens_per_s": 50.0, "mfu": None, "time": {}, "val": None, "checkpoint": None,
               "incidents": [],
               "end": {"outcome": "stopped", "step": 4, "sentence": "the data is damaged."}}  # fmt: skip
    lines = screen(figures).splitlines()
    assert lines == ["run r: stopped at step 4: the data is damaged.", "step 4 of 10 (40%), 400 tokens of about 1 k",
                     "loss -, 50 tokens/s", "no complete checkpoint yet"]  # fmt: skip
