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
class Conversations:
    """The learned conversations of a micro batch (B rows of L tokens) in a fixed layout, so that the step needs no
    host read: slot [b, j] is row b's j-th learned conversation: the summed log-probability of its learned tokens,
    how many there are (0: no conversation in that slot) and where in the row it starts."""

    logps: torch.Tensor  # B x L
    counts: torch.Tensor  # B x L, int64
    starts: torch.Tensor  # B x L, int64

    def valid(self) -> torch.Tensor:
        return self.counts > 0


def _compact(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Each row's kept entries (B x L), moved to its first slots in order; the rest 0. No host read."""
    b, n = keep.shape
    slot = torch.cumsum(keep, dim=1) - 1 + n * torch.arange(b, device=keep.device)[:, None]
    index = torch.where(keep, slot, b * n)  # (the entries not kept go to one spare slot at the end)
    out = torch.zeros(b * n + 1, dtype=values.dtype, device=values.device)
    return out.scatter(0, index.flatten(), values.flatten())[:-1].view(b, n)


def conversation_logps(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> Conversations:
    """The learned conversations of each row (B x L logits over V, labels with -100, positions restarting at 0
    at each conversation and at the padding)."""
    logp = -F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:].clamp(min=0), reduction="none")
    return conversations(logp, labels, positions)


def conversations(logp: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> Conversations:
    """The same from each token's log-probability of its next token (B x L-1: sequence parallelism gathers them
    from the ranks' slices instead of the logits)."""
    b, n = labels.shape
    first = positions == 0
    doc = torch.cumsum(first, dim=1) - 1  # each token's document in its row
    rows = n * torch.arange(b, device=labels.device)[:, None]
    target_doc = (doc[:, 1:] + rows).flatten()  # (the document of each target token, as a flat slot)
    learned = labels[:, 1:] != IGNORE
    sums = logp.new_zeros(b * n).index_add(0, target_doc, (logp * learned).flatten())
    counts = target_doc.new_zeros(b * n).index_add(0, target_doc, learned.flatten().long())
    starts = torch.zeros(b * n + 1, dtype=torch.int64, device=logp.device)
    at = torch.where(first, doc + rows, b * n).flatten()  # each document's first token writes its column
    starts = starts.scatter(0, at, torch.arange(n, device=logp.device).expand(b, n).flatten())[:-1]
    keep = counts.view(b, n) > 0
    return Conversations(*(_compact(x.view(b, n), keep) for x in (sums, counts, starts)))


def pairs(conv: Conversations) -> tuple[torch.Tensor, torch.Tensor]:
    """(P x L slots where both the chosen (row 2i) and the rejected (row 2i+1) conversation of a pair are, the
    number of slots where only one of them is: damaged data)."""
    chosen, rejected = conv.valid()[0::2], conv.valid()[1::2]
    return chosen & rejected, (chosen ^ rejected).sum()


def dpo(policy: Conversations, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-pair DPO losses, per-pair rewards chosen / rejected), P x L with 0 outside the pairs; `reference`
    holds the reference model's summed log-probabilities in the same slots (B x L)."""
    both, _ = pairs(policy)
    delta = torch.where(policy.valid(), policy.logps - reference, 0.0)  # (no NaN outside: it would reach the gradient)
    chosen, rejected = beta * delta[0::2], beta * delta[1::2]
    losses = torch.where(both, -F.logsigmoid(chosen - rejected), 0.0)
    return losses, {"chosen": chosen.detach(), "rejected": rejected.detach()}


def orpo(policy: Conversations, lam: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-pair ORPO losses, per-pair log odds of chosen / rejected, reported as its rewards), P x L as dpo's."""
    both, _ = pairs(policy)
    mean = policy.logps / policy.counts.clamp(min=1)
    log_odds = mean - torch.log1p(-torch.exp(mean).clamp(max=1 - 1e-6))
    chosen, rejected = log_odds[0::2], log_odds[1::2]
    losses = torch.where(both, -mean[0::2] + lam * -F.logsigmoid(chosen - rejected), 0.0)
    return losses, {"chosen": chosen.detach(), "rejected": rejected.detach()}


# ---- the reference model's log-probabilities, computed once and stored with the data (data/reference_store.py)


def weights_fingerprint(model) -> str:
    """A hash of a model's weights (fp32, by name): the identity of a reference model."""
    import hashlib

    from dist_clm.parallel.partitioned import gathered

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        with gathered([tensor]):  # (one tensor at a time where ZeRO-3 partitions the model)
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def compute_reference(model_path: str, data_dir: str, batch_size: int = 8, device: str = "cpu") -> dict:
    """`dist-clm prepare-reference`: the summed log-probabilities of every learned conversation of a prepared
    directory (or URL) of pairs under the model at `model_path` (the policy's starting point), stored with the
    data with the model's weights fingerprint (data/reference_store.py); returns the record written."""
    from dist_clm import console
    from dist_clm.data import reference_store
    from dist_clm.data.format import read_manifest
    from dist_clm.data.stream import TokenStream
    from dist_clm.data.tokenizer import fingerprint
    from dist_clm.errors import UserError
    from dist_clm.evaluation.export import load_model

    manifest = read_manifest(data_dir)
    tuned = manifest.get("fine_tuning") or {}
    if not tuned.get("pairs"):
        raise UserError(f"'{data_dir}' holds no preference pairs; prepare it with --format preference.")
    with reference_store.claim(data_dir):  # one writer at a time, from before the pass
        streams = {split: TokenStream(data_dir, split, manifest) for split in ("train", "val")}
        block = tuned["block_size"]
        pairs = {split: manifest["splits"][split]["documents"] for split in streams}
        blocks = sum(-(-stream.tokens // block) for stream in streams.values())
        console.info(f"prepare-reference: the log-probabilities of {console.count(sum(pairs.values()), 'pair')} "
                     f"(train {pairs['train']:,}, val {pairs['val']:,}; {console.count(blocks, 'block')}) under "
                     f"{model_path}, on {device}")  # fmt: skip
        model, tok, _ = load_model(model_path, device, dtype=torch.float32)  # (the reference values in fp32)
        if fingerprint(tok) != manifest["tokenizer"]["fingerprint"]:
            raise UserError(
                f"'{model_path}' uses another tokenizer than '{data_dir}'; prepare the data with its tokenizer."
            )
        bar = console.progress(total=blocks, unit="block", desc="prepare-reference")
        arrays = {split: _stream_values(model, stream, block, batch_size, bar) for split, stream in streams.items()}
        bar.close()
        record = {"model": str(model_path), "weights": weights_fingerprint(model)}
        return reference_store.write(data_dir, arrays, record)


@torch.no_grad()
def _stream_values(model, stream, block: int, batch_size: int, bar):
    """(2, n) float64: the stream offset and summed log-probability of each learned conversation, in order;
    `bar` (a console.progress) told the blocks done."""
    import numpy as np

    device = next(model.parameters()).device
    offsets, values = [], []
    for start in range(0, stream.tokens, block * batch_size):
        rows = [stream.read_learned(s, block) for s in range(start, min(start + block * batch_size, stream.tokens),
                                                             block)]  # fmt: skip
        ids, learned, positions = (torch.as_tensor(np.stack([r[i] for r in rows])).long().to(device) for i in range(3))
        labels = torch.where(learned.bool(), ids, torch.full_like(ids, IGNORE))
        conv = conversation_logps(model(input_ids=ids, position_ids=positions, use_cache=False).logits, labels,
                                  positions)  # fmt: skip
        rows = torch.arange(len(ids), device=device)[:, None].expand_as(conv.counts)
        values += conv.logps[conv.valid()].double().cpu().tolist()
        offsets += (start + rows * block + conv.starts)[conv.valid()].cpu().tolist()
        bar.update(len(ids))
    return np.array([offsets, values], dtype=np.float64)


def count_pairs(labels: torch.Tensor, positions: torch.Tensor) -> int:
    """The pairs in a micro batch (on the host): the learned conversations of its chosen rows (0, 2, 4, ...)."""
    learned = labels[0::2, 1:] != IGNORE
    doc = torch.cumsum(positions[0::2] == 0, dim=1)[:, 1:] - 1
    flat = doc + positions.shape[1] * torch.arange(len(doc))[:, None]
    return int(torch.unique(flat[learned]).numel())


STATS = ("pairs", "reward_chosen", "reward_rejected", "ranked_right", "unpaired")  # a micro batch's statistics


@torch.no_grad()
def held_out(model, measure, stream, reference, block: int, units: int, pairs_per_batch: int, device: str,
             rank: int = 0, world: int = 1, counts: bool = True) -> list[float]:  # fmt: skip
    """Collective: over the first `units` pairs of blocks of `block` tokens of a validation split of pairs
    (`stream`: its TokenStream; `reference`: its reference values, reference_store.load_values', or None), the
    sums on every rank of: the objective's STATS (`measure`: objectives.Preference.measure), its pairs' losses,
    the chosen answers' NLL and their learned tokens. Each rank scores every world-th pair of blocks, whole; one
    that does not count (`counts` false: another rank of its tensor-parallel group scores the same) adds nothing."""
    import numpy as np

    from dist_clm.data.reference_store import values_in
    from dist_clm.evaluation.perplexity import in_step
    from dist_clm.parallel.collectives import all_reduce_sum

    sums = torch.zeros(len(STATS) + 3, dtype=torch.float64)

    def read(batch: list[int]):
        starts = [(2 * u + side) * block for u in batch for side in (0, 1)]  # each pair's chosen block, its rejected
        rows = [stream.read_learned(at, block) for at in starts]
        ids, learned, positions = (torch.as_tensor(np.stack([r[i] for r in rows])).long() for i in range(3))
        values = None
        if reference is not None:  # (the loader's layout: each row's conversations' values, then NaN)
            values = torch.full((len(rows), block), float("nan"), dtype=torch.float64)
            for row, at in enumerate(starts):
                got = torch.from_numpy(values_in(reference, at, block))
                values[row, : len(got)] = got
        return ids, torch.where(learned.bool(), ids, IGNORE), positions, values

    def blank(batch: list[int]):
        ids = torch.zeros((2 * len(batch), block), dtype=torch.int64)
        return ids, torch.full_like(ids, IGNORE), ids, None

    def score(inputs, real: bool) -> None:
        ids, labels, positions, values = (x if x is None else x.to(device) for x in inputs)
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        conv = conversation_logps(logits, labels, positions)
        losses, stats = measure(conv, values)
        both, _ = pairs(conv)
        chosen = [losses.sum(), -(conv.logps[0::2] * both).sum(), (conv.counts[0::2] * both).sum()]
        if real and counts:
            sums.add_(torch.cat([stats.double(), *(x.double().reshape(1) for x in chosen)]).cpu())

    was_training = model.training
    model.eval()
    mine = list(range(units))[rank::world]
    batches = [mine[i : i + pairs_per_batch] for i in range(0, len(mine), pairs_per_batch)]
    in_step(batches, [0], device, read, blank, score)
    model.train(was_training)
    return all_reduce_sum(sums.tolist(), device)
