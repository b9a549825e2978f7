"""Downstream tasks through lm-evaluation-harness, in-process on a model already loaded: `dist-clm eval CKPT
--tasks ...` and, during training, `train.eval_tasks`.

Tasks are named as the harness names them (its own tasks: their data comes from the Hugging Face Hub, so a
machine that can reach it), or given as local task definitions in the harness's YAML format (a directory of
them, or one file), or taken from dist_clm's own offline suite, built on first use from data every machine has:

- `dist_clm_arith`: 200 additions "a + b =", four numbers to choose from (multiple choice: acc, acc_norm);
- `dist_clm_code_next_line`: 200 passages of the Python standard library, the line that follows among four
  (multiple choice);
- `dist_clm_code_cloze`: 200 lines of it, the last word after the rest of the line (loglikelihood: the
  share of words the model would pick greedily, and their perplexity);
- `dist_clm_suite`: the three.

The harness runs on one process with the whole model (its `HFLM` around the model object; the harness shares
work between ranks only among processes it starts itself through accelerate): during training the other ranks
wait outside any collective, so a long task suite never reads as a lost peer, and under ZeRO-3 rank 0 runs it on
a plain copy of the model that every rank helps gather (`plain_copy`). Random state (python, numpy, torch) is kept
and restored around it, and the model's train/eval mode too: a run with downstream tasks trains bit for bit
like one without.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import time
from pathlib import Path

from dist_clm.errors import UserError

SUITE = ("dist_clm_arith", "dist_clm_code_next_line", "dist_clm_code_cloze")
SUITE_GROUP = "dist_clm_suite"
SUITE_VERSION = 1
_N = 200


def suite_dir() -> Path:
    """Where the offline suite is built (once; the same bytes on every machine with the same Python)."""
    base = Path(os.environ.get("DIST_CLM_CACHE", Path.home() / ".cache" / "dist_clm"))
    return base / f"eval_suite_v{SUITE_VERSION}"


def build_suite(root: Path | None = None) -> Path:
    from dist_clm.fsutil import atomic_write_text

    root = root or suite_dir()
    if (root / "COMPLETE").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = {
        "dist_clm_arith": _arith(rng),
        "dist_clm_code_next_line": _next_line(rng),
        "dist_clm_code_cloze": _cloze(rng),
    }
    for name, docs in rows.items():
        data = root / f"{name}.jsonl"
        atomic_write_text(data, "".join(json.dumps(d) + "\n" for d in docs))  # (two builders at once: both whole)
        kind = "loglikelihood" if name == "dist_clm_code_cloze" else "multiple_choice"
        spec = {
            "task": name,
            "tag": [SUITE_GROUP],
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data.absolute())}},
            "test_split": "test",
            "output_type": kind,
            "doc_to_text": "{{context}}",
            "doc_to_target": "{{target}}" if kind == "loglikelihood" else "{{label}}",
            "metric_list": [
                {"metric": m, "aggregation": a, "higher_is_better": h}
                for m, a, h in (
                    [("acc", "mean", True), ("perplexity", "perplexity", False)]
                    if kind == "loglikelihood"
                    else [("acc", "mean", True), ("acc_norm", "mean", True)]
                )
            ],  # fmt: skip
            "metadata": {"version": SUITE_VERSION},
        }
        if kind == "multiple_choice":
            spec["doc_to_choice"] = "{{choices}}"
        atomic_write_text(root / f"{name}.yaml", json.dumps(spec, indent=1))  # (JSON is YAML)
    atomic_write_text(root / "COMPLETE", "")
    return root


def _arith(rng: random.Random) -> list[dict]:
    out = []
    for _ in range(_N):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        wrong = rng.sample([x for x in range(max(0, a + b - 12), a + b + 13) if x != a + b], 3)
        choices = [str(a + b), *map(str, wrong)]
        rng.shuffle(choices)
        out.append(
            {"context": f"{a} + {b} =", "choices": [f" {c}" for c in choices], "label": choices.index(str(a + b))}
        )
    return out


def _code_lines(rng: random.Random) -> list[list[str]]:
    from dist_clm.data.sources import default_corpus_files

    files = default_corpus_files()
    rng.shuffle(files)
    return [[line.rstrip() for line in f.read_text(errors="replace").splitlines() if line.strip()] for f in files]


def _next_line(rng: random.Random) -> list[dict]:
    files = [lines for lines in _code_lines(rng) if len(lines) > 20]
    pool = [line for lines in files for line in lines if 10 <= len(line.strip()) <= 80]
    out = []
    while len(out) < _N:
        lines = rng.choice(files)
        i = rng.randrange(3, len(lines) - 1)
        true = lines[i]
        if not 10 <= len(true.strip()) <= 80:
            continue
        choices = [true, *rng.sample([x for x in pool if x != true], 3)]
        rng.shuffle(choices)
        out.append({"context": "\n".join(lines[i - 3 : i]) + "\n", "choices": choices, "label": choices.index(true)})
    return out


def _cloze(rng: random.Random) -> list[dict]:
    lines = [line for f in _code_lines(rng) for line in f if re.search(r"\S.*[ .(]\w{3,}$", line) and len(line) < 100]
    rng.shuffle(lines)
    out = []
    for line in lines[:_N]:  # (a context that ends in spaces: the harness moves them to the target)
        cut = re.search(r"\w{3,}$", line).start()
        out.append({"context": line[:cut], "target": line[cut:]})
    return out


def resolve(tasks: list[str]) -> tuple[list[str], list[str], bool]:
    """(the task names, the folders of local definitions to include, whether the harness's own are needed)."""
    names, folders, builtin = [], [], False
    for item in tasks:
        if item in SUITE or item == SUITE_GROUP:
            folders.append(str(build_suite()))
            names += list(SUITE) if item == SUITE_GROUP else [item]
            continue
        p = Path(item)
        if p.exists():
            specs = sorted(p.glob("*.yaml")) + sorted(p.glob("*.yml")) if p.is_dir() else [p]
            found = [_task_name(f) for f in specs]
            if not any(found):
                raise UserError(f"'{item}' holds no task definition (a YAML file with a `task:` key); see the "
                                "lm-evaluation-harness task guide for the format.")  # fmt: skip
            folders.append(str(p if p.is_dir() else p.parent))
            names += [n for n in found if n]
            continue
        names.append(item)
        builtin = True
    return list(dict.fromkeys(names)), list(dict.fromkeys(folders)), builtin


def check_tasks(tasks: list[str]):
    """(the task names, the harness's TaskManager that knows them), or one sentence naming what is not a task."""
    from lm_eval.tasks import TaskManager

    names, folders, builtin = resolve(tasks)
    manager = TaskManager(include_path=folders or None, include_defaults=builtin)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        ours = ", ".join((*SUITE, SUITE_GROUP))
        raise UserError(f"unknown task {', '.join(map(repr, unknown))}: not a task of lm-evaluation-harness, not "
                        f"a folder or YAML file of task definitions, not one of {ours}.")  # fmt: skip
    return names, manager


def _task_name(path: Path) -> str | None:
    import yaml

    class Loader(yaml.SafeLoader):  # the harness's own tags (`!function utils.process_docs`) read as None
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        spec = yaml.load(path.read_text(), Loader=Loader)
    except (OSError, yaml.YAMLError):
        return None
    return spec.get("task") if isinstance(spec, dict) and isinstance(spec.get("task"), str) else None


@contextlib.contextmanager
def _quiet():
    """The harness's own output (progress frames, a git probe's complaint) kept out of the run's log: the
    process's stderr goes to a file meanwhile, given back if the harness fails."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            caught.seek(0)
            sys.stderr.write(caught.read().decode(errors="replace")[-4000:])
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def _kept_state(model):
    """Random state and train/eval mode as they were, whatever the harness does (it may seed and switch)."""
    import numpy as np
    import torch

    py, npy, training = random.getstate(), np.random.get_state(), model.training
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        model.train(training)


def run_tasks(model, tok, tasks: list[str], device, limit: int = 0, batch_size: int = 8,
              num_fewshot: int | None = None) -> dict[str, dict[str, float]]:  # fmt: skip
    """{task: {metric: value}} of `tasks` on `model` (on `device`), each on its first `limit` examples (0: all)."""
    import logging

    from dist_clm.models.build import max_positions

    for noisy in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import datasets
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    datasets.disable_progress_bars()
    names, manager = check_tasks(tasks)

    class Quiet(HFLM):  # (its progress bars would be carriage-return frames in a run's log)
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    with _kept_state(model), _quiet():
        lm = Quiet(pretrained=model, tokenizer=tok, batch_size=batch_size, device=str(device),
                  max_length=max_positions(model.config) or 2048)  # fmt: skip
        try:
            out = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit or None,
                                  num_fewshot=num_fewshot, random_seed=None, numpy_random_seed=None,
                                  torch_random_seed=None, log_samples=False, verbosity="ERROR",
                                  bootstrap_iters=0)  # fmt: skip
        except (ConnectionError, OSError, ValueError) as e:
            said = str(e).strip()
            if any(w in said.lower() for w in ("offline", "connect", "hub")):
                fix = "run where the Hugging Face Hub is reachable, or give local task definitions"
                raise UserError(
                    f"the data of task {', '.join(names)} could not be loaded ({said[:200]}); {fix}."
                ) from None
            raise
    results = {}
    for task, values in out["results"].items():
        metrics = {k.split(",")[0]: float(v) for k, v in values.items()
                   if "," in k and "stderr" not in k and isinstance(v, int | float)}  # fmt: skip
        if metrics:
            results[task] = metrics
    return results


def scalars(results: dict[str, dict[str, float]], seconds: float) -> dict[str, float]:
    """The logged names: eval/<task>/<metric>, and eval/time_s."""
    out = {f"eval/{task}/{metric}": value for task, values in results.items() for metric, value in values.items()}
    return out | {"eval/time_s": seconds}


def table(results: dict[str, dict[str, float]]) -> str:
    rows = [
        (task, metric, f"{value:.4f}") for task, values in sorted(results.items()) for metric, value in values.items()
    ]
    width = max((len(r[0]) for r in rows), default=4)
    return "\n".join([f"{'task':<{width}}  metric      value", *(f"{t:<{width}}  {m:<10}  {v}" for t, m, v in rows)])


def timed(model, tok, tasks, device, **kw) -> tuple[dict, float]:
    start = time.perf_counter()
    results = run_tasks(model, tok, tasks, device, **kw)
    return results, time.perf_counter() - start


class InLoop:
    """`train.eval_tasks` during training: every `train.eval_tasks_every` steps (0: at every validation) and at
    the end, on the current weights, logged as eval/<task>/<metric> and eval/time_s. Rank 0 runs the harness (under
    ZeRO-3 on `plain_copy`, gathered by every rank); the others wait outside any collective for as long as it
    takes, while rank 0's heartbeat moves (parallel/heartbeat.py). An error on rank 0 (a task that cannot load)
    is every rank's, in one sentence."""

    def __init__(self, run, metrics):
        t = run.cfg.train
        self.run, self.metrics, self.tasks = run, metrics, list(t.eval_tasks)
        self.every, self.limit = t.eval_tasks_every or t.eval_every, t.eval_tasks_limit
        self._tok, self._calls = None, 0
        if self.tasks and run.sp.size > 1:
            raise UserError("train.eval_tasks do not run under sequence parallelism yet (the model's forward is "
                            "sharded); evaluate its checkpoints with `dist-clm eval RUN --tasks ...`.")  # fmt: skip
        if self.tasks and run.tp.size > 1:
            raise UserError("train.eval_tasks do not run under tensor parallelism yet (rank 0 runs the harness alone, "
                            "and each layer's matrices are split over its group); evaluate its checkpoints with "
                            "`dist-clm eval RUN --tasks ...`.")  # fmt: skip
        if self.tasks:  # (a name that is no task: said before the first step, not at the first evaluation)
            from dist_clm.parallel.collectives import agree_on_error

            error = None
            if run.env.is_main:
                try:
                    check_tasks(self.tasks)
                except UserError as e:
                    error = e
            agree_on_error(error, run.env.device)

    @property
    def tokenizer(self):
        if self._tok is None:
            from pathlib import Path

            from dist_clm.data.tokenizer import load_tokenizer

            self._tok = load_tokenizer(Path(self.run.cfg.run.dir) / "tokenizer")
        return self._tok

    def due(self, step: int) -> bool:
        return bool(self.tasks and self.every and step % self.every == 0)

    def __call__(self, step: int) -> None:
        if not self.tasks:
            return
        from dist_clm import console
        from dist_clm.parallel.collectives import agree_on_error
        from dist_clm.parallel.heartbeat import set_done, wait_done

        engine, env = self.run.engine, self.run.env
        self._calls += 1
        model = engine.module
        if engine.zero_optimization_stage() == 3:  # (collective: every rank gathers, rank 0 alone keeps)
            model = plain_copy(model, keep=env.is_main)
        error, results, seconds = None, {}, 0.0
        done = f"dist_clm/downstream/{self._calls}"
        if env.is_main:
            try:
                results, seconds = timed(model, self.tokenizer, self.tasks, env.device, limit=self.limit,
                                         batch_size=self.run.cfg.train.micro_batch_size)  # fmt: skip
            except UserError as e:
                error = e
            finally:
                set_done(done)
        else:  # (the harness may take hours: no collective timeout, only rank 0's heartbeat)
            wait_done(done, 0, self.run.cfg.distributed.collective_timeout_s)
        del model
        agree_on_error(error, env.device)
        self.metrics.log(step, scalars(results, seconds))
        shown = "; ".join(f"{task} {', '.join(f'{m} {v:.3f}' for m, v in values.items())}"
                          for task, values in results.items())  # fmt: skip
        console.info(f"step {step}: downstream ({seconds:.1f} s): {shown}")


def plain_copy(model, keep: bool):
    """Collective under ZeRO-3: `model` as a plain module with its whole weights on this rank when `keep` (else
    None), gathered one module's parameters at a time. Rank 0 runs the harness on this copy rather than on the
    engine's module: the same weights and modules, so one process's numbers, but no ZeRO-3 hook, which would
    gather with ranks that are not there; only the keeping rank holds the whole model."""
    import copy

    import deepspeed
    import torch

    mine = None
    if keep:
        with torch.device("meta"):  # (no memory, no initialisation: every tensor comes from `model`)
            plain = type(model)(copy.deepcopy(model.config))
        plain.generation_config = model.generation_config
        mine = dict(plain.named_modules(remove_duplicate=False))
    made = {}  # id of a parameter of `model` -> its whole copy (a tied one is copied once and stays tied)
    for name, module in model.named_modules(remove_duplicate=False):
        own = [p for p in module._parameters.values() if p is not None and id(p) not in made]
        with deepspeed.zero.GatheredParameters(own, modifier_rank=None):
            for p in own:
                made[id(p)] = torch.nn.Parameter(p.detach().clone(), requires_grad=False) if keep else None
        if not keep:
            continue
        into = mine[name]
        for key, p in module._parameters.items():
            into._parameters[key] = None if p is None else made[id(p)]
        into._buffers.update(module._buffers)  # (buffers are never partitioned: shared, read only)
        for key, value in vars(into).items():  # tensors held as plain attributes (e.g. rotary's original_inv_freq)
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(into, key, getattr(module, key))
    return plain.eval() if keep else None
