"""Preference objectives on packed pairs: DPO (sigmoid) and ORPO.

A micro batch of preference data holds whole pairs of blocks: rows 2i (chosen answers) and 2i+1 (rejected
answers of the same prompts, in the same order; data/conversations.py). A row's documents are its conversations
(positions restart at each) and padding; `segment_logps` sums each conversation's log-probabilities over its
learned tokens (the answer), and the j-th conversation of row 2i pairs with the j-th of row 2i+1.

DPO (Rafailov et al. 2023): loss = -log sigmoid(beta * ((pc - rc) - (pr - rr))) per pair, with p the policy's
and r the reference model's summed log-probabilities of the chosen (c) and rejected answers; the implicit
rewards are beta * (pc - rc) and beta * (pr - rr). ORPO (Hong et al. 2024), no reference: the chosen answer's
mean NLL + lambda * -log sigmoid(log odds(chosen) - log odds(rejected)), odds(y) = p / (1 - p) with p the
answer's mean per-token probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass
class Segments:
    """Per learned conversation of a micro batch, in order: the summed log-probability of its learned tokens,
    how many there are, the row it is in and where in the row it starts."""

    logps: torch.Tensor
    counts: torch.Tensor
    rows: torch.Tensor
    starts: torch.Tensor


def _documents(labels: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(each target token's document as a flat index row * n_docs + document, whether it is learned, n_docs)."""
    doc = torch.cumsum(positions == 0, dim=1)[:, 1:] - 1  # the document of each target token
    n_docs = int(doc.max()) + 1
    flat = doc + n_docs * torch.arange(len(doc), device=doc.device)[:, None]
    return flat, labels[:, 1:] != IGNORE, n_docs


def segment_logps(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> Segments:
    """The learned conversations of each row (B x L logits over V, labels with -100, restarting positions)."""
    logp = -F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:].clamp(min=0), reduction="none")
    flat, learned, n_docs = _documents(labels, positions)
    size = len(labels) * n_docs
    sums = torch.zeros(size, dtype=logp.dtype, device=logp.device)
    sums = sums.index_add(0, flat.flatten(), (logp * learned).flatten())
    counts = torch.zeros(size, dtype=torch.int64, device=logp.device)
    counts = counts.index_add(0, flat.flatten(), learned.flatten().long())
    row, col = torch.nonzero(positions == 0, as_tuple=True)  # each document's first token, in order
    starts = torch.zeros(size, dtype=torch.int64, device=logp.device)
    starts[row * n_docs + torch.cumsum(positions == 0, dim=1)[row, col] - 1] = col
    keep = counts > 0
    rows = torch.arange(size, device=logp.device) // n_docs
    return Segments(sums[keep], counts[keep], rows[keep], starts[keep])


def pairs(seg: Segments) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into `seg` of the chosen and the rejected conversation of every pair (rows 2i and 2i+1)."""
    chosen, rejected = (torch.nonzero(seg.rows % 2 == side).flatten() for side in (0, 1))
    if len(chosen) != len(rejected):
        raise ValueError("a micro batch of preference data holds unequal chosen and rejected conversations")
    return chosen, rejected


def dpo(policy: Segments, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-pair DPO losses, per-pair rewards chosen / rejected); `reference` holds the reference model's summed
    log-probabilities of the same segments, in the same order."""
    c, r = pairs(policy)
    chosen = beta * (policy.logps[c] - reference[c])
    rejected = beta * (policy.logps[r] - reference[r])
    return -F.logsigmoid(chosen - rejected), {"chosen": chosen.detach(), "rejected": rejected.detach()}


def orpo(policy: Segments, lam: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-pair ORPO losses, per-pair log odds of chosen / rejected, reported as its rewards)."""
    c, r = pairs(policy)
    mean = policy.logps / policy.counts
    log_odds = mean - torch.log1p(-torch.exp(mean).clamp(max=1 - 1e-6))
    ratio = -F.logsigmoid(log_odds[c] - log_odds[r])
    return -mean[c] + lam * ratio, {"chosen": log_odds[c].detach(), "rejected": log_odds[r].detach()}


# ---- the reference model's log-probabilities, computed once and stored with the data (data/reference_store.py)

OBJECTIVES = ("dpo", "orpo")


def weights_fingerprint(model) -> str:
    """A hash of a model's weights (fp32, by name): the identity of a reference model."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def compute_reference(model_path: str, data_dir: str, batch_size: int = 8, device: str = "cpu") -> dict:
    """`dist-clm prepare-reference`: the summed log-probabilities of every learned conversation of a prepared
    directory (or URL) of pairs under the model at `model_path` (the policy's starting point), stored with the
    data with the model's weights fingerprint (data/reference_store.py); returns the record written."""
    from dist_clm.data import reference_store
    from dist_clm.data.loader import TokenStream
    from dist_clm.data.prepare import read_manifest
    from dist_clm.data.tokenizer import fingerprint
    from dist_clm.errors import UserError
    from dist_clm.export import load_model

    manifest = read_manifest(data_dir)
    tuned = manifest.get("fine_tuning") or {}
    if not tuned.get("pairs"):
        raise UserError(f"'{data_dir}' holds no preference pairs; prepare it with --format preference.")
    with reference_store.claim(data_dir):  # one writer at a time, from before the pass
        model, tok, _ = load_model(model_path)
        if fingerprint(tok) != manifest["tokenizer"]["fingerprint"]:
            raise UserError(
                f"'{model_path}' uses another tokenizer than '{data_dir}'; prepare the data with its tokenizer."
            )
        model.to(device)
        arrays = {
            split: _stream_values(model, TokenStream(data_dir, split, manifest), tuned["block_size"], batch_size)
            for split in ("train", "val")
        }
        record = {"model": str(model_path), "weights": weights_fingerprint(model)}
        return reference_store.write(data_dir, arrays, record)


@torch.no_grad()
def _stream_values(model, stream, block: int, batch_size: int):
    """(2, n) float64: the stream offset and summed log-probability of each learned conversation, in order."""
    import numpy as np

    device = next(model.parameters()).device
    offsets, values = [], []
    for start in range(0, stream.tokens, block * batch_size):
        rows = [stream.read_learned(s, block) for s in range(start, min(start + block * batch_size, stream.tokens),
                                                             block)]  # fmt: skip
        ids, learned, positions = (torch.as_tensor(np.stack([r[i] for r in rows])).long().to(device) for i in range(3))
        labels = torch.where(learned.bool(), ids, torch.full_like(ids, IGNORE))
        seg = segment_logps(model(input_ids=ids, position_ids=positions, use_cache=False).logits, labels, positions)
        values += seg.logps.double().cpu().tolist()
        offsets += (start + seg.rows * block + seg.starts).cpu().tolist()
    return np.array([offsets, values], dtype=np.float64)


def count_pairs(labels: torch.Tensor, positions: torch.Tensor) -> int:
    """The pairs in a micro batch: the learned conversations of its chosen rows (0, 2, 4, ...)."""
    flat, learned, n_docs = _documents(labels[0::2], positions[0::2])
    return int(torch.bincount(flat[learned], minlength=1).count_nonzero())


def step_loss(run, inputs: dict, divisor: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """One micro batch's share of the step's mean pair loss (its pairs' losses summed over `divisor`: see
    step.per_learned_token's reasoning), and [pairs, summed reward chosen, rejected, pairs ranked right]."""
    reference = inputs.pop("reference", None)
    labels = inputs.pop("labels")
    logits = run.engine(**inputs, use_cache=False).logits
    seg = segment_logps(logits, labels, inputs["position_ids"])
    t = run.cfg.train
    if t.objective == "dpo":
        # (a blank batch standing in for damaged data has no reference values; its step is never applied)
        values = reference[~torch.isnan(reference)].to(seg.logps.dtype) if reference is not None else seg.logps.detach()
        losses, rewards = dpo(seg, values, t.dpo_beta)
    else:
        losses, rewards = orpo(seg, t.orpo_lambda)
    chosen, rejected = rewards["chosen"], rewards["rejected"]
    right = (chosen > rejected).float().sum() + 0.5 * (chosen == rejected).float().sum()  # (a tie: half right)
    stats = [float(len(losses)), float(chosen.sum()), float(rejected.sum()), float(right)]
    return losses.sum() / divisor, stats
