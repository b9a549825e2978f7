"""What a run minimizes: one object per objective.kind, holding everything that differs between them, so that the
step (step.py), the log window (observability/metrics.py) and the loss guard (stability.py) never ask which
objective runs.

    clm    NextToken      every token's next-token loss; a step's loss is the mean of its micro batches' means
    sft    LearnedTokens  the learned tokens only (the loss mask); the mean over every learned token of the step
    dpo    DPO            pairs of conversations against the reference model's values (preference.py)
    orpo   ORPO           pairs, with no reference

Each gives: `weighting` (the model keyword that makes the step's loss the mean it should be, from the step's
micro batches on all ranks), `loss` (a micro batch's loss and its statistics, on the device), the statistics'
names (`stats`) and what is logged from their sums over a log window (`scalars`), the flaws of damaged data
found on the device (`flaws`, `flaw_error`), and the rule that calls a step's loss a spike (`spike_rule`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dist_clm.errors import DataError
from dist_clm.training import preference


@dataclass(frozen=True)
class MeanRise:
    """Pretraining's rule: a loss above `factor` x the mean of recent good steps (and above it by `floor` nats:
    losses near 0 vary by large factors harmlessly). factor 0: off."""

    factor: float
    floor: float = 0.05

    def verdict(self, loss: float, recent: list[float]) -> str | None:
        mean = sum(recent) / len(recent)
        if self.factor > 0 and loss > self.factor * mean and loss > mean + self.floor:
            return f"loss {loss:.4g} is more than {self.factor:g} x the running mean {mean:.4g}"
        return None


@dataclass(frozen=True)
class SpreadRise:
    """The preference objectives' rule: their losses start near log 2 and stay noisy (a step's few pairs, some
    ranked wrong, move its mean by a factor of two or three), so a spike is a loss more than `spreads` robust
    spreads above the median of recent good steps (the spread: 1.4826 x their median absolute deviation, at
    least `floor` nats). spreads 0: off."""

    spreads: float
    floor: float = 0.05

    def verdict(self, loss: float, recent: list[float]) -> str | None:
        median = statistics.median(recent)
        spread = max(1.4826 * statistics.median(abs(x - median) for x in recent), self.floor)
        if self.spreads > 0 and loss > median + self.spreads * spread:
            return (f"loss {loss:.4g} is more than {self.spreads:g} robust spreads ({spread:.3g}) above the median "
                    f"{median:.4g} of recent steps")  # fmt: skip
        return None


class Objective:
    """The next-token loss over every token (clm); the others override what differs."""

    name = "clm"
    stats: tuple[str, ...] = ()  # the names of the statistics `loss` returns, summed over micro batches
    # under sequence parallelism, a rank's loss is its share of the micro batch's (its tokens' losses), not the
    # whole of it (the preference objectives: every rank of a group computes the pairs' losses whole)
    loss_is_share = True

    def __init__(self, settings, spike_factor: float):
        self.settings = settings  # the run's config.ObjectiveConfig
        self.spike_factor = spike_factor  # stability.spike_factor (0: spikes are not looked for)

    def weighting(self, run, micro_batches: list[dict]) -> dict:
        return {}

    def loss(self, run, inputs: dict, weighting: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A micro batch's loss (its share of the step's), and its statistics (None without any)."""
        return run.engine(**inputs, **weighting, use_cache=False).loss, None

    def flaws(self, stats: torch.Tensor | None) -> torch.Tensor | float:
        """How many flaws of damaged data the step's statistics show (on the device: read with the agreement)."""
        return 0.0

    def flaw_error(self, stats: torch.Tensor | None) -> DataError | None:
        return None

    def scalars(self, sums: list[float], split: str = "train") -> dict[str, float]:
        """What is logged from the statistics summed over a log window and all ranks (or over the held-out data)."""
        return {}

    def spike_rule(self):
        return MeanRise(self.spike_factor)


class LearnedTokens(Objective):
    """sft: the loss over the learned tokens (the loss mask), averaged over every learned token of the step."""

    name = "sft"

    def weighting(self, run, micro_batches: list[dict]) -> dict:
        """The model's keyword for a loss that is the sum over a micro batch's learned tokens divided by
        num_items_in_batch = (learned tokens of the step on all ranks) / (ranks x micro batches): DeepSpeed divides
        the gradient by the micro batches and averages it over the ranks, so the step's gradient and its logged
        loss (the mean of all micro batches' losses) are those of the mean over every learned token of the step,
        however unevenly the micro batches hold them. One small all-reduce."""
        return per_step_mean(run, sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches))


class Preference(Objective):
    """DPO and ORPO on packed pairs (preference.py): a micro batch's loss is its pairs' losses summed over the
    step's mean pairs per micro batch (the weighting of LearnedTokens, counted in pairs)."""

    stats = preference.STATS
    loss_is_share = False

    def weighting(self, run, micro_batches: list[dict]) -> dict:
        return per_step_mean(run, sum(preference.count_pairs(b["labels"], b["position_ids"]) for b in micro_batches))

    def pair_losses(self, conv: preference.Conversations, reference: torch.Tensor | None):
        raise NotImplementedError

    def loss(self, run, inputs: dict, weighting: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Its pairs' losses summed over the divisor, and its STATS, on the device: no host read."""
        reference = inputs.pop("reference", None)
        labels = inputs.pop("labels")
        if run.sp.size > 1:  # each token's log-probability of the next, from every rank's slice of the rows
            out = run.engine(**inputs, labels=labels, token_logps=True, use_cache=False)
            conv = preference.conversations(out.logits, labels, inputs["position_ids"])
        else:
            out = run.engine(**inputs, use_cache=False)
            conv = preference.conversation_logps(out.logits, labels, inputs["position_ids"])
        losses, stats = self.measure(conv, reference)
        loss = losses.sum() / weighting["num_items_in_batch"]
        aux = getattr(
            out, "aux_loss", None
        )  # a Mixture-of-Experts router's load balance (models/moe.py), as in pretraining
        if aux is not None:
            loss = loss + run.engine.module.config.router_aux_loss_coef * aux
        return loss, stats

    def measure(self, conv: preference.Conversations, reference: torch.Tensor | None):
        """(per-pair losses, STATS) of a micro batch's conversations, on the device; `reference`: the reference
        values of each row's conversations, then NaN (the loader's, over half a row), or None."""
        if reference is not None:
            reference = F.pad(reference, (0, conv.logps.shape[1] - reference.shape[1]))
        losses, rewards = self.pair_losses(conv, reference)
        both, unpaired = preference.pairs(conv)
        chosen, rejected = rewards["chosen"] * both, rewards["rejected"] * both
        right = ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()) * both  # (a tie: half right)
        stats = torch.stack([both.sum().float(), chosen.sum(), rejected.sum(), right.sum(), unpaired.float()])
        return losses, stats

    def flaws(self, stats: torch.Tensor | None) -> torch.Tensor | float:
        return 0.0 if stats is None else stats[-1]

    def flaw_error(self, stats: torch.Tensor | None) -> DataError | None:
        if stats is None or not float(stats[-1]):
            return None
        return DataError(
            f"a micro batch of preference data holds {int(stats[-1])} conversations without their other half (a "
            "chosen answer without its rejected one, or the reverse); prepare the data again with `dist-clm prepare "
            "--format preference`."
        )

    def scalars(self, sums: list[float], split: str = "train") -> dict[str, float]:
        """DPO's implicit rewards (ORPO's log odds) of the window's pairs (of the held-out pairs: split val)."""
        n, chosen, rejected, right = sums[:4]
        if not n:
            return {}
        return {f"{split}/rewards_chosen": chosen / n, f"{split}/rewards_rejected": rejected / n,
                f"{split}/reward_accuracy": right / n, f"{split}/reward_margin": (chosen - rejected) / n}  # fmt: skip

    SPREADS = 10.0  # robust spreads above the median that make a spike (stability.spike_factor 0: off)

    def spike_rule(self):
        return SpreadRise(self.SPREADS if self.spike_factor > 0 else 0.0)


class DPO(Preference):
    name = "dpo"

    def pair_losses(self, conv, reference):
        # (a blank batch standing in for damaged data has no reference values; its step is never applied)
        values = conv.logps.detach() if reference is None else reference.to(conv.logps.dtype)
        return preference.dpo(conv, values, self.settings.dpo_beta)


class ORPO(Preference):
    name = "orpo"

    def pair_losses(self, conv, reference):
        return preference.orpo(conv, self.settings.orpo_lambda)


OBJECTIVES = {o.name: o for o in (Objective, LearnedTokens, DPO, ORPO)}


def for_run(settings, spike_factor: float) -> Objective:
    """The objective an ObjectiveConfig settled from the data (not auto) names."""
    return OBJECTIVES[settings.kind](settings, spike_factor)


def per_step_mean(run, mine: int) -> dict:
    """num_items_in_batch for a step whose loss is the mean over `mine` units on this rank and the others' (see
    LearnedTokens.weighting)."""
    from dist_clm.parallel.collectives import all_reduce_sum

    total = all_reduce_sum([float(mine)], run.env.device)[0]
    share = max(total, 1.0) / (run.env.world_size * run.grad_accum)
    return {"num_items_in_batch": torch.tensor(share, dtype=torch.float32, device=run.env.device)}
