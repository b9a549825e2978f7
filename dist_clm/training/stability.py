"""Protection from NaNs and loss spikes: what a step's agreement (parallel/agreement.py) means for its update.

Every rank knows the same answers after the step's agreement:

- damaged data anywhere: the update is dropped (below) and every rank stops with that rank's sentence;
- a non-finite loss anywhere, or a spike by the objective's rule (objectives.py: a loss above `spike_factor` x
  the running mean of recent good steps for clm and sft; far above the robust spread of recent steps for the
  preference objectives, whose losses are noisy by nature): the update must not happen. The last backward pass
  runs as usual, the step's real gradient norm is taken (it is logged with the reason), and one gradient is
  set to NaN with DeepSpeed's own `safe_set_full_grad` on every rank, which sends DeepSpeed down its overflow
  path (ZeRO 1-3 and its bf16/fp16 optimizers check the global gradient norm): gradients dropped, no optimizer
  or schedule step. A non-finite gradient norm with a finite loss takes the same path by itself;
  `engine.was_step_applied()` reports both.
- after `max_bad_steps` bad steps in a row, or at once on a spike, the loop rolls back to the last
  checkpoint and skips the data window that led there (loop.py; the skip is recorded in RUN/skips.json so
  a later resume skips it too). With no checkpoint yet, a spike's step is dropped and training goes on;
  bad steps in a row with no checkpoint end the run with one sentence.

`stability.fault_injection` is a fault-injection switch for tests and drills, off unless set: a comma-separated
list of `STEP[-LAST]:KIND[@RANK]` entries, KIND `nan`, `inf` or `xF` (multiply the loss by F), or `sleepS`
(sleep S seconds before the agreement: a straggler), applied once each in 1-based step STEP (or each of
STEP..LAST), on RANK only if given. A run with it set says so when it starts, and every injected
step is logged as `faults/injected` (TensorBoard and metrics.jsonl).
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from dataclasses import dataclass

import torch

from dist_clm.errors import UserError
from dist_clm.parallel.collectives import reduce_to_host


@dataclass
class Trouble:
    """Why the loop must roll back now (LossGuard.after_step)."""

    reason: str
    spike: bool  # a spike (with no checkpoint yet the run goes on), not bad steps in a row


class LossGuard:
    """Counts bad steps in a row and keeps the losses of recent good steps; asks the objective's spike rule
    (objectives.py) about each step's loss; says when to roll back."""

    def __init__(self, max_bad_steps: int, rule, window: int):
        self.max_bad_steps, self.rule = max_bad_steps, rule
        self.recent: deque[float] = deque(maxlen=window)
        self.bad_in_a_row = 0
        self.skipped = 0  # updates not applied, over the whole run in this process

    def spike(self, loss: float) -> str | None:
        """Why `loss` is a spike (the guard has seen enough good steps and the rule says so), or None."""
        if len(self.recent) < min(10, self.recent.maxlen or 10):
            return None
        return self.rule.verdict(loss, list(self.recent))

    def after_step(self, applied: bool, loss: float, spike: str | None) -> Trouble | None:
        """Record one step; why to roll back now, or None."""
        if spike:
            self.skipped += 1
            self.bad_in_a_row += 1
            return Trouble(spike, spike=True)
        if applied:
            self.bad_in_a_row = 0
            self.recent.append(loss)
            return None
        self.skipped += 1
        self.bad_in_a_row += 1
        if self.max_bad_steps and self.bad_in_a_row >= self.max_bad_steps:
            return Trouble(f"{self.bad_in_a_row} steps in a row had a non-finite loss or gradient norm", spike=False)
        return None

    def reset(self) -> None:
        self.bad_in_a_row = 0
        self.recent.clear()

    def state_dict(self) -> dict:
        """(A checkpoint part: a resumed run measures spikes against the same recent steps.)"""
        return {"recent": list(self.recent), "bad_in_a_row": self.bad_in_a_row, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.recent.clear()
        self.recent.extend(state["recent"])  # (the last spike_window of them, should that have changed)
        self.bad_in_a_row, self.skipped = state["bad_in_a_row"], state["skipped"]


def real_grad_norm(engine) -> float:
    """The global norm of the step's gradient, after the accumulation boundary's backward pass and before the
    step, whatever the ZeRO stage (DeepSpeed's safe_get_full_grad; each call is a collective for ZeRO 1-3: every
    rank calls it alike). For a step that is not applied: DeepSpeed's own norm is then the NaN set below."""
    from deepspeed.utils import safe_get_full_grad

    squares = [g.float().pow(2).sum() for p in engine.module.parameters()
               if p.requires_grad and (g := safe_get_full_grad(p)) is not None]  # fmt: skip
    return math.sqrt(float(torch.stack(squares).sum())) if squares else 0.0


def drop_update(engine) -> None:
    """Make DeepSpeed's next step skip: one gradient set to NaN (DeepSpeed's safe_set_full_grad, on every rank),
    so its overflow path drops the gradients without an optimizer or schedule step."""
    from deepspeed.utils import safe_set_full_grad

    first = next(p for p in engine.module.parameters() if p.requires_grad)
    shape = getattr(first, "ds_shape", first.shape)  # (ZeRO-3 holds a partition; the value is the whole)
    safe_set_full_grad(first, torch.full(shape, math.nan, dtype=torch.float32, device=first.device))


def step_zero0_fp32(engine, force_skip: bool, device: str) -> None:
    """engine.step() at an accumulation boundary for ZeRO-0 in fp32, the one setting where DeepSpeed has no
    overflow path. The ranks agree whether to skip (any rank's gradient non-finite, or `force_skip`); to skip,
    DeepSpeed's step runs on zeroed gradients with `optimizer.overflow` set (DeepSpeed then neither steps the
    schedule nor reports the update as applied), and the weights and optimizer state are put back exactly.
    The copy is made on bad steps only."""
    params = list(engine.module.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
    bad = (~finite.to(device) | force_skip).float().reshape(1)  # (the one host read is the agreed value)
    optimizer = engine.optimizer
    optimizer.overflow = bool(reduce_to_host(bad, torch.distributed.ReduceOp.MAX)[0])  # read by DeepSpeed's step
    if not optimizer.overflow:
        engine.step()
        return
    saved_weights = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(optimizer.state_dict())
    for g in grads:
        g.zero_()
    engine.step()
    with torch.no_grad():
        for p, w in zip(params, saved_weights, strict=True):
            p.copy_(w)
    optimizer.load_state_dict(saved_state)


class LossInjector:
    """Parses stability.fault_injection (see the module docstring) and applies each entry once."""

    def __init__(self, rank: int, spec: str):
        self.spec = spec
        self.pending: dict[int, list[str]] = {}
        for entry in filter(None, (e.strip() for e in spec.split(","))):
            try:
                steps_text, kind = entry.split(":")
                kind, _, only = kind.partition("@")
                number = kind[5:] if kind.startswith("sleep") else kind[1:] if kind.startswith("x") else None
                if kind not in ("nan", "inf") and not (number and float(number) > 0):
                    raise ValueError(kind)
                first, _, last = steps_text.partition("-")
                steps = range(int(first), int(last or first) + 1)
            except ValueError:
                raise UserError(
                    f"config key 'stability.fault_injection' has entry '{entry}', which is not STEP[-LAST]:KIND[@RANK] "
                    "with KIND nan, inf, xF or sleepS; fix it or leave the key empty."
                ) from None
            if not only or int(only) == rank:
                for step in steps:
                    self.pending.setdefault(step, []).append(kind)
        self.injected = 0  # entries applied so far on this rank

    def __call__(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """`loss`, with what is planned for `step` (on this rank) applied; `self.injected` counts it."""
        for kind in self.pending.pop(step, []):
            self.injected += 1
            if kind in ("nan", "inf"):
                loss = loss * torch.tensor(float(kind), device=loss.device, dtype=loss.dtype)
            elif kind.startswith("sleep"):  # a straggler: this rank reaches the step's agreement late
                time.sleep(float(kind[5:]))
            else:
                loss = loss * float(kind[1:])
        return loss
