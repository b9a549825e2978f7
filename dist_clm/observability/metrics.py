"""Where numbers go and what they are: TensorBoard event files, a metrics.jsonl beside them, the console
(rank 0 only), and the training scalars of a window of steps (`LogWindow`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dist_clm.observability.timing import split_scalars

STRAGGLER_LAG = 1.5  # a rank this much slower than the median rank over a log window is a straggler

# Peak dense FLOP/s by GPU, from the vendors' data sheets (without sparsity), for MFU: (the words of the
# device's name that pick the row, e.g. 'NVIDIA H100 PCIe' -> H100 + PCIE; the first row whose words are all
# there wins) -> per precision: bf16 and fp16 on tensor cores, tf32 (fp32 runs with train.tf32), fp32 on the
# CUDA cores. None: not there (V100 and T4 emulate bf16).
PEAKS: list[tuple[tuple[str, ...], dict[str, float | None]]] = [
    (("H100", "NVL"), dict(bf16=835e12, fp16=835e12, tf32=418e12, fp32=60e12)),
    (("H100", "PCIE"), dict(bf16=756e12, fp16=756e12, tf32=378e12, fp32=51e12)),
    (("H100",), dict(bf16=989e12, fp16=989e12, tf32=495e12, fp32=67e12)),  # SXM
    (("H200", "NVL"), dict(bf16=835e12, fp16=835e12, tf32=418e12, fp32=60e12)),
    (("H200",), dict(bf16=989e12, fp16=989e12, tf32=495e12, fp32=67e12)),
    (("GH200",), dict(bf16=989e12, fp16=989e12, tf32=495e12, fp32=67e12)),
    (("H800", "PCIE"), dict(bf16=756e12, fp16=756e12, tf32=378e12, fp32=51e12)),
    (("H800",), dict(bf16=989e12, fp16=989e12, tf32=495e12, fp32=67e12)),
    (("B200",), dict(bf16=2250e12, fp16=2250e12, tf32=1100e12, fp32=None)),
    (("A100",), dict(bf16=312e12, fp16=312e12, tf32=156e12, fp32=19.5e12)),
    (("A800",), dict(bf16=312e12, fp16=312e12, tf32=156e12, fp32=19.5e12)),
    (("L40S",), dict(bf16=362e12, fp16=362e12, tf32=183e12, fp32=91.6e12)),
    (("L4",), dict(bf16=121e12, fp16=121e12, tf32=60e12, fp32=30.3e12)),
    (("A10",), dict(bf16=125e12, fp16=125e12, tf32=62.5e12, fp32=31.2e12)),
    (("V100",), dict(bf16=None, fp16=125e12, tf32=None, fp32=15.7e12)),
    (("T4",), dict(bf16=None, fp16=65e12, tf32=None, fp32=8.1e12)),
]


def loss_text(loss: float) -> str:
    """A loss as the console shows it: four significant digits, in scientific notation when small, so that a
    preference loss near 0 reads 3.304e-06, never 0.000."""
    return f"{loss:.4g}"


class Metrics:
    """Rank 0 records every logged number in RUN/metrics.jsonl and sends it to the run's trackers (trackers.py:
    TensorBoard, wandb, MLflow); the other ranks record nothing."""

    def __init__(
        self, run_dir: Path, is_main: bool, tensorboard: bool = True, settings=None, config: dict | None = None
    ):
        """`settings`: the run's RunConfig (its loggers); without it, TensorBoard if `tensorboard`."""
        self.is_main, self.trackers = is_main, []
        if not is_main:
            return
        from dist_clm.observability import trackers

        if settings is not None:
            self.trackers = trackers.open_trackers(run_dir, settings, config or {})
        elif tensorboard:
            self.trackers = [trackers.TensorBoard(run_dir)]
        self.jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (open for the whole run, closed in close())

    def _each(self, call) -> None:
        """`call(tracker)` for every tracker; one that fails is said once and left out (training goes on)."""
        from dist_clm.observability.trackers import said

        for t in list(self.trackers):
            try:
                call(t)
            except Exception as e:  # noqa: BLE001 (each tracker raises its own types)
                said(t.name, e)
                self.trackers.remove(t)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Record `scalars` (names like "train/loss") at `step`."""
        if not self.is_main or not scalars:
            return
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        self._each(lambda t: t.log(step, scalars))

    def note(self, step: int, name: str, text: str) -> None:
        """Record a sentence (a skipped step's reason) at `step`: in metrics.jsonl, and the trackers that keep text
        (TensorBoard's text tab)."""
        if not self.is_main:
            return
        self.jsonl.write(json.dumps({"step": step, name: text}) + "\n")
        self.jsonl.flush()
        self._each(lambda t: t.note(step, name, text))

    def close(self) -> None:
        if self.is_main:
            self._each(lambda t: t.close())
            self.jsonl.close()


class LogWindow:
    """The steps since the last log line: their losses, time, data wait and blocks per source; `emit()` turns
    them into the logged training scalars and starts a new window."""

    def __init__(self, sources: list[str], tokens_per_step: int, flops_per_token: float, world: int, device: str,
                 precision: str = "bf16", tf32: bool = True, objective=None, router=None, phases=None,
                 rank: int = 0):  # fmt: skip
        self.sources, self.tokens_per_step, self.flops = sources, tokens_per_step, flops_per_token
        self.world, self.device, self.rank = world, device, rank
        self.phases = phases  # (timing.Phases) this rank's time split since the last window, or None: none logged
        self.objective = objective  # (training/objectives.py) names what its statistics log; None: the window logs none
        self.router = router  # (moe.RouterLoad) an MoE model's router load since the last window, or None
        self.peak = peak_flops(device, precision, tf32)  # (None on the CPU and on GPUs not in PEAKS)
        self.persistent_straggler: int | None = None  # a rank STRAGGLER_LAG x slow in the last two windows
        self._last_slow: int | None = None
        self._reset()

    def _reset(self) -> None:
        self.start, self.steps, self.losses = time.perf_counter(), 0, []
        self.wait, self.blocks = 0.0, [0] * len(self.sources)
        self.arrivals, self.token_sum, self.tokens = [0.0] * self.world, 0, 0
        self.stats = None  # the objective's statistics summed over the window's steps, on the device (read at emit)

    def add(
        self,
        loss: float,
        good: bool,
        data_wait_s: float,
        blocks_per_source: list[int],
        arrivals: list[float],
        token_sum: int = 0,
        stats=None,
        tokens: int | None = None,
    ) -> None:
        """One step (a step.StepResult's fields, and its training tokens: default tokens_per_step); its loss
        counts only if it was good (applied, not a spike)."""
        self.steps += 1
        self.tokens += self.tokens_per_step if tokens is None else tokens
        if stats is not None:
            self.stats = stats if self.stats is None else self.stats + stats
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

    def emit(self, *, lr: float, grad_norm: float, tokens_seen: int, skipped_steps: int,
             muon_lr: float | None = None) -> dict[str, float]:  # fmt: skip
        """Collective (one small all-reduce): the window's scalars, the same on every rank."""
        from dist_clm.parallel.collectives import all_reduce_sum

        elapsed = time.perf_counter() - self.start
        n_stats = len(self.objective.stats) if self.objective is not None else 0
        stats = [] if not n_stats else self.stats if self.stats is not None else [0.0] * n_stats
        routed = [self.router.take()] if self.router is not None else []  # (one entry: a vector)
        n_routed = len(routed[0]) if routed else 0
        split = self.phases.take() if self.phases is not None else []
        memory = memory_scalars(self.device)  # (this rank's peaks since the last window)
        mine = [*split, *memory.values()]  # every rank's, gathered by the reduction: each fills its own slots
        slots = [0.0] * (self.world * len(mine))
        slots[self.rank * len(mine) : (self.rank + 1) * len(mine)] = mine
        wait_sum, token_sum, *rest = all_reduce_sum(  # (the device's sums join the one reduction)
            [self.wait, self.token_sum, *stats, *routed, *slots, *self.blocks], self.device
        )
        sums, routed, rest = rest[:n_stats], rest[n_stats : n_stats + n_routed], rest[n_stats + n_routed :]
        slots, mix = rest[: len(slots)], rest[len(slots) :]
        out = {"train/loss": sum(self.losses) / len(self.losses)} if self.losses else {}
        out |= {  # (no train/loss when every step of the window was skipped)
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens_per_s": self.tokens / elapsed,
            "train/tokens_seen": tokens_seen,
            "train/data_wait_frac": wait_sum / (self.world * elapsed),  # of step time, mean over ranks
            "train/skipped_steps": skipped_steps,
            # the window's token ids summed over ranks: the same data gives the same sum on any number of ranks
            "data/token_sum": int(token_sum),
        }
        if muon_lr is not None:  # (train.optimizer=muon: train/lr is its auxiliary AdamW's)
            out["train/muon_lr"] = muon_lr
        if n_stats:
            out |= self.objective.scalars(sums)
        if routed:
            out |= self.router.scalars(routed, self.steps)
        if self.peak:  # model FLOPs utilization: achieved training FLOP/s per device over its peak in this precision
            out["train/mfu"] = out["train/tokens_per_s"] * self.flops / (self.world * self.peak)
        out |= memory
        per_rank = [[float(x) for x in slots[r * len(mine) : (r + 1) * len(mine)]] for r in range(self.world)]
        if self.world > 1:  # the rank that used the most memory in the window, and its figures
            top = max(range(self.world), key=lambda r: per_rank[r][len(split)])
            out |= {f"{name}_max": v for name, v in zip(memory, per_rank[top][len(split) :], strict=True)}
            out["memory/max_rank"] = top
        slowest = None
        if self.world > 1 and self.steps:
            rank, lag = self.straggler()
            slowest = rank
            out |= {"train/straggler_rank": rank, "train/straggler_lag": lag}
            slow = rank if lag >= STRAGGLER_LAG else None
            self.persistent_straggler = slow if slow == self._last_slow else None  # two windows in a row
            self._last_slow = slow
        if split:  # (the slowest rank: the one that reached the steps' agreement last, as train/straggler_rank)
            out |= split_scalars([r[: len(split)] for r in per_rank], elapsed, slowest)
        if len(mix) > 1:
            out |= {f"data/mix/{name}": n / sum(mix) for name, n in zip(self.sources, mix, strict=True)}
        self._reset()
        return out


def peak_flops(device: str, precision: str = "bf16", tf32: bool = True) -> float | None:
    """The device's peak dense FLOP/s in `precision` if known (MFU is reported only then)."""
    if not device.startswith("cuda"):
        return None
    import torch

    return peak_for(torch.cuda.get_device_name(torch.device(device)), precision, tf32)


def peak_for(name: str, precision: str, tf32: bool = True) -> float | None:
    """PEAKS' figure for the GPU called `name` in `precision` (fp32: its TF32 figure when `tf32` and the card has
    TF32 tensor cores, else its fp32 one)."""
    import re

    words = set(re.split(r"[\s_-]+", name.upper()))
    peaks = next((peaks for picks, peaks in PEAKS if set(picks) <= words), {})
    if precision == "fp32" and tf32 and peaks.get("tf32"):
        return peaks["tf32"]
    return peaks.get(precision)


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
