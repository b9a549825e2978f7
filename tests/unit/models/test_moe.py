"""Mixture-of-Experts models (models/moe.py): presets counted by their active parameters, the router's load and
auxiliary loss as logged, router settings refused on a dense model."""

import pytest
import torch

from dist_clm.models import moe
from dist_clm.models.build import active_params, build_model, count_params
from tests.helpers import FakeTokenizer


@pytest.mark.parametrize("preset, total, active", [("moe-small", 114.6, 48.6), ("moe-1b", 1014.0, 221.3)])
def test_moe_presets_count_their_active_parameters(preset, total, active):
    with torch.device("meta"):
        model = build_model(preset, "", {}, FakeTokenizer(32000))
    assert count_params(model) / 1e6 == pytest.approx(total, rel=0.01)
    assert active_params(model) / 1e6 == pytest.approx(active, rel=0.01)
    assert moe.leaf_classes(model) == ["Qwen3MoeSparseMoeBlock"]


def test_the_router_load_is_what_the_model_routed_and_only_in_training():
    torch.manual_seed(0)
    model = build_model("tiny-moe", "", {}, FakeTokenizer(300))
    moe.apply_router_settings(model, 0.05)
    load = moe.RouterLoad(model)
    ids = torch.randint(0, 300, (2, 40))
    out = model(input_ids=ids, labels=ids, use_cache=False)  # training: the router's logits asked for
    assert len(out.router_logits) == 2 and out.aux_loss is not None
    plain = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert out.loss.item() == pytest.approx(plain.item() + 0.05 * out.aux_loss.item(), rel=1e-5)
    sums = load.take().tolist()
    assert sums[:2] == pytest.approx([out.aux_loss.item(), 1.0])
    for layer, logits in enumerate(out.router_logits):  # softmax then top-2, as the block routes
        chosen = logits.softmax(-1).topk(2, dim=-1).indices.flatten()
        assert sums[3 + layer * 8 : 3 + (layer + 1) * 8] == torch.bincount(chosen, minlength=8).tolist()
    scalars = load.scalars(sums, steps=1)
    assert scalars["moe/layer_0/tokens_max"] == max(sums[3:11]) and 0 < scalars["moe/layer_1/load_entropy"] <= 1
    model.eval()  # validation, evaluation, generation: the next-token loss alone, nothing recorded
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, use_cache=False)
    assert out.aux_loss is None and load.sums is None


def test_router_settings_on_a_dense_model_are_one_sentence():
    from dist_clm.errors import UserError

    with pytest.raises(UserError, match="model.router_aux_loss_coef' is set, but llama models have no router"):
        moe.apply_router_settings(build_model("tiny-llama", "", {}, FakeTokenizer(300)), 0.01)
