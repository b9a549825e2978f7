import pytest
import torch

from dist_clm.errors import UserError
from dist_clm.models.build import PRESETS, build_model, count_params, flops_per_token, max_positions


class FakeTokenizer:  # only what build_model reads: its length and special ids
    def __init__(self, n):
        self.n, self.bos_token_id, self.eos_token_id = n, 0, 0

    def __len__(self):
        return self.n


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


def test_attention_choice(monkeypatch):
    from dist_clm.models.attention import attention_for

    assert attention_for("auto", document_mask=True, on_gpu=False, precision="fp32") == ["sdpa"]  # CPU: as before
    assert attention_for("auto", document_mask=False, on_gpu=True, precision="bf16") == ["sdpa"]
    assert attention_for("auto", document_mask=True, on_gpu=True, precision="bf16")[-2:] == ["flex_attention", "sdpa"]
    assert attention_for("eager", document_mask=True, on_gpu=False, precision="fp32") == ["eager"]
    with pytest.raises(UserError, match="'flex_attention', which has no backward pass on CPU"):
        attention_for("flex_attention", document_mask=True, on_gpu=False, precision="fp32")


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny"])
def test_flex_attention_masks_documents_as_sdpa_does(tokenizer_dir, preset):
    """FlexAttention's block-sparse mask from restarting positions (its forward: on CPU torch has no flex
    backward) gives the logits of the SDPA-masked model and of each document run on its own: Llama through
    transformers' own support, GPT-2 through dist_clm's switch (transformers 4.57's GPT-2 declares none)."""
    from dist_clm.data.tokenizer import load_tokenizer
    from dist_clm.models.attention import build_model_with

    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    sdpa = build_model_with(["sdpa"], preset, "", {}, tok).eval()
    flex = build_model_with(["flex_attention", "sdpa"], preset, "", {}, tok).eval()
    assert flex.config._attn_implementation == "flex_attention" and sdpa.config._attn_implementation == "sdpa"
    flex.load_state_dict(sdpa.state_dict())
    docs = ((0, 100), (100, 156), (156, 256))
    ids = torch.randint(0, len(tok), (2, 256))
    positions = torch.cat([torch.arange(e - s) for s, e in docs]).expand(2, -1)
    with torch.no_grad():
        packed = [m(input_ids=ids, position_ids=positions, use_cache=False).logits for m in (sdpa, flex)]
        alone = torch.cat([sdpa(input_ids=ids[:, s:e], use_cache=False).logits for s, e in docs], dim=1)
        causal = sdpa(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(packed[1], packed[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[1], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(causal[:, 100:], alone[:, 100:], atol=1e-3)  # (the mask does change the logits)


def test_flex_attention_is_not_taken_where_it_would_drop_attention_dropout(tokenizer_dir):
    from dist_clm.data.tokenizer import load_tokenizer
    from dist_clm.models.attention import build_model_with

    tok = load_tokenizer(tokenizer_dir)
    for preset, dropout in (("tiny", "attn_pdrop"), ("tiny-llama", "attention_dropout")):
        model = build_model_with(["flex_attention", "sdpa"], preset, "", {dropout: 0.1}, tok)
        assert model.config._attn_implementation == "sdpa"


def test_an_attention_the_machine_lacks_is_one_sentence(tokenizer_dir):
    import importlib.util

    from dist_clm.data.tokenizer import load_tokenizer
    from dist_clm.models.attention import build_model_with

    if importlib.util.find_spec("flash_attn"):
        pytest.skip("flash_attn is installed here")
    with pytest.raises(UserError, match="'model.attention' is 'flash_attention_2', which this model or machine"):
        build_model_with(["flash_attention_2"], "tiny-llama", "", {}, load_tokenizer(tokenizer_dir))


def test_rows_of_one_sequence_reach_sdpa_as_causal_without_a_materialized_mask():
    """The training step gives rows without document masking an all-ones padding mask: transformers then lets
    sdpa attend with is_causal (its fused kernels) instead of a B x 1 x L x L mask it would build otherwise."""
    from types import SimpleNamespace

    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from dist_clm.parallel.sequence_parallel import SequenceParallel
    from dist_clm.training.step import model_inputs

    model = build_model("tiny-llama", "", {}, FakeTokenizer(300))
    run = SimpleNamespace(
        env=SimpleNamespace(device="cpu"), engine=SimpleNamespace(module=model), sp=SequenceParallel()
    )
    ids = torch.randint(0, 300, (2, 16))
    inputs = model_inputs(run, {"input_ids": ids, "labels": ids})
    masks, sdpa = [], ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, q, k, v, mask, *args, **kwargs):
        masks.append(mask)
        return sdpa(module, q, k, v, mask, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = spy
    try:
        model(**inputs, use_cache=False)
        assert masks and all(m is None for m in masks)
        masks.clear()
        model(input_ids=ids, labels=ids, use_cache=False)  # (what transformers 4.57 does without it)
        assert all(m is not None for m in masks) or transformers_version() >= 5
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa
    with_documents = model_inputs(
        run, {"input_ids": ids, "labels": ids, "position_ids": torch.arange(16).expand(2, 16)}
    )
    assert "attention_mask" not in with_documents  # (packed rows keep their document mask)


def transformers_version() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])
