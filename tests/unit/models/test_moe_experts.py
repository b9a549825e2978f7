"""The sync-free MoE experts (models/moe_experts.py): transformers' block's outputs and gradients on the same
weights, whichever product runs them, experts without a token included; no graph break under torch.compile;
a model built with them saves weights that plain transformers loads and runs to the same logits."""

import copy

import pytest
import torch

from dist_clm.models import moe, moe_experts
from dist_clm.models.build import build_model
from tests.helpers import FakeTokenizer

SMALL = {"hidden_size": 32, "head_dim": 8, "moe_intermediate_size": 16, "intermediate_size": 64}


def transformers_block(**fields):
    """transformers' own Qwen3-MoE block (8 experts, top 2), its weights drawn at random."""
    from transformers import AutoConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = AutoConfig.for_model("qwen3_moe", num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                  hidden_size=32, moe_intermediate_size=16, **fields)  # fmt: skip
    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(config)
    for p in block.parameters():  # (transformers 5 leaves the 3-D expert weights uninitialised)
        torch.nn.init.normal_(p, std=0.2)
    return block


def output(result):
    return result[0] if isinstance(result, tuple) else result  # (transformers 4: with the router's logits)


def switched(block) -> bool:
    """Whether the block runs the sync-free experts (transformers 4: its forward; 5: its experts')."""
    return "forward" in vars(block) or "forward" in vars(block.experts)


def close(got, want, tol=1e-6):
    """Equal to fp32 rounding: the largest difference within tol x the tensor's largest value (the products and
    sums run in another order; a weight's gradient sums over all the tokens its expert received)."""
    assert (got - want).abs().max() <= tol * want.abs().max().clamp(min=1.0)


@pytest.mark.parametrize("product", ["grouped", "tiled"])
@pytest.mark.parametrize("tokens", [1, 3, 40])  # 1 and 3 tokens: experts without a token
def test_outputs_and_gradients_equal_transformers_block(product, tokens, monkeypatch):
    theirs = transformers_block()
    ours = copy.deepcopy(theirs)
    assert moe_experts.make_sync_free(ours) == 1
    if product == "tiled":
        monkeypatch.setattr(moe_experts, "_GROUPED_ON_CPU", False)
    x = torch.randn(1, tokens, 32)
    outs = []
    for block in (theirs, ours):
        inputs = x.clone().requires_grad_()
        out = output(block(inputs))
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        outs.append((out, inputs.grad))
    close(outs[1][0], outs[0][0])
    close(outs[1][1], outs[0][1])
    for (name, mine), (their_name, their) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert name == their_name and mine.shape == their.shape  # (checkpoints load either way)
        close(mine.grad, their.grad if their.grad is not None else torch.zeros_like(their))  # (None: no token)
    reached = (x @ theirs.gate.weight.T).topk(2, dim=-1).indices.unique()
    assert (len(reached) < 8) == (tokens < 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the tiled product, the grouped one
def test_a_built_moe_block_has_no_graph_break(dtype):
    with torch.device("meta"):
        model = build_model("tiny-moe", "", SMALL, FakeTokenizer(64))
    block = moe.sparse_blocks(model)[0].to_empty(device="cpu").to(dtype)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(torch.randn(2, 12, 32, dtype=dtype))
    assert explained.graph_break_count == 0, explained.break_reasons  # (transformers' loop: 2 or more)


def test_the_saved_model_loads_in_transformers_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ours = build_model("tiny-moe", "", {**SMALL, "num_hidden_layers": 1}, FakeTokenizer(64))
    ours.save_pretrained(tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert switched(ours.model.layers[0].mlp) and not switched(theirs.model.layers[0].mlp)
    ids = torch.randint(0, 64, (2, 16))
    got, want = (m(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False) for m in (ours, theirs))
    close(got.logits, want.logits)
    assert got.aux_loss.item() == pytest.approx(want.aux_loss.item(), rel=1e-6)
    assert torch.equal(got.router_logits[0], want.router_logits[0])
