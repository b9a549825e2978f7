"""The one agreement the ranks make per optimizer step.

After the last forward pass and before its backward pass, the ranks all-reduce five things in one small
collective: which stop signals arrived (see training/preemption.py), each rank's time from the step's start to this
point (so stragglers are seen without another collective), how many flaws of damaged data a rank found (its
loader raised a DataError, and it trained on a blank batch meanwhile, so every rank reaches the agreement and
none waits in a collective for a crashed one; or its objective found some on the device), how many micro-batch
losses were non-finite, and the sum of the losses. What the answers mean for the update is training/stability.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dist_clm.parallel.collectives import reduce_to_host


@dataclass
class Agreement:
    signum: int | None  # a stop signal some rank received
    nonfinite: int  # non-finite micro-batch losses over all ranks
    mean_loss: float  # the step's loss, mean over ranks and micro batches (nan when any is non-finite)
    data_errors: int = 0  # damaged data found in this step, by ranks (a loader's DataError) and by preference
    # slots whose pair is incomplete (preference.pairs): the run must stop
    arrivals: list[float] | None = None  # each rank's seconds from the step's start to this agreement


def agree(
    signals: list[int],
    received: set[int],
    losses: list[torch.Tensor],
    world: int,
    device: str,
    data_error: float | torch.Tensor = 0.0,
    arrival_s: float = 0.0,
    rank: int = 0,
) -> Agreement:
    """Collective: one all-reduce of [one flag per stop signal, data errors (a count, may be a tensor on the
    device: no host read), one arrival time per rank, non-finite count, loss sum]."""
    local = torch.stack([loss.detach().float() for loss in losses])
    finite = torch.isfinite(local)
    arrivals = [0.0] * world
    arrivals[rank] = arrival_s  # the others' slots are theirs: the sum gathers them
    flags = torch.tensor([float(s in received) for s in signals], device=local.device)
    errors = torch.as_tensor(data_error, dtype=torch.float32, device=local.device).reshape(1)
    vec = torch.cat([flags, errors, torch.tensor(arrivals, device=local.device), (~finite).sum().float().reshape(1),
                     torch.where(finite, local, 0.0).sum().reshape(1)])  # fmt: skip
    values = reduce_to_host(vec.to(device, torch.float64))
    n = len(signals)
    got = [s for s, v in zip(signals, values[:n], strict=True) if v > 0]
    nonfinite = int(values[-2])
    mean = values[-1] / (world * len(losses)) if nonfinite == 0 else math.nan
    return Agreement(got[0] if got else None, nonfinite, mean, round(values[n]), values[n + 1 : n + 1 + world])
