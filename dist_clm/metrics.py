"""Where numbers go: TensorBoard event files, a metrics.jsonl beside them, and the console (rank 0 only)."""

from __future__ import annotations

import json
from pathlib import Path


class Metrics:
    def __init__(self, run_dir: Path, is_main: bool, tensorboard: bool):
        self.is_main = is_main
        self.writer = None
        if not is_main:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (open for the whole run, closed in close())

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Record `scalars` (names like "train/loss") at `step`."""
        if not self.is_main:
            return
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.is_main:
            if self.writer is not None:
                self.writer.close()
            self.jsonl.close()


def say(is_main: bool, text: str) -> None:
    """Print on rank 0 only, without breaking a tqdm bar."""
    if is_main:
        from tqdm.auto import tqdm

        tqdm.write(text)
