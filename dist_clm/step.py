"""One optimizer step: the micro batches, the step's one agreement between ranks, the loss guard, backward,
and the update (or DeepSpeed's overflow path when the step must not be applied). See stability.py for the
rules; the training loop (train.py) and the throughput benchmark both call `train_step`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dist_clm import attention, preference
from dist_clm.distributed import agree_on_error
from dist_clm.errors import DataError
from dist_clm.preemption import StopRequest
from dist_clm.setup import Run
from dist_clm.stability import LossGuard, LossInjector, agree, poison, step_zero0_fp32


@dataclass
class StepResult:
    loss: float  # the step's loss, mean over ranks and micro batches (nan when any was non-finite)
    good: bool  # applied and not a spike: its loss counts in the logged train/loss
    rollback: str | None  # why the run must roll back now (the guard's verdict), or None
    stop_signal: int | None  # a stop signal some rank received (the same on every rank)
    data_wait_s: float  # seconds this rank waited for its batches
    blocks_per_source: list[int]  # this rank's blocks of each training source in this step
    arrivals: list[float]  # every rank's seconds from the step's start to its agreement (stragglers)
    token_sum: int = 0  # the sum of this rank's input ids in this step (what was read, in one number)
    injected: int = 0  # faults injected into this rank's losses in this step (train.fault_injection)
    pairs: torch.Tensor | None = None  # dpo / orpo: preference.STATS summed over this rank's micro batches (device)


def train_step(
    run: Run, batches: Iterator[dict], step: int, stop: StopRequest, guard: LossGuard, inject: LossInjector
) -> StepResult:
    """Collective: step number `step` (1-based) on every rank, from `run.grad_accum` micro batches of `batches`."""
    engine, device = run.engine, run.env.device
    start = time.perf_counter()
    micro_batches, waited, damaged = [], 0.0, None
    for _ in range(run.grad_accum):
        t0 = time.perf_counter()
        try:
            micro_batches.append(next(batches) if damaged is None else run.blank_batch())
        except DataError as e:  # train this step on a blank batch: the ranks stop together after the agreement
            damaged = e
            micro_batches.append(run.blank_batch())
        waited += time.perf_counter() - t0
    weighting = per_learned_token(run, micro_batches)
    losses, blocks, pairs = [], torch.zeros(len(run.source_names), dtype=torch.int64), None
    injected_before, token_sum = inject.injected, 0
    for micro, batch in enumerate(micro_batches):  # engine.step() applies the update at the accumulation boundary
        blocks += torch.bincount(batch.pop("source"), minlength=len(blocks))
        token_sum += int(batch["input_ids"].sum())  # (on the host, before the copy to the device)
        inputs = model_inputs(run, batch)  # input_ids, labels (, position_ids, reference)
        if run.preference:
            loss, stats = preference.step_loss(run, inputs, weighting["num_items_in_batch"])
            pairs = stats if pairs is None else pairs + stats
            loss = inject(step, loss)
        else:
            loss = inject(step, engine(**inputs, **weighting, use_cache=False).loss)
        losses.append(loss)
        last = micro == run.grad_accum - 1
        if last:  # the step's one collective: stop signals, non-finite losses, loss sum
            flaws = float(damaged is not None) if pairs is None else pairs[-1] + float(damaged is not None)
            agreed = agree(stop.signals, stop.received, losses, run.env.world_size, device, flaws,
                           time.perf_counter() - start, run.env.rank)  # fmt: skip
            spike = guard.is_spike(agreed.mean_loss)
            skip = bool(agreed.nonfinite or spike or agreed.data_errors)
            if skip:
                loss = poison(loss)  # on every rank: DeepSpeed's overflow path drops this update
        engine.backward(loss)
        if last and run.zero0_fp32:  # DeepSpeed has no overflow path there: dist_clm's own
            step_zero0_fp32(engine, skip, device)
        else:
            engine.step()
    if agreed.data_errors:
        agree_on_error(damaged or unpaired(pairs), device)  # every rank raises the damaged rank's sentence
    # fp16's loss scaler skips overflowing steps by design while it finds its scale: not a bad step
    healthy = engine.was_step_applied() or (run.precision == "fp16" and not agreed.nonfinite)
    return StepResult(
        loss=agreed.mean_loss,
        good=healthy and not spike,
        rollback=guard.after_step(healthy, agreed.mean_loss, spike),
        stop_signal=agreed.signum,
        data_wait_s=waited,
        blocks_per_source=blocks.tolist(),
        arrivals=agreed.arrivals,
        token_sum=token_sum,
        injected=inject.injected - injected_before,
        pairs=pairs,
    )


def unpaired(pairs: torch.Tensor | None) -> DataError | None:
    """The error of preference data whose rows do not pair up (preference.pairs), if this rank read such."""
    if pairs is None or not float(pairs[-1]):
        return None
    return DataError(
        f"a micro batch of preference data holds {int(pairs[-1])} conversations without their other half (a chosen "
        "answer without its rejected one, or the reverse); prepare the data again with `dist-clm prepare --format "
        "preference`."
    )


def model_inputs(run: Run, batch: dict[str, torch.Tensor]) -> dict:
    """A micro batch on the device, copied without waiting (on a GPU the loader's batches are in pinned
    memory); with flash attention's document bounds (attention.feed_documents), computed on the host first."""
    device = run.env.device
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if attention.feeds_documents(run.engine.module):
        bounds = attention.document_bounds(batch["position_ids"])
        inputs |= {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in bounds.items()}
    return inputs


def per_learned_token(run: Run, micro_batches: list[dict]) -> dict:
    """With train.objective sft, the model's keyword for a loss that is the sum over a micro batch's learned
    tokens divided by num_items_in_batch = (learned tokens of the step on all ranks) / (ranks x micro batches):
    DeepSpeed divides the gradient by the micro batches and averages it over the ranks, so the step's gradient
    and its logged loss (the mean of all micro batches' losses) are those of the mean over every learned token
    of the step, however unevenly the micro batches hold them. One small all-reduce; {} for clm."""
    if not (run.token_weighted or run.preference):
        return {}
    from dist_clm.distributed import all_reduce_sum

    if run.preference:  # (the unit is a pair)
        mine = sum(preference.count_pairs(b["labels"], b["position_ids"]) for b in micro_batches)
    else:
        mine = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    total = all_reduce_sum([float(mine)], run.env.device)[0]
    share = max(total, 1.0) / (run.env.world_size * run.grad_accum)
    return {"num_items_in_batch": torch.tensor(share, dtype=torch.float32, device=run.env.device)}
