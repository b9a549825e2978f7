"""What researchers read during a run: evaluation-only data (a validation split alone) for `eval --data` and as
a weight-0 source, progress that reads well in a log file (plain lines, no carriage-return frames), and the same
numbers in TensorBoard, wandb and MLflow, read back with their own readers, across a resume."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from dist_clm.observability.timing import PHASES, RANGES
from tests.helpers import TINY, corpus_files, metrics, run_cli, train_losses

QUIET = {"DIST_CLM_PROGRESS_SECONDS": "0"}  # a progress line at every update: what a log file gets, sooner


@pytest.fixture(scope="module")
def held(tmp_path_factory, data_dir) -> tuple[Path, str]:
    """Evaluation-only data (`prepare --val-fraction 1`), and what prepare printed (not to a terminal)."""
    root = tmp_path_factory.mktemp("held")
    corpus = root / "held_out"
    corpus.mkdir()
    for i, f in enumerate(corpus_files(12, skip=40)):
        (corpus / f"{i:02d}.py").write_text(f.read_text())
    r = run_cli("prepare", str(corpus), "--tokenizer", str(data_dir / "tokenizer"), "--out", str(root / "held"),
                "--val-fraction", "1", "--chunk-tokens", "500", env=QUIET)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return root / "held", r.stdout + r.stderr


def test_eval_only_data_and_progress_lines_in_a_log(held, trained_run):
    from dist_clm.config import load_config
    from dist_clm.data.run_data import training_sources
    from dist_clm.errors import UserError

    data, printed = held
    m = json.loads((data / "manifest.json").read_text())
    assert m["eval_only"] and m["splits"]["train"]["documents"] == 0 and m["splits"]["val"]["documents"] == 12
    # the output is lines, as a SLURM log or nohup gets it: no carriage-return frames
    assert "\r" not in printed and "prepare: " in printed and " doc/s" in printed
    # what it does comes first, before the workers start and the tokenizer loads
    assert printed.splitlines()[0].startswith(f"prepare: 12 files into {data}, tokenizing with "), printed
    r = run_cli("eval", str(trained_run), "--data", str(data), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.splitlines()[-1])["tokens"] > 0
    with pytest.raises(
        UserError, match="is evaluation-only data .prepared with --val-fraction 1.*weight 0 in data.mix"
    ):
        training_sources(load_config(None, [f"data.path={data}"]).data)


def wandb_history(run_file: Path) -> tuple[str, list[dict]]:
    """(the run id, the logged rows) of a wandb offline run file: records in the LevelDB log framing wandb writes
    (7-byte header, 32 KiB blocks, chunks of crc32c, length, type), each one wandb's own protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks, whole = run_file.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            whole.append(chunks)
            chunks = b""
    run_id, rows = "", []
    for raw in whole:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return run_id, rows


def test_the_same_numbers_in_tensorboard_wandb_and_mlflow_downstream_tasks_included(tmp_path, data_dir, held,
                                                                                   monkeypatch):  # fmt: skip
    """One run logs to every tracker with downstream tasks in the loop; it trains bit for bit like the same run
    without them; a resume's trackers continue the same tracker runs."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dist_clm.config import load_config
    from dist_clm.observability.metrics import Metrics

    data, _ = held
    mix = f"data.mix=[{{path: '{data_dir}', weight: 1}}, {{path: '{data}', weight: 0, name: held}}]"
    base = [*TINY, mix, "data.path=", "train.log_every=1", "train.eval_every=2", "train.max_steps=4"]
    plain = tmp_path / "plain"
    r = run_cli("train", *base, f"run.dir={plain}", "run.loggers=[jsonl]", "run.progress_bar=true",
                "train.memory_snapshot_steps=[1, 2]", env=QUIET)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train.memory_snapshot_steps records the CUDA allocator: on the CPU there is none" in r.stderr
    assert not (plain / "memory").exists()
    assert "\r" not in r.stdout + r.stderr  # progress as plain lines in a log
    lines = [line for line in r.stdout.splitlines() if line.startswith("train: ")]
    assert lines and "4/4 steps (100%)" in lines[-1] and "step/s" in lines[-1], r.stdout[-2000:]
    # the first step's line has no rate and no time left (they count from the steps after it)
    assert lines[0].startswith("train: 1/4 steps (25%), ") and "/s" not in lines[0] and "left" not in lines[0], lines
    assert any("val/held/loss" in row for row in metrics(plain))  # the evaluation-only source, weight 0
    # the line names the biggest share of time not spent computing when above a tenth: after step 2's validation
    assert any("eval " in line for line in lines) and not any("eval " in line for line in lines[:2]), lines
    run = tmp_path / "run"
    args = [*base, f"run.dir={run}", "run.loggers=[tensorboard, wandb, mlflow, jsonl]", "run.name=watched",
            "train.eval_tasks=[dist_clm_arith, dist_clm_code_cloze]", "train.eval_tasks_limit=20",
            "train.profile_steps=[2, 3]"]  # fmt: skip
    monkeypatch.setenv("WANDB_MODE", "offline")
    r = run_cli("train", *args)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr[-3000:]
    assert "\r" not in r.stdout + r.stderr and "step 4: downstream" in r.stdout
    # what a resume does with the trackers (opens them from the run directory again), here in-process
    cfg = load_config(None, args)
    again = Metrics(run, is_main=True, settings=cfg.run, config=cfg.to_dict())
    again.log(5, {"train/loss": 1.25})
    again.close()

    rows = metrics(run)
    losses = {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}
    assert losses == {**train_losses(metrics(plain)), 5: 1.25}  # bit for bit: the tasks changed nothing
    acc = {row["step"]: row["eval/dist_clm_arith/acc"] for row in rows if "eval/dist_clm_arith/acc" in row}
    assert sorted(acc) == [2, 4] and all(0 <= a <= 1 for a in acc.values())
    assert any("eval/dist_clm_code_cloze/perplexity" in row and "eval/time_s" in row for row in rows)
    # the time split of every log window (one step each): the validation and the tasks after step 2 in step 3's
    split = {row["step"]: row for row in rows if "time/forward_backward" in row}
    assert sorted(split) == [1, 2, 3, 4] and all(row["time/forward_backward"] > 0 for row in split.values())
    assert split[3]["time/eval"] > 0.5 and split[2]["time/eval"] == split[4]["time/eval"] == 0
    assert all(sum(row[f"time/{p}"] for p in (*PHASES, "other")) == pytest.approx(1) for row in split.values())
    # the profile of steps 2-3, with the loop's named ranges, as the PyTorch profiler wrote it
    (trace,) = (run / "profile").glob("rank0.steps_2-3.pt.trace.json")
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {f"dist_clm/{n}" for n in ("step_2", "step_3", *RANGES)} - {"dist_clm/checkpoint"} <= names

    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    assert {e.step: e.value for e in board.Scalars("train/loss")} == pytest.approx(losses, rel=1e-6)
    assert {e.step: e.value for e in board.Scalars("eval/dist_clm_arith/acc")} == pytest.approx(acc)
    assert "optim:" in board.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()

    ids = json.loads((run / "trackers.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    history = {m.step: m.value for m in client.get_metric_history(ids["mlflow"], "train/loss")}
    assert history == pytest.approx(losses, rel=1e-6)  # one MLflow run, continued
    got = {m.step: m.value for m in client.get_metric_history(ids["mlflow"], "eval/dist_clm_arith/acc")}
    assert got == pytest.approx(acc)
    mlflow_run = client.get_run(ids["mlflow"])
    assert mlflow_run.data.params["optim.lr"] == "0.003" and mlflow_run.info.run_name == "watched"

    logged, tasks = {}, {}
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2  # the run and its continuation: one wandb run id, synced together
    for f in files:
        run_id, history_rows = wandb_history(f)
        assert run_id == ids["wandb"]
        logged |= {row["_step"]: row["train/loss"] for row in history_rows if "train/loss" in row}
        tasks |= {
            row["_step"]: row["eval/dist_clm_arith/acc"] for row in history_rows if "eval/dist_clm_arith/acc" in row
        }
    assert logged == pytest.approx(losses, rel=1e-6) and tasks == pytest.approx(acc)


def test_eval_runs_downstream_tasks_from_the_suite_and_from_a_folder(tmp_path, trained_run):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "colors.jsonl").write_text("".join(json.dumps({"q": f"def f{i}(): return", "choices": [" 1", " x"],
                                                            "label": i % 2}) + "\n" for i in range(10)))  # fmt: skip
    (tasks / "colors.yaml").write_text(f"task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    "
                                       f"test: {tasks / 'colors.jsonl'}\ntest_split: test\noutput_type: "
                                       "multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
                                       "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n")  # fmt: skip
    r = run_cli("eval", str(trained_run), "--tasks", "dist_clm_suite", str(tasks), "--limit", "20", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.splitlines()[-1])
    assert set(results) == {"dist_clm_arith", "dist_clm_code_next_line", "dist_clm_code_cloze", "my_task"}
    assert "dist_clm_arith  " in r.stdout and 0 <= results["my_task"]["acc"] <= 1 and "\r" not in r.stderr
    from dist_clm.errors import UserError
    from dist_clm.evaluation import downstream

    with pytest.raises(UserError, match="unknown task 'no_such_task_anywhere'.*dist_clm_suite"):
        downstream.run_tasks(None, None, ["no_such_task_anywhere"], "cpu")


def test_a_downstream_task_that_does_not_exist_is_said_before_the_first_step(tmp_path, data_dir):
    """train.eval_tasks with a name that is no task: one sentence before training starts (it came at the first
    evaluation, after the steps before it, or at the end of a run without one)."""
    from tests.helpers import assert_clean_error

    run = tmp_path / "run"
    r = run_cli("train", *TINY, f"data.path={data_dir}", f"run.dir={run}", "train.max_steps=3", "train.eval_every=0",
                "train.eval_tasks=[dist_clm_arith, no_such_task_anywhere]")  # fmt: skip
    assert_clean_error(r, "unknown task 'no_such_task_anywhere'")
    assert "train: " not in r.stdout and not list(run.glob("checkpoints/step_*")), r.stdout[-2000:]


def test_mlflow_writes_where_its_environment_points_and_says_so_once(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from dist_clm.config import RunConfig
    from dist_clm.observability.metrics import Metrics

    uri = f"sqlite:///{tmp_path / 'lab.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "lab-pretraining")
    run = tmp_path / "run"
    run.mkdir()
    m = Metrics(run, is_main=True, settings=RunConfig(dir=str(run), loggers=["mlflow", "jsonl"]), config={})
    m.log(1, {"train/loss": 2.5})
    m.close()
    assert capsys.readouterr().out.count(f"mlflow: {uri}, experiment lab-pretraining") == 1
    assert not (run / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=uri)
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]
    assert client.get_run(run_id).info.experiment_id == client.get_experiment_by_name("lab-pretraining").experiment_id
    assert [h.value for h in client.get_metric_history(run_id, "train/loss")] == [2.5]


def test_a_run_that_fails_while_profiled_ends_in_its_sentence_with_the_trace_written(tmp_path, data_dir):
    """An error in the middle of train.profile_steps (here a divergence with no checkpoint to roll back to): the
    one sentence and exit 2, the trace of the steps it recorded (a profiler left running crashed the process at
    exit, its trace lost), and the end recorded for `dist-clm status`."""
    from tests.helpers import assert_clean_error

    run = tmp_path / "run"
    r = run_cli("train", *TINY, f"data.path={data_dir}", f"run.dir={run}", "train.max_steps=8", "train.eval_every=0",
                "checkpoint.save_every=0", "stability.max_bad_steps=1", "stability.fault_injection=3:nan",
                "train.profile_steps=[2, 6]")  # fmt: skip
    assert_clean_error(r, "training diverged at step 3")
    assert (run / "profile" / "rank0.steps_2-3.pt.trace.json").is_file()
    shown = run_cli("status", str(run)).stdout
    assert f"run {run}: stopped at step 3: training diverged at step 3" in shown, shown


OUT_OF_MEMORY = """
import pickle, sys, types, torch
from dist_clm.observability import memory
from dist_clm.training import loop

class StandInCuda:  # torch.cuda's allocator API, as memory.py calls it (this machine has no GPU)
    memory = types.SimpleNamespace(_record_memory_history=lambda *a, **k: None,
                                   _dump_snapshot=lambda path: open(path, "wb").write(pickle.dumps({"segments": []})))
    memory_stats = staticmethod(lambda device: {"allocated_bytes.all.current": 3 << 30,
                                                "reserved_bytes.all.current": 4 << 30})
    get_device_properties = staticmethod(lambda device: types.SimpleNamespace(total_memory=4 << 30))

memory._cuda = StandInCuda
real = loop.train_step
def train_step(run, batches, step, *rest):  # what a too-large step does on a GPU
    if step == 2:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return real(run, batches, step, *rest)
loop.train_step = train_step
sys.argv = ["dist-clm", "train", *sys.argv[1:]]
from dist_clm.cli import entry
entry()
"""


def test_an_out_of_memory_error_in_training_is_one_sentence_naming_its_snapshot(tmp_path, data_dir):
    """torch's out-of-memory error in a step of a real run (raised there, with torch.cuda's allocator API stood in
    for on this CPU machine): the snapshot written, one sentence and exit 2, no traceback, the end recorded. (It
    was a RuntimeError caught as a possible collective failure first, and reached the user as a traceback.)"""
    import subprocess
    import sys

    from tests.helpers import assert_clean_error

    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY, *TINY, f"data.path={data_dir}", f"run.dir={run}",
                        "train.max_steps=4", "train.eval_every=0"], capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    snapshot = run / "memory" / "rank0.oom-step-2.pickle"
    assert_clean_error(r, "rank 0 ran out of GPU memory at step 2: 3.0 GiB allocated", str(snapshot))
    assert snapshot.is_file() and "4.0 GiB reserved of 4.0 GiB" in r.stderr
    assert "stopped at step 1: rank 0 ran out of GPU memory" in run_cli("status", str(run)).stdout
