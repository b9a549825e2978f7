"""Where numbers go and what they are: TensorBoard event files, a metrics.jsonl beside them, the console
(rank 0 only), and the training scalars of a window of steps (`LogWindow`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

STRAGGLER_LAG = 1.5  # a rank this much slower than the median rank over a log window is a straggler

# Peak dense bf16 tensor-core FLOP/s by GPU name (vendor data sheets, without sparsity), for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12, "A800": 312e12}


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
        if not self.is_main or not scalars:
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


class LogWindow:
    """The steps since the last log line: their losses, time, data wait and blocks per source; `emit()` turns
    them into the logged training scalars and starts a new window."""

    def __init__(self, sources: list[str], tokens_per_step: int, flops_per_token: float, world: int, device: str):
        self.sources, self.tokens_per_step, self.flops = sources, tokens_per_step, flops_per_token
        self.world, self.device = world, device
        self.persistent_straggler: int | None = None  # a rank STRAGGLER_LAG x slow in the last two windows
        self._last_slow: int | None = None
        self._reset()

    def _reset(self) -> None:
        self.start, self.steps, self.losses = time.perf_counter(), 0, []
        self.wait, self.blocks = 0.0, [0] * len(self.sources)
        self.arrivals, self.token_sum = [0.0] * self.world, 0
        self.pairs = [0.0] * 4  # dpo / orpo: pairs, summed rewards chosen and rejected, pairs ranked right

    def add(
        self,
        loss: float,
        good: bool,
        data_wait_s: float,
        blocks_per_source: list[int],
        arrivals: list[float],
        token_sum: int = 0,
        pairs: list[float] | None = None,
    ) -> None:
        """One step (a step.StepResult's fields); its loss counts only if it was good (applied, not a spike)."""
        self.steps += 1
        if pairs:
            self.pairs = [a + b for a, b in zip(self.pairs, pairs, strict=True)]
        self.token_sum += token_sum
        if good:
            self.losses.append(loss)
        self.wait += data_wait_s
        self.blocks = [a + b for a, b in zip(self.blocks, blocks_per_source, strict=True)]
        self.arrivals = [a + b for a, b in zip(self.arrivals, arrivals, strict=True)]

    def straggler(self) -> tuple[int, float]:
        """(the rank that reached the steps' agreement last on average over the window, its time over the
        median rank's): a lag of 1.5 means that rank made every step 50% longer than it needed to be."""
        ordered = sorted(self.arrivals)
        median = ordered[(len(ordered) - 1) // 2]  # (the lower median: of two ranks, the faster one)
        slowest = max(range(self.world), key=lambda r: self.arrivals[r])
        return slowest, (self.arrivals[slowest] / median if median > 0 else 1.0)

    def emit(self, *, lr: float, grad_norm: float, tokens_seen: int, skipped_steps: int) -> dict[str, float]:
        """Collective (one small all-reduce): the window's scalars, the same on every rank."""
        from dist_clm.distributed import all_reduce_sum

        elapsed = time.perf_counter() - self.start
        wait_sum, token_sum, n, chosen, rejected, right, *mix = all_reduce_sum(
            [self.wait, self.token_sum, *self.pairs, *self.blocks], self.device
        )
        out = {"train/loss": sum(self.losses) / len(self.losses)} if self.losses else {}
        out |= {  # (no train/loss when every step of the window was skipped)
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens_per_s": self.steps * self.tokens_per_step / elapsed,
            "train/tokens_seen": tokens_seen,
            "train/data_wait_frac": wait_sum / (self.world * elapsed),  # of step time, mean over ranks
            "train/skipped_steps": skipped_steps,
            # the window's token ids summed over ranks: the same data gives the same sum on any number of ranks
            "data/token_sum": int(token_sum),
        }
        if n:  # preference objectives: dpo's implicit rewards (orpo's log odds) of the window's pairs
            out |= {"train/rewards_chosen": chosen / n, "train/rewards_rejected": rejected / n,
                    "train/reward_accuracy": right / n, "train/reward_margin": (chosen - rejected) / n}  # fmt: skip
        peak = peak_flops(self.device)
        if peak:  # model FLOPs utilization: achieved training FLOP/s per device over the device's peak
            out["train/mfu"] = out["train/tokens_per_s"] * self.flops / (self.world * peak)
        out |= memory_scalars(self.device)
        if self.world > 1 and self.steps:
            rank, lag = self.straggler()
            out |= {"train/straggler_rank": rank, "train/straggler_lag": lag}
            slow = rank if lag >= STRAGGLER_LAG else None
            self.persistent_straggler = slow if slow == self._last_slow else None  # two windows in a row
            self._last_slow = slow
        if len(mix) > 1:
            out |= {f"data/mix/{name}": n / sum(mix) for name, n in zip(self.sources, mix, strict=True)}
        self._reset()
        return out


def peak_flops(device: str) -> float | None:
    """The device's peak dense bf16 FLOP/s if known (MFU is reported only then)."""
    if not device.startswith("cuda"):
        return None
    import torch

    name = torch.cuda.get_device_name(torch.device(device))
    return next((v for k, v in PEAK_BF16.items() if k in name.upper()), None)


def memory_scalars(device: str) -> dict[str, float]:
    """GPU memory allocated/reserved (peak since the last call), or the process's resident memory on CPU."""
    if device.startswith("cuda"):
        import torch

        d = torch.device(device)
        out = {
            "memory/gpu_allocated_gib": torch.cuda.max_memory_allocated(d) / 2**30,
            "memory/gpu_reserved_gib": torch.cuda.max_memory_reserved(d) / 2**30,
        }
        torch.cuda.reset_peak_memory_stats(d)
        return out
    import psutil

    return {"memory/rss_gib": psutil.Process().memory_info().rss / 2**30}
