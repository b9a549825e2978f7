"""Run under torchrun with 2 ranks: sequence parallelism (size 2) through dist_clm's install and a DeepSpeed engine
against the unsharded model on the same micro batch, for each case: the micro batch's loss and every parameter's
gradient after DeepSpeed's reduction (ZeRO 2, and ZeRO-3's paths: reduce-scatter, and without it all-reduced buckets
and parameters larger than a bucket), then the logits of the attention paths (sdpa, flash attention
through tests/flash_standin.py) and of DeepSpeed's own Ulysses registration, which drops
the documents. Rank 0 writes the differences as JSON to argv[1]."""

from __future__ import annotations

import copy
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from dist_clm.models import loss_head  # noqa: E402
from dist_clm.parallel import sequence_parallel  # noqa: E402

VOCAB, ROWS, LENGTH = 96, 2, 32
MODELS = {
    "gpt2": dict(n_layer=2, n_head=4, n_embd=32, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                  intermediate_size=64, max_position_embeddings=64),
}  # fmt: skip
# ZeRO-3 without reduce-scatter (what Muon needs): buckets of up to reduce_bucket_size elements are all-reduced,
# a parameter larger than that is reduce-scattered (and every one when contiguous_gradients is off: the DPO case).
# GPT-2's all in buckets; Llama's embedding and output head (96 x 32 = 3072 elements) reduce-scattered, the rest
# all-reduced
NO_REDUCE_SCATTER = {
    "gpt2": {"reduce_scatter": False},
    "llama": {"reduce_scatter": False, "reduce_bucket_size": 2500},
}


def batch(documents: bool, learned: bool):
    """Two rows: documents of 5, 11, 16 and 20, 12 tokens (restarting positions), or one sequence per row;
    labels with the first token of each document ignored, and a loss mask (SFT) when `learned`."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, VOCAB, (ROWS, LENGTH), generator=g)
    labels = ids.clone()
    positions = None
    if documents:
        lengths = [[5, 11, 16], [20, 12]]
        positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
        labels[positions == 0] = -100
        labels[:, 0] = ids[:, 0]
    if learned:
        labels[:, ::3] = -100  # (prompt tokens)
    return ids, labels, positions


def reference(model, ids, labels, positions):
    """The unsharded loss (the mean over the micro batch's predicted tokens) and gradients."""
    model.zero_grad()
    out = model(input_ids=ids, position_ids=positions, use_cache=False)
    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, out.logits.detach()


def build(kind: str, attention: str = "sdpa"):
    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, vocab_size=VOCAB, **MODELS[kind])
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.config._attn_implementation = attention
    return model


def training_case(
    kind: str, documents: bool, learned: bool, zero: int, head: str, reduction: dict | None = None
) -> dict:
    """The SP=2 engine's loss and gradients against the unsharded reference's; `reduction`: zero_optimization keys
    that choose how ZeRO-3 reduces the gradients."""
    model = build(kind)
    ids, labels, positions = batch(documents, learned)
    ref_loss, ref_grads, _ = reference(copy.deepcopy(model), ids, labels, positions)
    if head == "fused":
        loss_head.install(model)
    mpu = sequence_parallel.groups(2)
    sp = sequence_parallel.install(model, 2, mpu)
    config = {"train_micro_batch_size_per_gpu": ROWS, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": zero, **(reduction or {})}, "sequence_parallel_size": 2,
              "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "torch_adam": True}}}  # fmt: skip
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config, mpu=mpu)
    sp = sequence_parallel.fit_reduction(sp, engine)
    loss = engine(input_ids=ids, labels=labels, position_ids=positions, use_cache=False).loss
    reported, total = sp.whole(loss).clone(), loss.detach().clone()
    torch.distributed.all_reduce(total)  # (the group's shares sum to the micro batch's loss)
    torch.distributed.all_reduce(reported)  # (and what the ranks report averages to it)
    engine.backward(sp.for_backward(loss))
    grad = max(
        ((safe_get_full_grad(p) - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-12)).item()
        for n, p in engine.module.named_parameters()
    )
    return {"loss": abs(total.item() - ref_loss), "reported": abs(reported.item() / 2 - ref_loss), "grad": grad}


def preference_case(kind: str, zero: int, reduction: dict | None = None) -> dict:
    """DPO on one packed pair (a chosen and a rejected row of three conversations each, prompts not learned):
    the SP=2 engine's loss (the same whole loss on both ranks) and gradients against the unsharded ones."""
    from dist_clm.training import preference

    model = build(kind)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(1, VOCAB, (2, LENGTH), generator=g)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ([5, 11, 16], [8, 10, 14])])
    labels = ids.clone()
    labels[positions < 3] = -100  # (each conversation's first 3 tokens: its prompt)
    reference = torch.zeros(2, LENGTH)

    def dpo_loss(conv):
        return preference.dpo(conv, reference, 0.5)[0].sum()

    ref_model = copy.deepcopy(model)
    logits = ref_model(input_ids=ids, position_ids=positions, use_cache=False).logits
    ref_loss = dpo_loss(preference.conversation_logps(logits, labels, positions))
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref_model.named_parameters()}
    mpu = sequence_parallel.groups(2)
    sp = sequence_parallel.install(model, 2, mpu)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": zero, **(reduction or {})},
              "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "torch_adam": True}}}  # fmt: skip
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config, mpu=mpu)
    sp = sequence_parallel.fit_reduction(sp, engine)
    logp = engine(input_ids=ids, labels=labels, position_ids=positions, token_logps=True, use_cache=False).logits
    loss = dpo_loss(preference.conversations(logp, labels, positions))
    engine.backward(sp.for_backward(loss))
    grad = max(
        ((safe_get_full_grad(p) - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-12)).item()
        for n, p in engine.module.named_parameters()
    )
    return {"loss": abs(sp.whole(loss, share=False).item() - ref_loss.item()), "reported": 0.0, "grad": grad}


def logits_case(kind: str, attention: str) -> dict:
    """Training-mode logits of each rank's slice, gathered, against the unsharded document-masked logits."""
    model = build(kind)
    ids, labels, positions = batch(True, False)
    _, _, ref = reference(copy.deepcopy(model), ids, labels, positions)
    model.config._attn_implementation = attention
    mpu = sequence_parallel.groups(2)
    sequence_parallel.install(model, 2, mpu)
    return {"logits": gathered_difference(model, ids, positions, ref)}


def gathered_difference(model, ids, positions, ref) -> float:
    """max |logits - ref| of the sharded forward (training mode), each rank's slice gathered."""
    model.train()
    with torch.no_grad():
        base, head = model.base_model, model.get_output_embeddings()
        # the installed forward returns a loss; run its steps for the logits: documents, slice, base, head
        forward = model.forward
        captured = {}

        def keep(module, args, output):
            captured["hidden"] = output.last_hidden_state

        handle = base.register_forward_hook(keep)
        forward(input_ids=ids, labels=ids, position_ids=positions, use_cache=False)
        handle.remove()
        logits = head(captured["hidden"]).float()
    parts = [torch.empty_like(logits) for _ in range(2)]
    torch.distributed.all_gather(parts, logits.contiguous())
    return (torch.cat(parts, 1) - ref.float()).abs().max().item()


def deepspeed_own(kind: str) -> dict:
    """DeepSpeed's own registration (its wrapper around sdpa): the same packed rows, its logits against the
    document-masked and the plain causal references."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    model = build(kind)
    ids, _, positions = batch(True, False)
    _, _, ref = reference(copy.deepcopy(model), ids, ids, positions)
    with torch.no_grad():  # plain causal: a 2-D all-ones mask turns transformers' packed-row detection off
        causal = model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids), use_cache=False)
    parallel_state_sp._release_sequence_parallel_groups()
    UlyssesSPAttentionHF.register_with_transformers(model, "sdpa", 2, ROWS)
    rank = torch.distributed.get_rank()
    cut = slice(rank * LENGTH // 2, (rank + 1) * LENGTH // 2)
    model.train()
    with torch.no_grad():
        logits = model(input_ids=ids[:, cut], position_ids=positions[:, cut], use_cache=False).logits.float()
    parts = [torch.empty_like(logits) for _ in range(2)]
    torch.distributed.all_gather(parts, logits.contiguous())
    gathered = torch.cat(parts, 1)
    return {"vs_documents": (gathered - ref).abs().max().item(),
            "vs_causal": (gathered - causal.logits).abs().max().item()}  # fmt: skip


def main(out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    results = {}
    for kind in ("gpt2", "llama"):
        # pretraining rows without documents, fine-tuning rows with them (ZeRO-2, fused head); the same on ZeRO-3
        # with the plain head; DPO pairs (GPT-2 on ZeRO-2, Llama on ZeRO-3)
        for documents, learned in ((False, False), (True, True)):
            results[f"{kind} documents={documents} sft={learned} zero=2 fused"] = training_case(
                kind, documents, learned, 2, "fused"
            )
        results[f"{kind} documents=True sft=True zero=3 plain"] = training_case(kind, True, True, 3, "plain")
        results[f"{kind} documents=True sft=False zero=3 plain reduce_scatter=false"] = training_case(
            kind, True, False, 3, "plain", NO_REDUCE_SCATTER[kind]
        )
        if kind == "gpt2":
            results["gpt2 dpo zero=2"] = preference_case(kind, 2)
        else:  # (every gradient reduce-scattered: apart, not in buckets)
            results["llama dpo zero=3 reduce_scatter=false contiguous_gradients=false"] = preference_case(
                kind, 3, {"reduce_scatter": False, "contiguous_gradients": False}
            )
    from tests import flash_standin

    flash_standin.install()
    for kind, attention in [("gpt2", "sdpa"), ("llama", "sdpa"), ("llama", "flash_attention_2")]:
        # (the core attention is the same for every model; transformers' flash path looks for an nn.Linear to learn
        # an fp32 model's dtype, which GPT-2 lacks. Flex attention compiles its kernel on first use, half a minute
        # on this CPU: its BlockMask is checked against the dense mask in the test itself)
        results[f"{kind} logits {attention}"] = logits_case(kind, attention)
    results["llama deepspeed's own"] = deepspeed_own("llama")
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results | {"flash_calls": flash_standin.CALLS}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
