"""Which attention implementation trains, and what each one gives packed documents (models/attention.py)."""

import warnings

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


# Packed rows as (document length, first position) per document: documents across tile bounds, a row that begins
# inside a document, one document per row, documents on tile bounds, a length 128 does not divide.
LAYOUTS = {
    "across tiles": [[(100, 0), (300, 0), (5, 0), (107, 0)], [(40, 9), (400, 0), (72, 0)]],
    "one per row": [[(512, 0)], [(512, 3)]],
    "on tile bounds": [[(128, 0), (128, 0), (256, 0)], [(256, 0), (1, 0), (255, 0)]],
    "ragged length": [[(130, 0), (70, 0)], [(200, 5)]],
    "short": [[(5, 0), (11, 0), (16, 0)], [(4, 7), (20, 0), (8, 0)]],
}


def test_the_tiled_document_mask_is_create_block_masks_own():
    """document_block_mask, built from the tiles' bounds, gives flex attention exactly what torch's
    create_block_mask gives from the rule at every pair: the same partial and full tiles in the same order, so
    the kernel lets through exactly the dense same-document causal mask, and the same outputs as sdpa."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from dist_clm.models.attention import document_block_mask

    for layout in LAYOUTS.values():
        positions = torch.stack([torch.cat([torch.arange(k) + first for k, first in row]) for row in layout])
        starts = positions == 0
        starts[:, 0] = True
        rows, n = positions.shape
        for doc in (torch.zeros_like(positions), starts.cumsum(1)):  # (one per row: plain causal; documents)
            dense = (doc[:, :, None] == doc[:, None, :]) & torch.ones(n, n, dtype=torch.bool).tril()

            def same_document(b, h, q, kv, doc=doc):
                return (q >= kv) & (doc[b, q] == doc[b, kv])

            reference = create_block_mask(same_document, rows, None, n, n, device="cpu")
            mask = document_block_mask(doc)
            for part in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                         "q_indices", "full_q_num_blocks", "full_q_indices"):  # fmt: skip
                assert torch.equal(getattr(mask, part), getattr(reference, part)), part
            assert mask.seq_lengths == reference.seq_lengths and mask.BLOCK_SIZE == reference.BLOCK_SIZE
            assert torch.equal(mask.to_dense(), reference.to_dense())
            assert torch.equal(_let_through(mask, n), dense)
        if layout is LAYOUTS["across tiles"]:  # (each call traces the rule again: one layout's documents)
            q, k, v = torch.randn(3, rows, 2, n, 8).unbind()
            want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])
            with warnings.catch_warnings():  # (unfused on the CPU: the rule at every pair; _let_through: the tiles)
                warnings.simplefilter("ignore", UserWarning)
                got, old = (flex_attention(q, k, v, block_mask=m) for m in (mask, reference))
            assert torch.allclose(got, want, atol=1e-6, rtol=0) and torch.equal(got, old)


def _let_through(mask, n: int) -> torch.Tensor:
    """B x L x L: what flex attention's kernel attends with `mask`: every pair of a full tile (the rule is not
    evaluated there), and the pairs of a partial tile that the rule allows."""

    def tiles(count, index):
        width = index.shape[-1]
        kept = torch.where(torch.arange(width) < count[..., None], index, width).long()
        out = torch.zeros(*index.shape[:-1], width + 1, dtype=torch.bool).scatter_(-1, kept, True)[..., :width]
        size = mask.BLOCK_SIZE[0]
        return out[:, 0].repeat_interleave(size, -2).repeat_interleave(size, -1)[:, :n, :n]

    rows = mask.kv_num_blocks.shape[0]
    q, kv = torch.arange(n)[:, None].expand(n, n), torch.arange(n)[None, :].expand(n, n)
    rule = torch.stack([mask.mask_mod(torch.tensor(b), torch.tensor(0), q, kv) for b in range(rows)])
    full = tiles(mask.full_kv_num_blocks, mask.full_kv_indices)
    return full | (tiles(mask.kv_num_blocks, mask.kv_indices) & rule)
