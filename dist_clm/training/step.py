"""One optimizer step: the micro batches, the step's one agreement between ranks, the loss guard, backward,
and the update (or DeepSpeed's overflow path when the step must not be applied). See parallel/agreement.py and
stability.py for the rules; the training loop (loop.py) and the throughput benchmark both call `train_step`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dist_clm.errors import DataError
from dist_clm.models import attention
from dist_clm.observability.timing import Phases
from dist_clm.parallel.agreement import agree
from dist_clm.parallel.collectives import agree_on_error
from dist_clm.training.preemption import StopRequest
from dist_clm.training.setup import Run
from dist_clm.training.stability import (
    LossGuard,
    LossInjector,
    Trouble,
    drop_update,
    real_grad_norm,
    step_zero0_fp32,
)


@dataclass
class StepResult:
    loss: float  # the step's loss, mean over ranks and micro batches (nan when any was non-finite)
    good: bool  # applied and not a spike: its loss counts in the logged train/loss
    trouble: Trouble | None  # why the run must roll back now (the guard's verdict), or None
    stop_signal: int | None  # a stop signal some rank received (the same on every rank)
    data_wait_s: float  # seconds this rank waited for its batches
    blocks_per_source: list[int]  # this rank's blocks of each training source in this step
    arrivals: list[float]  # every rank's seconds from the step's start to its agreement (stragglers)
    token_sum: int = 0  # the sum of this rank's input ids in this step (what was read, in one number)
    injected: int = 0  # faults injected into this rank's losses in this step (stability.fault_injection)
    stats: torch.Tensor | None = None  # the objective's statistics summed over this rank's micro batches (device)
    skipped: str | None = None  # why the update was not applied (the same on every rank), or None
    grad_norm: float | None = None  # a skipped step's real gradient norm (an applied one's is DeepSpeed's)


def train_step(
    run: Run,
    batches: Iterator[dict],
    step: int,
    stop: StopRequest,
    guard: LossGuard,
    inject: LossInjector,
    phases: Phases | None = None,
) -> StepResult:
    """Collective: step number `step` (1-based) on every rank, from `run.grad_accum` micro batches of `batches`;
    `phases` (the loop's time split and profiler ranges) is told where the data wait, each forward, each backward
    and the optimizer step begin."""
    engine, device, objective = run.engine, run.env.device, run.objective
    mark = phases.mark if phases is not None else _no_mark
    start = time.perf_counter()
    mark("data_wait")
    micro_batches, waited, damaged = [], 0.0, None
    for _ in range(run.grad_accum):
        t0 = time.perf_counter()
        try:
            micro_batches.append(next(batches) if damaged is None else run.blank_batch())
        except DataError as e:  # train this step on a blank batch: the ranks stop together after the agreement
            damaged = e
            micro_batches.append(run.blank_batch())
        waited += time.perf_counter() - t0
    mark("forward")  # (the weighting may sum over the ranks: the forward's wait, not the data's)
    weighting = objective.weighting(run, micro_batches)
    losses, blocks, stats = [], torch.zeros(len(run.source_names), dtype=torch.int64), None
    injected_before, token_sum, skipped, grad_norm = inject.injected, 0, None, None
    counts = run.counts  # (one rank of a sequence- or tensor-parallel group counts the blocks its ranks share)
    for micro, batch in enumerate(micro_batches):  # engine.step() applies the update at the accumulation boundary
        mark("forward")
        source = batch.pop("source")
        if counts:
            blocks += torch.bincount(source, minlength=len(blocks))
            token_sum += int(batch["input_ids"].sum())  # (on the host, before the copy to the device)
        loss, micro_stats = objective.loss(run, model_inputs(run, batch), weighting)
        stats = micro_stats if stats is None else stats + micro_stats
        loss = inject(step, loss)  # (sequence parallelism: this rank's share of the micro batch's loss)
        losses.append(run.sp.whole(loss, objective.loss_is_share))
        last = micro == run.grad_accum - 1
        if last:  # the step's one collective: stop signals, damaged data, non-finite losses, loss sum
            flaws = objective.flaws(stats) + float(damaged is not None)
            agreed = agree(stop.signals, stop.received, losses, run.env.world_size, device, flaws,
                           time.perf_counter() - start, run.env.rank)  # fmt: skip
            spike = guard.spike(agreed.mean_loss)
            skipped = skip_reason(agreed, spike)
        mark("backward")
        engine.backward(run.sp.for_backward(loss))
        if last:
            mark("optimizer_step")
        if last and skipped:  # (on every rank alike) the real gradient's norm, then no update
            grad_norm = real_grad_norm(engine) / (engine.optimizer.loss_scale if run.precision == "fp16" else 1.0)
        if last and run.zero0_fp32:  # DeepSpeed has no overflow path there: dist_clm's own
            step_zero0_fp32(engine, bool(skipped), device)
            continue
        if last and skipped:
            drop_update(engine)  # DeepSpeed's overflow path drops it
        engine.step()
    mark(None)
    if agreed.data_errors:
        agree_on_error(damaged or objective.flaw_error(stats), device)  # every rank raises the damaged rank's sentence
    # fp16's loss scaler skips overflowing steps by design while it finds its scale: not a bad step
    healthy = engine.was_step_applied() or (run.precision == "fp16" and not agreed.nonfinite)
    return StepResult(
        loss=agreed.mean_loss,
        good=healthy and not spike,
        trouble=guard.after_step(healthy, agreed.mean_loss, spike),
        stop_signal=agreed.signum,
        data_wait_s=waited,
        blocks_per_source=blocks.tolist(),
        arrivals=agreed.arrivals,
        token_sum=token_sum,
        injected=inject.injected - injected_before,
        stats=stats,
        skipped=skipped,
        grad_norm=grad_norm,
    )


def _no_mark(name: str | None) -> None:
    """train_step's marks when nobody keeps the time split (the throughput benchmark's plain steps)."""


def skip_reason(agreed, spike: str | None) -> str | None:
    """Why the step's update is not applied (agreed by every rank), or None."""
    if agreed.data_errors:
        return "damaged data"
    if agreed.nonfinite:
        return f"{agreed.nonfinite} micro-batch losses were not finite"
    return spike and f"a spike: {spike}"


def model_inputs(run: Run, batch: dict[str, torch.Tensor]) -> dict:
    """A micro batch on the device, copied without waiting (on a GPU the loader's batches are in pinned
    memory); with flash attention's document bounds (attention.feed_documents), computed on the host first
    (under sequence parallelism the core attention makes them for the whole rows itself)."""
    device = run.env.device
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if "position_ids" not in inputs and run.engine.module.config._attn_implementation == "sdpa":
        inputs["attention_mask"] = attention.no_padding(inputs["input_ids"])
    if attention.feeds_documents(run.engine.module) and run.sp.size == 1:
        bounds = attention.document_bounds(batch["position_ids"])
        inputs |= {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in bounds.items()}
    return inputs
