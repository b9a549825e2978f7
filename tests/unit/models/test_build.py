"""Presets and building (models/build.py): sizes, overrides, bad settings, rope settings."""

from __future__ import annotations

import pytest
import torch

from dist_clm.errors import UserError
from dist_clm.models.build import PRESETS, build_model, count_params, flops_per_token, max_positions
from tests.helpers import FakeTokenizer


@pytest.mark.parametrize(
    "preset, vocab, millions",
    [
        ("gpt2-124m", 50257, 124.4),
        ("gpt2-350m", 50257, 354.8),
        ("llama-468m", 32000, 468.2),
        ("llama-500m", 32000, 494.5),
        ("llama-1b", 32000, 1038.7),
        ("tiny", 4096, 0.99),
    ],
)
def test_preset_sizes(preset, vocab, millions):
    with torch.device("meta"):  # shapes only: no memory, no time
        model = build_model(preset, "", {}, FakeTokenizer(vocab))
    assert count_params(model) / 1e6 == pytest.approx(millions, rel=0.01)
    assert flops_per_token(model.config, count_params(model), 1024) > 6 * count_params(model)


def test_every_preset_builds_and_overrides_apply():
    for name in PRESETS:
        with torch.device("meta"):
            m = build_model(name, "", {}, FakeTokenizer(1000))
        assert m.config.vocab_size == 1000 and max_positions(m.config) >= 512
    m = build_model("tiny-llama", "", {"num_hidden_layers": 1}, FakeTokenizer(300))
    assert m.config.num_hidden_layers == 1 and m.config.model_type == "llama"
    ids = torch.randint(0, 300, (2, 16))
    m(input_ids=ids, labels=ids).loss.backward()  # a real forward/backward on CPU


def test_bad_model_settings(tmp_path):
    with pytest.raises(UserError, match="'model.preset' must be one of"):
        build_model("gpt5", "", {}, FakeTokenizer(10))
    with pytest.raises(UserError, match="'model.overrides.n_lyer' is not a field of the gpt2 config"):
        build_model("tiny", "", {"n_lyer": 3}, FakeTokenizer(10))
    with pytest.raises(UserError, match="is not a model directory with config.json"):
        build_model("tiny", str(tmp_path), {}, FakeTokenizer(10))


def test_rope_settings_reach_the_model_and_are_refused_without_rotary_embeddings():
    from dist_clm.errors import UserError
    from dist_clm.models.build import build_model

    m = build_model("tiny-llama", "", {}, FakeTokenizer(300), rope=(1e6, {"rope_type": "linear", "factor": 4.0}))
    params = getattr(m.config, "rope_parameters", None) or {"rope_theta": m.config.rope_theta, **m.config.rope_scaling}
    assert params["rope_theta"] == 1e6 and params["factor"] == 4.0 and params["rope_type"] == "linear"
    with pytest.raises(UserError, match="gpt2 models do not have"):
        build_model("tiny", "", {}, FakeTokenizer(300), rope=(1e6, {}))
    with pytest.raises(UserError, match="is not valid"):
        build_model("tiny-llama", "", {}, FakeTokenizer(300), rope=(0.0, {"rope_type": "linear"}))  # (no factor)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_attention_heads": 8}, {"n_head": 2, "n_positions": 1024}, {"max_position_embeddings": 4096},
     {"num_key_value_heads": 1, "vocab_size": 77}],
)  # fmt: skip
def test_the_shape_read_before_the_model_is_the_models(overrides, tmp_path):
    """model_shape (read as data, without transformers' config classes) agrees with the built config: for every
    preset, with overrides under either of a field's names, and from a saved model's config.json."""
    from dist_clm.models.build import Shape, model_shape, preset_config

    checked = 0
    for name in PRESETS:
        try:
            config = preset_config(name, overrides, 1000)
        except UserError:
            continue  # (an override this family does not have)
        checked += 1
        light = model_shape(name, "", overrides)
        assert light is not None and light.model_type == config.model_type, name
        real = Shape.of(config)
        assert (light.heads, light.kv_heads, light.positions) == (real.heads, real.kv_heads, real.positions), name
        assert light.vocab == overrides.get("vocab_size"), name  # (None: the tokenizer's size)
        config.save_pretrained(tmp_path / name)
        assert model_shape("", str(tmp_path / name), {}) == real, name
    assert checked >= 3
    with pytest.raises(UserError, match="model.pretrained '/nowhere' is not a model directory"):
        model_shape("", "/nowhere", {})
    with pytest.raises(UserError, match="'model.preset' must be one of"):
        model_shape("huge", "", {})
