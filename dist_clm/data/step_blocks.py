"""The blocks and documents behind a training step, recomputed from a run's data order: which global blocks step
N trained on, which data-parallel rank and micro batch read each, and for each block its source, the stretch of
that source's token stream it holds, and the documents (and the part of each) that filled it.

Exact by construction: the loader reads a step's blocks through the same functions (order.rank_blocks,
batches.MixedBlocks), from a position that moves by the global batch each step and past every window a rollback
skipped (RUN/skips.json), whatever the stages, mixture, shuffle window or parallel groups. A document's id is
the stream offset of its first token in its source's training split (stable, and readable without counting the
documents before it, which for data in a bucket would mean fetching every shard).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dist_clm.data.batches import MixedBlocks
from dist_clm.data.order import DataPosition, rank_blocks
from dist_clm.data.stream import TokenStream
from dist_clm.errors import UserError


@dataclass
class Piece:
    """The part of one document in a block."""

    document: int  # the document's id: the stream offset of its first token
    start: int  # the piece's first token, counted in the document
    end: int  # one past its last
    at: int  # where the piece begins in the block


@dataclass
class StepBlock:
    block: int  # the global block number
    rank: int  # the data-parallel rank that read it (under sequence or tensor parallelism, its whole group)
    micro_batch: int
    row: int  # its row in the micro batch
    source: str
    offset: int  # the stream offset of its first token (the source's training split)
    size: int  # its tokens
    pieces: list[Piece]
    ids: np.ndarray = field(repr=False)  # its token ids (as the loader feeds them)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "ids"}


def first_block(position: DataPosition, step: int) -> int:
    """The global block that step `step` (1-based) started at: each step after the one before, moved past every
    window a rollback skipped, as the loop and a resume move (the steps a rollback undid trained on other blocks;
    what they were is in RUN/skips.json)."""
    ends = position.skip_ends()
    blocks = 0
    for _ in range(step):
        while blocks in ends and ends[blocks] > blocks:
            blocks = ends[blocks]
        if _ < step - 1:
            blocks += position.global_batch
    return blocks


def undone_starts(position: DataPosition, step: int) -> list[dict]:
    """The earlier runs of step `step` that a rollback undid: for each window in RUN/skips.json whose steps
    (after the checkpoint rolled back to, up to the step that diverged) include `step`, where that run of the
    step started, and why the run rolled back."""
    out = []
    for skip in position.skipped_windows():
        a, b, diverged = skip["from_block"], skip["to_block"], skip["diverged_at_step"]
        checkpoint = diverged - (b - a) // position.global_batch  # (the window holds the steps after it)
        if checkpoint < step <= diverged:
            out.append({"first_block": a + (step - checkpoint - 1) * position.global_batch,
                        "reason": skip["reason"], "diverged_at_step": diverged})  # fmt: skip
    return out


def pieces(stream: TokenStream, offset: int, ids: np.ndarray) -> list[Piece]:
    """The documents that fill tokens [offset, offset + len(ids)) of `stream` (`ids` receives those tokens)."""
    starts = stream.read_into(offset, ids, with_starts=True).tolist()
    cuts = sorted({0, *starts}) + [len(ids)]
    first = offset if starts[:1] == [0] else stream.document_start(offset)
    out = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        document = first if a == 0 else offset + a
        out.append(Piece(document, offset + a - document, offset + b - document, a))
    return out


def step_blocks(blocks: MixedBlocks, start: int, global_batch: int, dp_world: int, micro_batch: int,
                dp_rank: int | None = None) -> list[StepBlock]:  # fmt: skip
    """Every block of the step that starts at global block `start` (or data-parallel rank `dp_rank`'s), in the
    order the ranks read them."""
    per_rank = global_batch // dp_world
    out = []
    for r in range(dp_world) if dp_rank is None else [dp_rank]:
        for j, g in enumerate(rank_blocks(start, 0, r, dp_world, per_rank)):
            i, k = blocks.mixture(g)
            size = blocks.mixture.block_size(g)
            offset = blocks.offset(i, k, size)
            ids = np.empty(size, dtype=np.int64)
            found = pieces(blocks.blocks[i].stream, offset, ids)
            out.append(StepBlock(g, r, j // micro_batch, j % micro_batch, blocks.names[i], offset, size, found, ids))
    return out


@dataclass
class RunData:
    """What a run's data order needs, from its directory: the settled config, sources, position and ranks."""

    config: object  # config.Config
    position: DataPosition
    blocks: MixedBlocks
    world: int  # ranks of the run's latest launch (RUN/ranks.json)
    ranks_per_batch: int  # ranks that share a batch (a sequence- or tensor-parallel group)
    micro_batch: int

    @property
    def dp_world(self) -> int:
        return self.world // self.ranks_per_batch

    def step(self, step: int, rank: int | None = None, start: int | None = None) -> tuple[int, list[StepBlock]]:
        """(the step's first global block, its blocks: every rank's, or global rank `rank`'s group's); `start`:
        of the run of the step that started there (one a rollback undid) instead of the one the run kept."""
        start = first_block(self.position, step) if start is None else start
        dp_rank = None if rank is None else rank // self.ranks_per_batch
        return start, step_blocks(self.blocks, start, self.position.global_batch, self.dp_world, self.micro_batch,
                                  dp_rank)  # fmt: skip


def run_data(run_dir: str | Path, overrides: list[str] | tuple = ()) -> RunData:
    """The data order of the run in `run_dir` (its config.yaml, with `overrides` such as data.path=... for data
    that moved); the rank split of its latest launch."""
    from dist_clm.config import load_config
    from dist_clm.data.loader import ordered_blocks
    from dist_clm.data.run_data import training_sources

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"'{run_dir}' is not a run directory (no config.yaml); give the run.dir a training run wrote.")
    cfg = load_config(str(run_dir / "config.yaml"), list(overrides))
    ranks = run_dir / "ranks.json"
    world = len(json.loads(ranks.read_text())) if ranks.is_file() else 1
    d, t = cfg.data, cfg.train
    per_batch = cfg.distributed.ranks_per_batch
    global_batch = t.global_batch_size or t.micro_batch_size * t.grad_accum * (world // per_batch)
    sources = training_sources(d)
    position = DataPosition.from_config(d, run_dir, sources, global_batch, writes=False)
    blocks = ordered_blocks(sources, position, d.shuffle, t.seed, d.document_mask)
    return RunData(cfg, position, blocks, world, per_batch, t.micro_batch_size)


def report(run: RunData, step: int, rank: int | None = None, tokenizer=None, tokens: int = 24) -> dict:
    """What `dist-clm data batch` prints as JSON: the step, where it starts, and every block with its pieces (each
    with a decoded excerpt of its first `tokens` tokens when a tokenizer is given)."""

    def entries(found: list[StepBlock]) -> list[dict]:
        out = []
        for b in found:
            entry = b.to_json()
            if tokenizer is not None:
                for piece, shown in zip(b.pieces, entry["pieces"], strict=True):
                    stop = min(piece.at + tokens, piece.at + piece.end - piece.start)
                    shown["excerpt"] = tokenizer.decode(b.ids[piece.at : stop].tolist())
            out.append(entry)
        return out

    start, found = run.step(step, rank)
    undone = [u | {"blocks": entries(run.step(step, rank, u["first_block"])[1])}
              for u in undone_starts(run.position, step)]  # fmt: skip
    return {"step": step, "first_block": start, "global_batch": run.position.global_batch,
            "data_parallel_ranks": run.dp_world, "ranks_per_batch": run.ranks_per_batch, "blocks": entries(found),
            "undone": undone}  # fmt: skip


def text(report: dict, run_dir) -> str:
    """`report` as lines to read: a heading, then a line per block and one per document piece in it."""
    g, first = report["global_batch"], report["first_block"]
    lines = [f"step {report['step']} of {run_dir}: global blocks {first}-{first + g - 1} ({g} blocks over "
             f"{report['data_parallel_ranks']} data-parallel rank(s))"]  # fmt: skip
    lines += _block_lines(report["blocks"], report["ranks_per_batch"])
    for u in report["undone"]:
        at = u["first_block"]
        lines.append(f"before that, a run of step {report['step']} that a rollback undid (step "
                     f"{u['diverged_at_step']}: {u['reason']}) trained on global blocks "
                     f"{at}-{at + g - 1}:")  # fmt: skip
        lines += _block_lines(u["blocks"], report["ranks_per_batch"])
    return "\n".join(lines)


def _block_lines(blocks: list[dict], per: int) -> list[str]:
    lines = []
    for b in blocks:
        ranks = f"rank {b['rank']}" if per == 1 else f"ranks {b['rank'] * per}-{(b['rank'] + 1) * per - 1}"
        lines.append(f"{ranks}, micro batch {b['micro_batch']}, row {b['row']}: block {b['block']} of "
                     f"{b['source']}, {b['size']} tokens from offset {b['offset']} of its stream")  # fmt: skip
        for p in b["pieces"]:
            excerpt = f"  {p['excerpt']!r}" if "excerpt" in p else ""
            lines.append(f"    document {p['document']}, its tokens {p['start']}-{p['end']}{excerpt}")
    return lines
