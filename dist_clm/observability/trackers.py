"""The trackers a run's numbers go to beside its own metrics.jsonl (which is always written: resume, export and
the tests read it): TensorBoard event files, Weights & Biases, MLflow (`run.loggers`).

Each gets the same scalars at the same steps, the resolved config as hyperparameters, and the run's identity:
its name (`run.name`, default the run directory's name) and a tracker run that a resumed run continues (the
ids are kept in RUN/trackers.json, written by the first start). Only rank 0 logs. A tracker is for people: one
that fails (unreachable, a full disk, a refused value) is said once as a warning and left out for the rest of
the run; training goes on.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from dist_clm import console

LOGGERS = ("tensorboard", "jsonl", "wandb", "mlflow")
IDENTITY = "trackers.json"


class Tracker:
    name = ""
    where = ""  # where its numbers go, said once when it opens

    def log(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def note(self, step: int, name: str, text: str) -> None:
        """A sentence at `step` (only some trackers keep text)."""

    def close(self) -> None:
        pass


class TensorBoard(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict | None = None, name: str = ""):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if config:  # the resolved config and the run's name, in the text tab (TensorBoard keeps no params)
            import yaml

            text = yaml.safe_dump(config, sort_keys=False)
            self.writer.add_text("config", f"run {name or run_dir.name}\n\n    " + text.replace("\n", "\n    "), 0)

    def log(self, step, scalars):
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def note(self, step, name, text):
        self.writer.add_text(name, text, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


def wandb_settings(settings, run_dir: Path, environ=os.environ) -> dict:
    """wandb.init's project, entity, mode and dir: run.wandb_* where set, else wandb's own variables, else
    dist_clm's defaults (project dist-clm, offline, files in the run directory)."""
    return {
        "project": settings.wandb_project or environ.get("WANDB_PROJECT") or "dist-clm",
        "entity": settings.wandb_entity or environ.get("WANDB_ENTITY") or None,
        "mode": settings.wandb_mode or environ.get("WANDB_MODE") or "offline",
        "dir": environ.get("WANDB_DIR") or str(run_dir),
    }


def mlflow_settings(settings, run_dir: Path, environ=os.environ) -> dict:
    """The MLflow tracking URI and experiment: run.mlflow_* where set, else MLflow's own variables, else a SQLite
    file in the run directory and the experiment dist-clm (MLflow's file store is deprecated)."""
    return {
        "uri": settings.mlflow_tracking_uri or environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{(run_dir / 'mlflow.db').absolute()}",
        "experiment": settings.mlflow_experiment or environ.get("MLFLOW_EXPERIMENT_NAME") or "dist-clm",
    }  # fmt: skip


class Wandb(Tracker):
    """Weights & Biases: online, or offline into RUN/wandb (`wandb sync RUN/wandb/offline-run-*` uploads it)."""

    name = "wandb"

    def __init__(self, run_dir: Path, settings, config: dict, run_id: str):
        import wandb

        w = wandb_settings(settings, run_dir)
        self.run = wandb.init(**w, name=settings.name or run_dir.name, id=run_id, resume="allow", config=config,
                              settings=wandb.Settings(init_timeout=60, silent=True, console="off"))  # fmt: skip
        where = f"files in {w['dir']}/wandb" if w["mode"] == "offline" else "online"
        self.where = f"{w['mode']}, project {w['project']}, {where}"

    def log(self, step, scalars):
        self.run.log(dict(scalars), step=step)

    def close(self):
        self.run.finish()


class Mlflow(Tracker):
    """MLflow through its client: a tracking URI (default: sqlite:///RUN/mlflow.db), an experiment, one run."""

    name = "mlflow"

    def __init__(self, run_dir: Path, settings, config: dict, run_id: str | None, on_new_run):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a server that does not answer: fail soon
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        m = mlflow_settings(settings, run_dir)
        self.client = MlflowClient(tracking_uri=m["uri"])
        self.where = f"{m['uri']}, experiment {m['experiment']}"
        if run_id is None:
            experiment = self.client.get_experiment_by_name(m["experiment"])
            exp_id = experiment.experiment_id if experiment else self.client.create_experiment(m["experiment"])
            run = self.client.create_run(exp_id, run_name=settings.name or run_dir.name,
                                         tags={"dist_clm.run_dir": str(run_dir.absolute())})  # fmt: skip
            run_id = run.info.run_id
            params = [Param(k[:250], str(v)[:6000]) for k, v in flatten(config).items()]
            for i in range(0, len(params), 100):  # (MLflow takes at most 100 params a batch)
                self.client.log_batch(run_id, params=params[i : i + 100])
            on_new_run(run_id)
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")

    def log(self, step, scalars):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def note(self, step, name, text):
        self.client.set_tag(self.run_id, f"{name}@{step}", text[:5000])

    def close(self):
        self.client.set_terminated(self.run_id)


def flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= flatten(v, key + ".")
        else:
            out[key] = v
    return out


def open_trackers(run_dir: Path, settings, config: dict) -> list[Tracker]:
    """The trackers `settings` (RunConfig) asks for, opened on rank 0; one that cannot open is a warning."""
    ids_path = run_dir / IDENTITY
    ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}

    def keep(key: str, value: str) -> None:
        from dist_clm.fsutil import atomic_write_text

        ids[key] = value
        atomic_write_text(ids_path, json.dumps(ids, indent=1))

    trackers: list[Tracker] = []
    for name in settings.loggers:
        try:
            if name == "tensorboard" and settings.tensorboard:
                trackers.append(TensorBoard(run_dir, config, settings.name))
            elif name == "wandb":
                if "wandb" not in ids:
                    keep("wandb", secrets.token_hex(4))
                trackers.append(Wandb(run_dir, settings, config, ids["wandb"]))
            elif name == "mlflow":
                trackers.append(Mlflow(run_dir, settings, config, ids.get("mlflow"), lambda rid: keep("mlflow", rid)))
        except Exception as e:  # noqa: BLE001 (each tracker raises its own types)
            said(name, e)
        else:
            if trackers and trackers[-1].name == name and trackers[-1].where:
                console.info(f"{name}: {trackers[-1].where}")  # once, where its numbers go
    return trackers


def said(name: str, e: BaseException) -> None:
    detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    console.warning(f"the {name} tracker failed ({type(e).__name__}: {detail}); the run goes on without it")
