"""What a step that went wrong trained on. When the loss guard skips a step's update or rolls the run back, every
rank scores its share of that step's blocks again under the weights the step ran with (no update was applied to
them), token by token, and rank 0 writes RUN/incidents/step-N.json: why, the step's blocks and the documents that
filled them (as `dist-clm data batch --step N` prints them), and the documents with the highest loss, with
their mean loss over the step's tokens of them. Collective; the forward passes leave the training alone (no
gradient, no random draw, the model's mode restored).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dist_clm.data.step_blocks import step_blocks
from dist_clm.fsutil import atomic_write_text
from dist_clm.parallel.collectives import all_gather_object

TOP = 10  # documents listed by loss
EXCERPT_TOKENS = 24

INCIDENTS = "incidents"


def record(run, blocks, step: int, reason: str) -> Path | None:
    """Collective, right after step `step` (the data position already past it): score this rank's blocks of the
    step, gather every rank's documents to rank 0, which writes the incident file; its path on rank 0."""
    from dist_clm.training.step import model_inputs

    position, micro = run.position, run.cfg.train.micro_batch_size
    start = position.blocks_consumed - position.global_batch
    dp_rank, dp_world = run.dp
    mine = step_blocks(blocks, start, position.global_batch, dp_world, micro, dp_rank)
    model = run.engine.module
    was_training = model.training
    model.eval()
    losses: dict[tuple[str, int], list[float]] = {}  # (source, document) -> [NLL sum, tokens]
    with torch.no_grad():
        for first in range(0, len(mine), micro):
            rows = mine[first : first + micro]
            batch = {k: torch.from_numpy(v) for k, v in blocks.__getitems__([b.block for b in rows]).items()}
            batch.pop("source")
            batch.pop("reference", None)
            labels = batch["labels"]
            inputs = {k: v for k, v in model_inputs(run, batch).items() if k != "labels"}
            logits = model(**inputs, use_cache=False).logits.float()
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device),
                                  ignore_index=-100, reduction="none").view(len(rows), -1).cpu()  # fmt: skip
            learned = (labels[:, 1:] != -100).float()
            for r, b in enumerate(rows):
                for p in b.pieces:  # the targets inside the piece: tokens at + 1 .. at + length - 1 of the row
                    lo, hi = max(p.at, 1) - 1, p.at + (p.end - p.start) - 1
                    entry = losses.setdefault((b.source, p.document), [0.0, 0])
                    entry[0] += float((nll[r, lo:hi] * learned[r, lo:hi]).sum(dtype=torch.float64))
                    entry[1] += int(learned[r, lo:hi].sum())
    model.train(was_training)
    counted = run.counts  # (one rank of a sequence- or tensor-parallel group: the others scored the same blocks)
    shares = all_gather_object(([b.to_json() | {"ids": b.ids.tolist()} for b in mine], losses) if counted else None)
    if not run.env.is_main:
        return None
    return write(Path(run.cfg.run.dir), step, reason, start, [s for s in shares if s is not None])


def write(run_dir: Path, step: int, reason: str, start: int, shares: list) -> Path:
    """RUN/incidents/step-N.json from every counting rank's (blocks, losses)."""
    from dist_clm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(run_dir / "tokenizer") if (run_dir / "tokenizer").is_dir() else None
    blocks, losses, text = [], {}, {}
    for rank_blocks, rank_losses in shares:
        for b in rank_blocks:
            ids = b.pop("ids")
            for p in b["pieces"]:
                key = (b["source"], p["document"])
                if tokenizer is not None and key not in text:
                    text[key] = tokenizer.decode(ids[p["at"] : p["at"] + min(EXCERPT_TOKENS, p["end"] - p["start"])])
            blocks.append(b)
        for key, (nll, count) in rank_losses.items():
            entry = losses.setdefault(key, [0.0, 0])
            entry[0], entry[1] = entry[0] + nll, entry[1] + count
    documents = [
        {"source": s, "document": d, "loss": nll / count, "tokens": count, "excerpt": text.get((s, d), "")}
        for (s, d), (nll, count) in losses.items()
        if count
    ]
    documents.sort(key=lambda x: -x["loss"])
    out = run_dir / INCIDENTS / f"step-{step}.json"
    out.parent.mkdir(exist_ok=True)
    report = {"step": step, "reason": reason, "first_block": start, "top_documents": documents[:TOP],
              "documents": len(documents), "blocks": sorted(blocks, key=lambda b: b["block"])}  # fmt: skip
    atomic_write_text(out, json.dumps(report, indent=1))
    return out
