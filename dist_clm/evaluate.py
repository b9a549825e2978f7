"""Perplexity: exp(total next-token NLL / total predicted tokens), over non-overlapping blocks, on any ranks."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from dist_clm.distributed import all_reduce_sum


def block_spans(n_tokens: int, block_size: int, max_blocks: int = 0) -> list[tuple[int, int]]:
    """(start, length) of consecutive blocks; with no cap the last, shorter block is included (>= 2 tokens)."""
    spans = [(s, block_size) for s in range(0, n_tokens - block_size + 1, block_size)]
    tail = n_tokens - len(spans) * block_size
    if tail >= 2:
        spans.append((len(spans) * block_size, tail))
    return spans[:max_blocks] if max_blocks else spans


@torch.no_grad()
def perplexity(
    model, read, spans: list[tuple[int, int]], batch_size: int, device: str, rank: int = 0, world: int = 1
) -> dict[str, float]:
    """Evaluate `spans` of the stream `read(start, length)`; each rank takes every world-th span, sums reduce.

    Every rank runs the same number of forward passes (a rank with fewer spans repeats one and discards it),
    because under ZeRO-3 a forward pass gathers parameters collectively.
    """
    was_training = model.training
    model.eval()
    mine = spans[rank::world]
    batches = _same_length_batches(mine, batch_size)
    n_batches = torch.tensor([len(batches)], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(n_batches, op=torch.distributed.ReduceOp.MAX)
    nll, count = 0.0, 0
    for i in range(int(n_batches.item())):
        real = i < len(batches)
        batch = batches[i] if real else [spans[0]]
        ids = torch.stack([torch.from_numpy(read(s, n)) for s, n in batch]).to(device)
        logits = model(input_ids=ids).logits.float()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        if real:
            nll += loss.item()
            count += ids[:, 1:].numel()
    nll, count = all_reduce_sum([nll, count], device)
    model.train(was_training)
    mean = nll / count
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": int(count)}


def _same_length_batches(spans: list[tuple[int, int]], batch_size: int) -> list[list[tuple[int, int]]]:
    batches: list[list[tuple[int, int]]] = []
    for span in spans:
        if batches and len(batches[-1]) < batch_size and batches[-1][0][1] == span[1]:
            batches[-1].append(span)
        else:
            batches.append([span])
    return batches


def evaluate_cli(
    checkpoint: str,
    data: str | None = None,
    text: list[str] | None = None,
    block_size: int | None = None,
    max_blocks: int = 0,
    batch_size: int = 8,
) -> dict[str, float]:
    """`dist-clm eval`: a checkpoint (or exported model) on a prepared validation split or on text files."""
    import numpy as np

    from dist_clm import checkpoint as ckpt
    from dist_clm import distributed
    from dist_clm.config import load_config
    from dist_clm.data import sources
    from dist_clm.data.loader import TokenStream
    from dist_clm.data.prepare import read_manifest
    from dist_clm.data.tokenizer import fingerprint
    from dist_clm.errors import UserError
    from dist_clm.model import max_positions

    model, tok, where = ckpt.load_model(checkpoint)
    run_config = ckpt.run_dir_of(where) / "config.yaml"
    cfg = load_config(run_config) if (where / ckpt.COMPLETE).is_file() and run_config.is_file() else None
    block_size = block_size or (cfg.data.block_size if cfg else max_positions(model.config) or 1024)
    if max_positions(model.config) and block_size > max_positions(model.config):
        raise UserError(f"--block-size {block_size} is more than the model's {max_positions(model.config)} positions.")
    if text:
        files = sources.resolve_inputs(text)
        docs = [t for t in sources.iter_documents(files) if t]
        if not docs:
            raise UserError("the text files hold no non-empty document to evaluate.")
        ids = [e.ids + [tok.eos_token_id] for e in tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False)]
        flat = np.concatenate([np.asarray(i, dtype=np.int64) for i in ids])
        read, n_tokens = (lambda s, n: flat[s : s + n]), len(flat)
    else:
        data = data or (cfg.data.path or (cfg.data.mix[0].path if cfg.data.mix else None) if cfg else None)
        if not data:
            raise UserError("no evaluation data: pass --data DIR (a prepared directory) or --text FILES.")
        manifest = read_manifest(data)
        if manifest["tokenizer"]["fingerprint"] != fingerprint(tok):
            raise UserError(
                f"'{data}' was tokenized with another tokenizer than the model's; prepare it with "
                "the model's tokenizer or pass --text."
            )
        stream = TokenStream(data, "val", manifest)
        read, n_tokens = stream.read, stream.tokens
    env = distributed.init() if "RANK" in os.environ else None
    device = env.device if env else "cpu"
    spans = block_spans(n_tokens, block_size, max_blocks)
    return perplexity(
        model.to(device), read, spans, batch_size, device, env.rank if env else 0, env.world_size if env else 1
    )
