"""Run under torchrun with 2 ranks: tensor parallelism (size 2) through DeepSpeed's AutoTP and dist_clm's install
against the unsharded model on the same micro batch, for each case: the loss and every parameter's gradient after
DeepSpeed's reduction (each rank's shard against its slice of the unsharded gradient), for Llama and Qwen3, ZeRO 0,
1 and 3, packed documents or not, pretraining or fine-tuning labels, the fused or the plain loss head. Also: what
Qwen3's per-head norms get without dist_clm's sum of their partial gradients. Rank 0 writes the differences as
JSON to argv[1]."""

from __future__ import annotations

import copy
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from dist_clm.models import loss_head  # noqa: E402
from dist_clm.parallel import tensor_parallel  # noqa: E402

VOCAB, ROWS, LENGTH = 97, 2, 32  # (a vocabulary the group splits unevenly: 49 + 48 rows)
SHAPE = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=64,
             max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
MODELS = {"llama": SHAPE, "qwen3": {**SHAPE, "head_dim": 8}}


def batch(documents: bool, learned: bool):
    """Two rows: documents of 5, 11, 16 and 20, 12 tokens (restarting positions), or one sequence per row;
    labels with each document's first token ignored, and a loss mask (fine-tuning) when `learned`."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, VOCAB, (ROWS, LENGTH), generator=g)
    labels, positions = ids.clone(), None
    if documents:
        lengths = [[5, 11, 16], [20, 12]]
        positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
        labels[positions == 0] = -100
    if learned:
        labels[:, ::3] = -100  # (prompt tokens)
    return ids, labels, positions


def build(kind: str):
    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, vocab_size=VOCAB, **MODELS[kind])
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def whole(engine, name: str, grad: torch.Tensor, group) -> torch.Tensor:
    """A sharded parameter's gradient joined over the group as AutoTP split it (by input rows for a row-parallel
    layer, by output rows for a column-parallel one); a replicated one's as it is."""
    from deepspeed.module_inject.layers import LinearAllreduce, TensorParallel_Layer

    module = engine.module.get_submodule(name.rsplit(".", 1)[0])
    if not isinstance(module, TensorParallel_Layer):
        return grad
    parts = [None, None]
    torch.distributed.all_gather_object(parts, grad, group=group)
    return torch.cat(parts, dim=1 if isinstance(module, LinearAllreduce) else 0)


def case(kind: str, zero: int, documents: bool, learned: bool, head: str, sum_partial: bool = True) -> dict:
    model = build(kind)
    ids, labels, positions = batch(documents, learned)
    ref = copy.deepcopy(model)
    ref_loss = ref(input_ids=ids, labels=labels, position_ids=positions, use_cache=False).loss
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    config = {"train_micro_batch_size_per_gpu": ROWS, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": zero, "stage3_param_persistence_threshold": 0},
              "tensor_parallel": {"autotp_size": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "torch_adam": True}}}  # fmt: skip
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    if sum_partial:
        tp = tensor_parallel.install(engine)
        if head == "fused":
            loss_head.install(engine.module, group=tp.group)
    else:
        from deepspeed.utils import groups

        tp = tensor_parallel.TensorParallel(2, 0, groups.get_tensor_model_parallel_group())
    loss = engine(input_ids=ids, labels=labels, position_ids=positions, use_cache=False).loss
    engine.backward(loss)
    grads = {n: whole(engine, n, safe_get_full_grad(p), tp.group) for n, p in engine.module.named_parameters()}
    relative = {n: ((g - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-12)).item()
                for n, g in grads.items()}  # fmt: skip
    worst = max(relative, key=relative.get)
    return {"loss": abs(loss.item() - ref_loss.item()), "grad": relative[worst], "worst": worst,
            "fused": bool(getattr(engine.module.get_output_embeddings(), "fused_loss", False)),
            "norms": max((v for n, v in relative.items() if "_norm" in n and "self_attn" in n),
                         default=0.0)}  # fmt: skip


def main(out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    found = {}
    # (Qwen3 computes its loss through the plain head: the fused one serves the families of loss_head.PLAIN_HEADS)
    cases = (
        ("llama", 0, True, True, "fused"),
        ("llama", 1, True, False, "fused"),
        ("llama", 1, False, True, "plain"),
        ("llama", 3, True, True, "fused"),
        ("qwen3", 1, True, True, "plain"),
        ("qwen3", 3, True, False, "plain"),
        ("qwen3", 3, False, True, "plain"),
    )
    for kind, zero, documents, learned, head in cases:
        name = f"{kind} zero={zero} documents={documents} learned={learned} head={head}"
        found[name] = case(kind, zero, documents, learned, head)
    found["qwen3 without the partial sums"] = case("qwen3", 1, True, False, "plain", sum_partial=False)
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(found, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
