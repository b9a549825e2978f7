"""Which attention implementation trains, and what each one gives packed documents (models/attention.py)."""

import pytest
import torch

from dist_clm.errors import UserError
from dist_clm.models.build import build_model
from tests.helpers import FakeTokenizer


def test_attention_choice(monkeypatch):
    from dist_clm.models.attention import attention_for

    assert attention_for("auto", document_mask=True, on_gpu=False, precision="fp32") == ["sdpa"]  # CPU: as before
    assert attention_for("auto", document_mask=False, on_gpu=True, precision="bf16") == ["sdpa"]
    assert attention_for("auto", document_mask=True, on_gpu=True, precision="bf16")[-2:] == ["flex_attention", "sdpa"]
    assert attention_for("eager", document_mask=True, on_gpu=False, precision="fp32") == ["eager"]
    with pytest.raises(UserError, match="'flex_attention', which has no backward pass on CPU"):
        attention_for("flex_attention", document_mask=True, on_gpu=False, precision="fp32")


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
