"""FlexAttention's document mask in a compiled kernel (inductor builds it with the C compiler): its logits are
SDPA's with the dense mask, for GPT-2 and Llama."""

import pytest
import torch


@pytest.mark.slow  # inductor compiles a kernel per model (~25 s on 2 cores)
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
