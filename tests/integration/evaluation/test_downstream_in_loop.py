"""Downstream tasks during training on several ranks (train.eval_tasks): ZeRO-3 with every parameter partitioned,
a task suite that outlasts the collective timeout; the numbers those of the whole model on one process."""

import json
import os
import subprocess

import pytest

from dist_clm.parallel.process_group import free_port
from tests.helpers import BIN, TINY, metrics

SLOW_S = 8  # the user's task takes this long to load, past the collective timeout of 5 s
USER_TASK = """\
task: slow_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
process_docs: !function slow.process_docs
doc_to_text: '{{{{context}}}}'
doc_to_target: '{{{{target}}}}'
metric_list:
  - metric: acc
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""
SLOW_PY = """\
import os, time


def process_docs(docs):  # (once per process: the harness reads the docs more than once)
    if os.environ.get("SLOW_TASK_S") and not os.environ.get("SLOW_TASK_DONE"):
        time.sleep(float(os.environ["SLOW_TASK_S"]))
        os.environ["SLOW_TASK_DONE"] = "1"
    return docs
"""


@pytest.mark.slow
def test_downstream_tasks_on_two_zero3_ranks_outlast_the_collective_timeout(tmp_path, data_dir):
    """Two ranks, ZeRO-3 with no parameter kept whole (stage3_param_persistence_threshold 0), a collective timeout
    of 5 s and a user's task that takes 8 s: the run ends with exit 0, no rank taken for lost, and the logged
    numbers are those the saved weights give as one plain model in this process."""
    from dist_clm.evaluation import downstream
    from dist_clm.evaluation.export import load_model

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    lines = [("def f(x):\n    return", " x"), ("import", " os"), ("for i in", " range"), ("class A(", "object")]
    (tasks / "docs.jsonl").write_text("".join(json.dumps({"context": c, "target": t}) + "\n" for c, t in lines * 3))
    (tasks / "slow.yaml").write_text(USER_TASK.format(data=tasks / "docs.jsonl"))
    (tasks / "slow.py").write_text(SLOW_PY)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    run = tmp_path / "run"
    args = [*TINY, f"data.path={data_dir}", f"run.dir={run}", "distributed.zero_stage=3",
            f"distributed.deepspeed_config={ds}", "distributed.collective_timeout_s=5", "train.max_steps=2",
            "optim.warmup_steps=1", "train.eval_every=0", f"train.eval_tasks=[dist_clm_arith, {tasks}]",
            "train.eval_tasks_limit=12"]  # fmt: skip
    r = subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "dist_clm",
         "train", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "SLOW_TASK_S": str(SLOW_S)},
    )  # fmt: skip
    said = r.stdout + r.stderr
    assert r.returncode == 0 and "lost the other ranks" not in said, said[-4000:]
    logged = next(row for row in metrics(run) if "eval/time_s" in row)
    assert logged["step"] == 2 and logged["eval/time_s"] >= SLOW_S  # (the harness ran past the timeout)
    got = {k.split("/", 1)[1]: v for k, v in logged.items() if k.startswith("eval/") and k != "eval/time_s"}
    assert set(got) == {"dist_clm_arith/acc", "dist_clm_arith/acc_norm", "slow_cloze/acc", "slow_cloze/perplexity"}
    # the same numbers as the whole model in one process (the step-2 checkpoint holds the weights evaluated)
    model, tok, _ = load_model(run)
    want = downstream.run_tasks(model, tok, ["dist_clm_arith", str(tasks)], "cpu", limit=12, batch_size=4)
    assert got == pytest.approx({f"{t}/{m}": v for t, values in want.items() for m, v in values.items()}, rel=1e-5)
