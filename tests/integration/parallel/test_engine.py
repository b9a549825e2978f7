"""The engine settings: schedules, the generated DeepSpeed config and a user's JSON merged into it, and real
single-process runs with activation checkpointing, torch.compile and a merged config."""

import json

import pytest

from dist_clm.config import load_config
from dist_clm.parallel.engine import deepspeed_config, lr_factor
from tests.helpers import TINY, metrics, run_cli, train_losses


def t(*overrides):
    return load_config(None, ["train.max_steps=100", "optim.warmup_steps=10", *overrides]).optim


def ds_config(cfg, **kwargs):
    return deepspeed_config(cfg.train, cfg.optim, cfg.distributed, **kwargs)


def test_runs_with_wsd_a_merged_config_and_activation_checkpointing(tmp_path, data_dir):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"gradient_clipping": 0.25}))
    common = [*TINY, f"data.path={data_dir}", "train.max_steps=8", "optim.warmup_steps=2", "train.log_every=1",
              "train.eval_every=0", "optim.schedule=wsd", "optim.decay_fraction=0.5",
              f"distributed.deepspeed_config={user}"]  # fmt: skip
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    for run, extra in ((plain, "false"), (ckpt, "true")):
        r = run_cli("train", *common, f"run.dir={run}", f"train.activation_checkpointing={extra}")
        assert r.returncode == 0, r.stderr[-3000:]
    written = json.loads((plain / "ds_config.json").read_text())
    assert written["gradient_clipping"] == 0.25 and written["zero_optimization"]["stage"] == 2
    lrs = [row["train/lr"] for row in metrics(plain) if "train/lr" in row]
    tr = load_config(plain / "config.yaml").optim
    assert lrs == pytest.approx([tr.lr * lr_factor(s, tr, 8) for s in range(1, 9)])  # after step s: update s's lr
    assert lrs[1:4] == pytest.approx([tr.lr] * 3) and lrs[-1] == pytest.approx(tr.lr * tr.min_lr_ratio)
    # recomputing activations changes memory, not the numbers
    assert train_losses(metrics(ckpt)) == pytest.approx(train_losses(metrics(plain)), rel=1e-5)
    assert all("memory/rss_gib" in row for row in metrics(plain) if "train/loss" in row)


@pytest.mark.slow
def test_torch_compile_through_deepspeed(tmp_path, data_dir):
    common = [*TINY, f"data.path={data_dir}", "train.max_steps=4", "train.log_every=1", "train.eval_every=0"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    for run, flag in ((eager, "auto"), (compiled, "true")):  # (auto: not on the CPU)
        r = run_cli("train", *common, f"run.dir={run}", f"train.compile={flag}")
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("torch.compile's compilation included") == (flag == "true")  # said once, if compiled
        # and announced before the first validation starts compiling; inductor's FutureWarnings are not said
        announced = r.stdout.find("the first validation and step compile the model with torch.compile")
        assert (announced >= 0) == (flag == "true") and announced < r.stdout.index("step 0: validation")
        assert "FutureWarning" not in r.stderr, r.stderr[-2000:]
        assert [row["step"] for row in metrics(run) if "train/first_step_s" in row] == [1]
    assert train_losses(metrics(compiled)) == pytest.approx(train_losses(metrics(eager)), rel=1e-3)


@pytest.mark.slow
def test_cpu_offload_of_the_optimizer_and_of_parameters_trains_like_the_plain_engine(tmp_path, trained_run):
    """trained_run is ZeRO-2 without offload; the same run with DeepSpeed's CPU Adam (ZeRO-2 optimizer offload)
    and with ZeRO-3 parameter + optimizer offload logs the same losses."""
    import yaml

    cfg = yaml.safe_load((trained_run / "config.yaml").read_text())
    same = [f"data.path={cfg['data']['path']}", *TINY, "train.max_steps=12", "checkpoint.save_every=0",
            "train.eval_every=0", "train.log_every=3"]  # fmt: skip
    want = train_losses(metrics(trained_run))
    both = ["distributed.zero_stage=3", "distributed.offload_optimizer=true", "distributed.offload_params=true"]
    for name, extra in [("opt", ["distributed.offload_optimizer=true"]), ("both", both)]:
        run = tmp_path / name
        r = run_cli("train", *same, f"run.dir={run}", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        zero = json.loads((run / "ds_config.json").read_text())["zero_optimization"]
        assert zero["offload_optimizer"]["device"] == "cpu"
        assert (zero.get("offload_param") or {}).get("device") == ("cpu" if name == "both" else None)
        assert train_losses(metrics(run)) == pytest.approx(want, rel=1e-4)
