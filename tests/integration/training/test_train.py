"""Training runs on the real DeepSpeed engine (CPU, gloo): a plain process, the deepspeed launcher, torchrun."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from dist_clm.config import load_config
from dist_clm.parallel.process_group import free_port
from tests.helpers import (
    BIN,
    TINY,
    assert_clean_error,
    check_export,
    independent_model,
    launch,
    metrics,
    rebuilt,
    run_cli,
    train_losses,
    train_state,
    weights,
)


def test_single_process_run_writes_config_checkpoints_and_tensorboard(trained_run, data_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(trained_run / "config.yaml")  # the resolved config, saved in the run directory
    assert cfg.train.max_steps == 12 and cfg.data.path == str(data_dir) and cfg.data.block_size == 64
    ckpts = sorted(p.name for p in (trained_run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000006", "step_00000012"]
    for c in ckpts:
        marker = json.loads((trained_run / "checkpoints" / c / "complete.json").read_text())
        assert marker["zero_stage"] == 2 and marker["world_size"] == 1
        assert (trained_run / "checkpoints" / c / "config.json").is_file()
    assert (trained_run / "tokenizer" / "tokenizer.json").is_file()

    events = list((trained_run / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(trained_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss", "val/perplexity"} <= tags
    wait = [e.value for e in acc.Scalars("train/data_wait_frac")]  # the share of step time spent waiting for data
    assert len(wait) == 4 and all(0 < w < 1 for w in wait)
    assert [e.step for e in acc.Scalars("train/loss")] == [3, 6, 9, 12]
    assert [e.step for e in acc.Scalars("val/perplexity")] == [0, 6, 12]
    lr = [e.value for e in acc.Scalars("train/lr")]
    assert 3e-3 >= lr[0] > lr[1] > lr[2] > lr[3] == pytest.approx(3e-4, rel=1e-4)  # cosine down to 10% of peak
    tb_loss = [e.value for e in acc.Scalars("train/loss")]
    assert tb_loss == pytest.approx(list(train_losses(metrics(trained_run)).values()), rel=1e-6)
    assert all(e.value > 0 for e in acc.Scalars("train/tokens_per_s"))


def test_rerun_of_a_finished_run_resumes_and_does_nothing(trained_run, tmp_path, data_dir):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    before = len(metrics(run))

    r = run_cli(
        "train",
        *TINY,
        f"data.path={data_dir}",
        f"run.dir={run}",
        "train.max_steps=12",
        "checkpoint.save_every=6",
        "distributed.zero_stage=2",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr + r.stdout and "step_00000012" in r.stderr + r.stdout
    assert not train_losses(metrics(run, before))  # no step was taken again
    assert "built successfully" not in r.stdout + r.stderr  # DeepSpeed's report on its (built) CPU op, every start


@pytest.mark.slow
def test_deepspeed_launcher_zero2_bf16_two_ranks_loss_falls_and_resume_continues_by_include(tmp_path, data_dir):
    port = str(free_port())
    ds = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port]
    common = [
        *TINY,
        f"data.path={data_dir}",
        "distributed.zero_stage=2",
        "train.precision=bf16",
        "train.log_every=1",
        "checkpoint.save_every=4",
        "checkpoint.keep_last=5",
        "train.eval_every=0",
        "train.max_steps=12",
        "train.micro_batch_size=2",
        "train.grad_accum=2",
    ]
    a = tmp_path / "a"
    launch(ds, *common, f"run.dir={a}", "train.profile_steps=[4, 5]", "train.profile_ranks=[0, 1]")
    rows = metrics(a)
    losses = train_losses(rows)
    assert list(losses) == list(range(1, 13))
    # each rank's profile of steps 4-5 (the step-4 checkpoint's save in it); the time split of rank 0 and of the
    # slowest rank, the save's stall in the window after it
    for rank in (0, 1):
        trace = json.loads((a / "profile" / f"rank{rank}.steps_4-5.pt.trace.json").read_text())
        names = {e.get("name") for e in trace["traceEvents"]}
        assert {"dist_clm/step_4", "dist_clm/checkpoint", "dist_clm/optimizer_step", "dist_clm/data_wait"} <= names
    split = {r["step"]: r for r in rows if "time/forward_backward" in r}
    assert sorted(split) == list(range(1, 13)) and all("time/slowest/forward_backward" in r for r in split.values())
    assert split[5]["time/checkpoint_stall"] > 0 and split[4]["time/checkpoint_stall"] == 0
    # each window's largest memory over the ranks (here the processes' resident memory), and whose it was
    assert all(r["memory/rss_gib_max"] >= r["memory/rss_gib"] > 0.1 and r["memory/max_rank"] in (0, 1)
               for r in split.values())  # fmt: skip
    assert sum(list(losses.values())[-3:]) / 3 < sum(list(losses.values())[:3]) / 3 - 0.3  # it learns
    vals = [r["val/loss"] for r in rows if "val/loss" in r]
    assert vals[-1] < vals[0]
    marker = json.loads((a / "checkpoints" / "step_00000008" / "complete.json").read_text())
    assert marker["world_size"] == 2 and marker["zero_stage"] == 2

    # Restart from the step-8 checkpoint: the step count and the loader position continue where they were,
    # so steps 9-12 see the same blocks and give the same losses as the uninterrupted run.
    b = tmp_path / "b"
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step_00000012")
    skip = len(metrics(b))
    # this time by device list: --include (DeepSpeed's CPU accelerator counts LOCAL_SIZE devices)
    include = [str(BIN / "deepspeed"), "--include", "localhost:0,1", "--master_port", port]
    r = launch(include, *common, f"run.dir={b}", env={"LOCAL_SIZE": "2"})
    assert "resumed from" in r.stdout + r.stderr
    resumed = train_losses(metrics(b, skip))
    assert list(resumed) == [9, 10, 11, 12]
    for step, loss in resumed.items():
        assert loss == pytest.approx(losses[step], rel=1e-4), step

    state = train_state(b, 12)
    assert state["progress"]["step"] == 12 and state["data"]["blocks_consumed"] == 12 * 2 * 2 * 2
    assert state["data"]["block_size"] == 64
    assert state["progress"]["tokens_seen"] == 12 * 8 * 64

    # the 2-rank ZeRO-2 checkpoint (bf16 weights, fp32 masters) exports with the masters' logits

    r = run_cli("export", str(a), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr[-2000:]
    check_export(tmp_path / "hf", a / "checkpoints" / "step_00000012")


@pytest.mark.slow
def test_torchrun_two_ranks_zero3_llama_and_export(tmp_path, data_dir):
    """A Llama-style model under torchrun with ZeRO-3, built partitioned: it starts from the weights one ZeRO-2
    rank starts from and trains as that rank does; the fused loss head trains as the plain one; partitioned
    weights consolidate into a loadable export. No parameter is kept whole (stage3_param_persistence_threshold 0:
    the tiny head's weight would be), so the fused head's backward recomputes its logits with the weight DeepSpeed
    gathered again for it."""
    import torch
    from transformers import AutoModelForCausalLM

    run = tmp_path / "tr"
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    llama = ["model.preset=tiny-llama", "model.overrides.hidden_size=64", "model.overrides.intermediate_size=172"]
    common = [*llama, "data.block_size=64", "train.micro_batch_size=4", "optim.warmup_steps=1", "train.eval_blocks=4",
              "run.progress_bar=false", f"data.path={data_dir}", "train.max_steps=4", "checkpoint.save_every=4",
              "train.log_every=2", "train.global_batch_size=8", f"distributed.deepspeed_config={ds}"]  # fmt: skip
    for head, where in (("auto", run), ("plain", tmp_path / "plain")):  # the fused loss head, then the plain one
        tr = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
        imports = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"} if head == "auto" else None  # (what each rank loads)
        r = launch(tr, *common, "distributed.zero_stage=3", f"run.dir={where}", f"train.loss_head={head}", env=imports)
        assert "FutureWarning" not in r.stderr, r.stderr[-2000:]  # ZeRO-3's collectives', once per rank
        if imports:  # the ranks' start-up leaves out what dist_clm never uses (~2 s, ~140 MiB each)
            lines = [line for line in r.stderr.splitlines() if line.startswith("import time")]
            loaded = {line.rsplit("|", 1)[1].strip() for line in lines}
            assert {"transformers.generation.candidate_generator", "deepspeed"} <= loaded  # (what imports them)
            leaned = sorted({m for m in loaded if m.split(".")[0] in ("sklearn", "mlflow") and "." in m})
            assert not leaned, leaned[:5]  # (a package imported for real loads its modules; a refused import none)
    one = tmp_path / "one"
    r = run_cli("train", *common, "distributed.zero_stage=2", f"run.dir={one}")
    assert r.returncode == 0, r.stderr[-2000:]
    # the same initial weights (the validation before the first step, bit for bit), the same training
    assert metrics(run)[0]["val/loss"] == metrics(one)[0]["val/loss"], (metrics(run)[0], metrics(one)[0])
    a, b = weights(run, 4), weights(one, 4)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    tag = run / "checkpoints" / "step_00000004"
    marker = json.loads((tag / "complete.json").read_text())
    assert marker["world_size"] == 2 and marker["zero_stage"] == 3
    losses = train_losses(metrics(run))
    assert list(losses) == [2, 4]
    assert losses == pytest.approx(train_losses(metrics(tmp_path / "plain")), rel=1e-5)  # ZeRO-3 gathers its weight

    r = run_cli("export", str(run), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr[-2000:]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.model_type == "llama" and hf.config.hidden_size == 64
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        assert (hf(ids).logits - independent_model(tag)(ids).logits).abs().max().item() <= 1e-5
    check_export(tmp_path / "hf", tag)  # and through its tokenizer and pipeline()


def test_python_is_importable_without_launcher_env():
    # the plain process path sets up a world of one itself (no RANK/MASTER_* needed)
    code = (
        "from dist_clm.parallel import process_group; e = process_group.init(); print(e.rank, e.world_size, e.device)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "0 1 cpu"


def test_mixed_run_reports_each_validation_set_and_the_realized_mixture(tmp_path, data_dir, data_dir_b):

    run = tmp_path / "mixed"
    sources = [f"{{path: {data_dir}, weight: 3}}", f"{{path: {data_dir_b}, weight: 1}}",
               f"{{path: {data_dir_b}, weight: 0, name: held_out}}"]  # fmt: skip
    mix = f"data.mix=[{', '.join(sources)}]"
    r = run_cli("train", *TINY, mix, f"run.dir={run}", "train.max_steps=8", "train.log_every=4",
                "train.eval_every=0", "data.document_mask=true")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(run)
    vals = [row for row in rows if "val/loss" in row]
    assert len(vals) == 2
    for row in vals:  # each source's validation split on its own, and the token-weighted whole
        names = {k.split("/")[1] for k in row if k.count("/") == 2}
        assert names == {"prepared", "other", "held_out"}
        assert row["val/other/loss"] == pytest.approx(row["val/held_out/loss"])  # the same split, twice
    mixes = [row for row in rows if "data/mix/prepared" in row]
    assert [m["data/mix/prepared"] for m in mixes] == pytest.approx([0.75, 0.75], abs=0.02)
    assert all("data/mix/held_out" not in m for m in mixes)  # weight 0: never trained on


def test_staged_mixture_switches_at_its_step_is_logged_and_resumes_across_it_exactly(tmp_path, data_dir, data_dir_b):
    run = tmp_path / "staged"
    settings = (
        *TINY, f"run.dir={run}", f"data.mix=[{{path: {data_dir}, name: a}}, {{path: {data_dir_b}, name: b}}]",
        "data.stages=[{until: 4, weights: {a: 3, b: 1}}, {weights: {a: 1, b: 3}}]", "train.max_steps=8",
        "train.log_every=1", "train.eval_every=0", "checkpoint.save_every=3", "checkpoint.keep_last=3",
    )  # fmt: skip
    r = run_cli("train", *settings)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 1: data stage 1 of 2 (steps 1-4): a 75.0%, b 25.0% of the blocks" in r.stdout
    assert "step 5: data stage 2 of 2 (steps 5-): a 25.0%, b 75.0% of the blocks" in r.stdout
    rows = metrics(run)
    assert [(x["step"], x["data/stage"], x["data/stage_share/a"]) for x in rows if "data/stage" in x] == [
        (1, 1, 0.75),
        (5, 2, 0.25),
    ]
    share = {x["step"]: x["data/mix/a"] for x in rows if "data/mix/a" in x}  # measured from the batches
    assert sum(share[s] for s in range(1, 5)) / 4 == pytest.approx(0.75)
    assert sum(share[s] for s in range(5, 9)) / 4 == pytest.approx(0.25)
    whole = train_losses(rows)
    for late in ("step_00000006", "step_00000008"):  # back to step 3, inside stage 1: resume across the boundary
        shutil.rmtree(run / "checkpoints" / late)
    r = run_cli("train", *settings)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 4: data stage 1 of 2 (steps 1-4)" in r.stdout and "step 5: data stage 2 of 2" in r.stdout
    again = train_losses(metrics(run, skip=len(rows)))
    assert list(again) == [4, 5, 6, 7, 8]
    assert all(again[s] == whole[s] for s in again), (again, whole)

    # the documents behind a step, printed by `data batch`: read back from their ranges alone, the ids the loader
    # fed, bit for bit, on either side of the stage boundary (the token sums the run logged, at every step)
    from dist_clm.data.loader import TrainLoader
    from dist_clm.data.run_data import training_sources
    from dist_clm.data.step_blocks import run_data

    sums = {x["step"]: x["data/token_sum"] for x in rows if "data/token_sum" in x}
    order = run_data(run)
    for step in range(1, 9):
        r = run_cli("data", "batch", str(run), "--step", str(step), "--json", "--tokens", "4")
        assert r.returncode == 0, r.stderr[-2000:]
        printed = json.loads(r.stdout)
        ids = rebuilt(printed["blocks"], {"a": data_dir, "b": data_dir_b})
        assert int(ids.sum()) == sums[step], step
        if step in (4, 5):
            order.position.blocks_consumed = printed["first_block"]
            d = order.config.data
            loader = TrainLoader(training_sources(d), order.position, micro_batch=4, shuffle=d.shuffle,
                                 seed=order.config.train.seed, document_mask=d.document_mask)  # fmt: skip
            fed = next(iter(loader))["input_ids"]
            assert (fed.numpy().reshape(-1) == ids).all(), step
            assert {b["source"] for b in printed["blocks"]} == {"a", "b"}
    text = run_cli("data", "batch", str(run), "--step", "5").stdout
    assert text.startswith(f"step 5 of {run}: global blocks 16-19 (4 blocks over 1 data-parallel rank(s))")
    assert "rank 0, micro batch 0, row 0: block 16 of " in text and "    document " in text
    assert_clean_error(run_cli("data", "batch", str(run), "--step", "0"), "--step must be 1 or more")
    assert_clean_error(run_cli("data", "batch", str(run), "--step", "2", "--rank", "1"), "--rank 1 is not a rank")
    assert_clean_error(run_cli("data", "batch", str(tmp_path), "--step", "2"), "is not a run directory")


def test_deepspeed_and_transformers_are_imported_without_mlflow_and_sklearn_which_stay_importable():
    """DeepSpeed's autotuner would import mlflow, transformers' generation scikit-learn (a second each of every
    process's start-up); dist_clm's MLflow tracker and lm-eval's metrics still import them afterwards."""
    code = ("import sys; from dist_clm.parallel.process_group import import_deepspeed, lean_imports; lean_imports(); "
            "import_deepspeed(); import transformers.generation.utils as g; "
            "print('mlflow' in sys.modules, 'sklearn' in sys.modules); import mlflow; from sklearn.metrics import "
            "roc_curve; print(mlflow.__name__, roc_curve.__name__)")  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", "False", "mlflow", "roc_curve"]
