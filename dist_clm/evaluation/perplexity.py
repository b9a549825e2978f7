"""Perplexity and bits per byte of a token stream, on any number of ranks.

perplexity = exp(total next-token NLL / total scored tokens); bits per byte = total NLL / ln 2 / the UTF-8
bytes of the scored tokens. The stream is cut into windows:

- non-overlapping blocks (the default): each block scores its tokens after the first;
- sliding (a stride below the block size): a window starts every `stride` tokens and scores only the tokens
  the previous windows did not, so every token after the stream's first is scored exactly once, each with
  at least block_size - stride tokens of context. With stride = block size it is the same as blocks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dist_clm.errors import DataError
from dist_clm.parallel.collectives import agree_on_error, all_reduce_sum


@dataclass(frozen=True)
class Window:
    start: int  # first token of the window in the stream
    length: int  # tokens fed to the model
    scored: int  # how many of its last next-token targets count (at most length - 1)


def windows(n_tokens: int, block_size: int, stride: int = 0, max_windows: int = 0) -> list[Window]:
    """The windows over a stream of `n_tokens` (see the module docstring); `max_windows` caps them (0 = all)."""
    stride = stride or block_size
    if not 0 < stride <= block_size:
        raise ValueError(f"stride must be in (0, block_size], got {stride}")
    out: list[Window] = []
    if stride == block_size:  # blocks; a last shorter one if it has at least one target
        for start in range(0, n_tokens - 1, block_size):
            length = min(block_size, n_tokens - start)
            out.append(Window(start, length, length - 1))
    else:
        scored_until = 1  # stream positions below this are scored (position 0 never is: nothing precedes it)
        for start in range(0, n_tokens - 1, stride):
            end = min(start + block_size, n_tokens)
            out.append(Window(start, end - start, end - scored_until))
            scored_until = end
            if end == n_tokens:
                break
    return out[:max_windows] if max_windows else out


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens), for bits per byte.

    Byte-level BPE (GPT-2 style): every character of a vocabulary entry stands for exactly one byte.
    SentencePiece style: `<0xNN>` byte-fallback pieces are one byte, `▁` is a space. Added tokens that are
    not special count their own text.
    """
    import json

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    byte_level = (backend.get("decoder") or {}).get("type") == "ByteLevel"
    vocab = tokenizer.get_vocab()
    lengths = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    added = {t["content"] for t in backend.get("added_tokens", [])}
    special = set(tokenizer.all_special_tokens)
    for piece, i in vocab.items():
        if piece in special:
            continue
        if piece in added or not byte_level:
            is_byte = len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
            lengths[i] = 1 if is_byte else len(piece.replace("\u2581", " ").encode("utf-8"))
        else:
            lengths[i] = len(piece)
    return lengths


@torch.no_grad()
def perplexity(
    model,
    read,
    wins: list[Window],
    batch_size: int,
    device: str,
    rank: int = 0,
    world: int = 1,
    byte_lengths: np.ndarray | None = None,
    counts: bool = True,
) -> dict[str, float]:
    """Score `wins` of the stream `read(start, length)`; each rank takes every world-th window, sums reduce (a
    rank that does not count adds nothing: another rank of its tensor-parallel group scores the same windows).
    A `read` that returns (tokens, learned, positions) (TokenStream.read_learned: fine-tuning data) scores only
    the learned tokens, with attention kept inside each document by the restarting positions.

    Every rank runs the same number of forward passes (a rank with fewer windows repeats one and discards
    it), because under ZeRO-3 a forward pass gathers parameters collectively.
    """
    was_training = model.training
    model.eval()
    table = torch.from_numpy(byte_lengths) if byte_lengths is not None else None
    sums = [0.0, 0, 0]  # NLL, scored tokens, their bytes

    def read_batch(batch: list[Window]):
        got = [read(w.start, w.length) for w in batch]
        if isinstance(got[0], tuple):  # (tokens, learned, positions)
            ids, learned, positions = (torch.stack([torch.from_numpy(g[i].astype(np.int64)) for g in got])
                                       for i in range(3))  # fmt: skip
            return batch, ids, learned, {"position_ids": positions.to(device), "use_cache": False}
        return batch, torch.stack([torch.from_numpy(g.astype(np.int64)) for g in got]), None, {}

    def blank(batch: list[Window]):
        return batch, torch.zeros((len(batch), batch[0].length), dtype=torch.int64), None, {}

    def score(inputs, real: bool) -> None:
        batch, ids, learned, extra = inputs
        logits = model(input_ids=ids.to(device), **extra).logits.float()
        targets = ids[:, 1:]
        per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.to(device).flatten(), reduction="none")
        # a window scores its last `scored` targets (of fine-tuning data: the learned ones among them)
        first = torch.tensor([targets.shape[1] - w.scored for w in batch]).unsqueeze(1)
        mask = torch.arange(targets.shape[1]).unsqueeze(0) >= first
        if learned is not None:
            mask &= learned[:, 1:].bool()
        if real and counts:
            sums[0] += float((per_token.view(targets.shape).cpu() * mask).sum(dtype=torch.float64))
            sums[1] += int(mask.sum())
            if table is not None:
                sums[2] += int(table[targets][mask].sum())

    in_step(_same_length_batches(wins[rank::world], batch_size), [wins[0]], device, read_batch, blank, score)
    nll, count, n_bytes = all_reduce_sum(sums, device)
    model.train(was_training)
    mean = nll / count
    result = {"loss": mean, "perplexity": math.exp(mean), "tokens": int(count)}
    if table is not None and n_bytes:
        result |= {"bits_per_byte": nll / math.log(2) / n_bytes, "bytes": int(n_bytes)}
    return result


def in_step(batches: list, filler, device: str, read, blank, score) -> None:
    """Collective: score(read(batch), real=True) for each of this rank's batches, then score(read(filler),
    real=False) until every rank has scored as many batches as the rank with the most (under ZeRO-3 a forward
    pass gathers parameters collectively: every rank runs as many). A DataError from `read` makes that batch and
    the rest blank(batch) (inputs of its shape, not read; scored with real=False), and is raised on every rank
    once all have scored theirs."""
    n = torch.tensor([len(batches)], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
    damaged = None
    for i in range(int(n.item())):
        real = i < len(batches) and damaged is None
        batch = batches[i] if i < len(batches) else filler
        try:
            inputs = read(batch) if damaged is None else blank(batch)
        except DataError as e:  # keep the forward passes in step with the other ranks; all stop below
            damaged, real, inputs = e, False, blank(batch)
        score(inputs, real)
    agree_on_error(damaged, device)


def _same_length_batches(wins: list[Window], batch_size: int) -> list[list[Window]]:
    batches: list[list[Window]] = []
    for w in wins:
        if batches and len(batches[-1]) < batch_size and batches[-1][0].length == w.length:
            batches[-1].append(w)
        else:
            batches.append([w])
    return batches


def evaluate_cli(
    checkpoint: str,
    data: str | None = None,
    text: list[str] | None = None,
    block_size: int | None = None,
    stride: int = 0,
    max_blocks: int = 0,
    batch_size: int = 8,
) -> dict[str, float]:
    """`dist-clm eval`: a checkpoint (or exported model) on a prepared validation split or on text files."""
    from dist_clm.checkpointing.checkpointer import COMPLETE, run_dir_of
    from dist_clm.config import load_config
    from dist_clm.data import sources
    from dist_clm.data.format import read_manifest
    from dist_clm.data.stream import TokenStream
    from dist_clm.data.tokenizer import fingerprint
    from dist_clm.errors import UserError
    from dist_clm.evaluation.export import load_model
    from dist_clm.evaluation.placement import input_device
    from dist_clm.models.build import max_positions
    from dist_clm.parallel import process_group

    env = process_group.init() if "RANK" in os.environ else None
    model, tok, where = load_model(checkpoint, env.device if env else process_group.inference_device())
    run_config = run_dir_of(where) / "config.yaml"
    cfg = load_config(run_config) if (where / COMPLETE).is_file() and run_config.is_file() else None
    limit = max_positions(model.config)
    block_size = block_size or trained_block_size(where, cfg) or limit or 1024
    if limit and block_size > limit:
        raise UserError(f"--block-size {block_size} is more than the model's {limit} positions; lower it.")
    if stride and not 0 < stride <= block_size:
        raise UserError(f"--stride {stride} must be between 1 and the block size ({block_size}); change it.")
    if text:
        files = sources.resolve_inputs(text)
        docs = [t for t in sources.iter_documents(files) if t]
        if not docs:
            raise UserError("the text files hold no non-empty document to evaluate; give files with text.")
        ids = [e.ids + [tok.eos_token_id] for e in tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False)]
        flat = np.concatenate([np.asarray(i, dtype=np.int64) for i in ids])
        read, n_tokens = (lambda s, n: flat[s : s + n]), len(flat)
    else:
        data = data or (cfg.data.path or (cfg.data.mix[0].path if cfg.data.mix else None) if cfg else None)
        if cfg is not None:  # remote data: through the cache the run used
            from dist_clm.data.remote import configure

            configure(cfg.data.cache_dir, cfg.data.cache_limit)
        if not data:
            raise UserError("no evaluation data: pass --data DIR (a prepared directory) or --text FILES.")
        manifest = read_manifest(data)
        if manifest["tokenizer"]["fingerprint"] != fingerprint(tok):
            raise UserError(
                f"'{data}' was tokenized with another tokenizer than the model's; prepare it with "
                "the model's tokenizer or pass --text."
            )
        stream = TokenStream(data, "val", manifest)
        read, n_tokens = stream.reader(), stream.tokens
    device = str(input_device(model))
    wins = windows(n_tokens, block_size, stride, max_blocks)
    result = perplexity(
        model,
        read,
        wins,
        batch_size,
        device,
        env.rank if env else 0,
        env.world_size if env else 1,
        token_byte_lengths(tok),
    )
    what = f"{len(files)} text file(s)" if text else f"the val split of {data}"
    return result | {"block_size": block_size, "stride": stride, "data": what, "is_main": env.is_main if env else True}


def trained_block_size(where, cfg) -> int | None:
    """The block size the model last trained at: its checkpoint's run config at the checkpoint's step, or what
    its export recorded (None for a model from elsewhere)."""
    import json

    from dist_clm.checkpointing.checkpointer import read_parts

    if cfg is not None:
        return cfg.data.block_size_at(max(1, read_parts(where)["progress"]["step"]))
    provenance = where / "data_provenance.json"
    return json.loads(provenance.read_text()).get("block_size") if provenance.is_file() else None
