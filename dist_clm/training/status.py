"""A run read back from its directory, for `dist-clm status RUN`: one screen from the files the run writes as it
goes (config.yaml, metrics.jsonl, the checkpoints' completion markers, the lock, incidents/ and end.json), so it
works from any machine that sees the directory, while the run trains and after it stopped.

end.json is the one file written for it: rank 0 records how each attempt ended (finished, stopped by a signal
and checkpointed, or stopped by an error, with the sentence it said).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from dist_clm.checkpointing.checkpointer import COMPLETE, complete_checkpoints
from dist_clm.checkpointing.rundir import holder
from dist_clm.console import duration
from dist_clm.errors import UserError
from dist_clm.fsutil import atomic_write_text
from dist_clm.observability.timing import PHASES
from dist_clm.training.incidents import INCIDENTS

END = "end.json"


def record_end(run_dir: str | Path, outcome: str, step: int, sentence: str = "") -> None:
    """Rank 0, as an attempt ends: `outcome` (finished, preempted, stopped), the step it reached, its sentence."""
    record = {"outcome": outcome, "step": step, "sentence": sentence, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(Path(run_dir) / END, json.dumps(record))


def read(run_dir: str | Path) -> dict:
    """The run's figures: what is known of each, None where the run has not written it (yet)."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise UserError(f"'{run}' is not a run directory (no config.yaml); give the run.dir a training run wrote.")
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    rows = []
    if (run / "metrics.jsonl").is_file():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # (the line being written)
                continue
    train = [r for r in rows if "train/tokens_seen" in r]
    last = train[-1] if train else {}
    val = next((r for r in reversed(rows) if "val/loss" in r), None)
    loss = next((r["train/loss"] for r in reversed(train) if "train/loss" in r), None)
    checkpoints = complete_checkpoints(run)
    end = json.loads((run / END).read_text()) if (run / END).is_file() else None
    incidents = []
    for path in sorted((run / INCIDENTS).glob("step-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        try:
            incidents.append((int(path.stem.split("-")[1]), json.loads(path.read_text())["reason"]))
        except (json.JSONDecodeError, KeyError):
            continue
    return {
        "run": str(run),
        "running": holder(run),
        "max_steps": config["train"]["max_steps"],
        "step": last.get("step"),
        "tokens_seen": last.get("train/tokens_seen"),
        "loss": loss,
        "lr": last.get("train/lr"),
        "tokens_per_s": last.get("train/tokens_per_s"),
        "mfu": last.get("train/mfu"),
        "time": {p: last[f"time/{p}"] for p in (*PHASES, "other") if f"time/{p}" in last},
        "val": (val["step"], val["val/loss"]) if val else None,
        "checkpoint": (int(checkpoints[-1].name.split("_")[1]), (checkpoints[-1] / COMPLETE).stat().st_mtime)
        if checkpoints
        else None,
        "incidents": incidents,
        "end": end,
    }


def _count(n: float) -> str:
    """1.02 k, 3.9 M, 1.2 B: a count of tokens at a glance."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f}"


def _ago(seconds: float) -> str:
    return f"{duration(max(0.0, seconds))} ago"


def screen(s: dict, now: float | None = None) -> str:
    """The figures of `read` as the lines `dist-clm status` prints."""
    now = time.time() if now is None else now
    end = s["end"]
    if s["running"]:
        state = f"training ({s['running']})"
    elif end and end["outcome"] == "finished":
        state = f"finished at step {end['step']}"
    elif end and end["outcome"] == "preempted":
        state = f"stopped at step {end['step']} by {end['sentence']} after a checkpoint; rerun it to continue"
    elif end:
        state = f"stopped at step {end['step']}: {end['sentence']}"  # (the step the attempt had reached)
    else:
        state = "not training (no process holds it, and it recorded no end: killed, or not started yet)"
    lines = [f"run {s['run']}: {state}"]
    step, total = s["step"], s["max_steps"]
    if step is None:
        lines.append(f"no step logged yet (of {total})")
        return "\n".join(lines)
    tokens, rate = s["tokens_seen"], s["tokens_per_s"]
    per_step = tokens / step if step else 0
    line = f"step {step} of {total} ({step / total:.0%}), {_count(tokens)} tokens of about {_count(per_step * total)}"
    if rate and step < total and (s["running"] or not end):
        line += f"; about {duration((total - step) * per_step / rate)} left at {rate:,.0f} tokens/s"
    lines.append(line)
    figures = [f"loss {s['loss']:.4g}" if s["loss"] is not None and math.isfinite(s["loss"]) else "loss -"]
    if s["val"]:
        figures.append(f"validation {s['val'][1]:.4g} at step {s['val'][0]}")
    if s["lr"] is not None:
        figures.append(f"lr {s['lr']:.3g}")
    if rate:
        figures.append(f"{rate:,.0f} tokens/s")
    if s["mfu"] is not None:
        figures.append(f"MFU {s['mfu']:.1%}")
    lines.append(", ".join(figures))
    if s["time"]:
        shares = sorted(((p, v) for p, v in s["time"].items() if v >= 0.005), key=lambda kv: -kv[1])
        lines.append("time (the last log window): " + ", ".join(f"{p.replace('_', ' ')} {v:.0%}" for p, v in shares))
    if s["checkpoint"]:
        at, when = s["checkpoint"]
        lines.append(f"last complete checkpoint: step {at} ({_ago(now - when)})")
    else:
        lines.append("no complete checkpoint yet")
    if s["incidents"]:
        shown = "; ".join(f"step {st}: {why}" for st, why in s["incidents"][-3:])
        more = f" (and {len(s['incidents']) - 3} earlier)" if len(s["incidents"]) > 3 else ""
        lines.append(f"incidents: {shown}{more}; in {s['run']}/{INCIDENTS}/")
    return "\n".join(lines)
