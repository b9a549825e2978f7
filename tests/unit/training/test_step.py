"""What one step gives the model (training/step.py)."""

from __future__ import annotations

import types

import pytest
import torch

from dist_clm.training import step


def fake_run(feeds_documents: bool):
    """The parts of a Run that model_inputs reads: the device, the (DeepSpeed) engine's module and its attention,
    the sequence-parallel place (none)."""
    from dist_clm.parallel.sequence_parallel import SequenceParallel

    module = torch.nn.Module()
    module.config = types.SimpleNamespace(_attn_implementation="flash_attention_2" if feeds_documents else "sdpa")
    if feeds_documents:
        module._dist_clm_feeds_documents = True  # what attention.feed_documents marks a flash model with
    return types.SimpleNamespace(env=types.SimpleNamespace(device=torch.device("cpu")),
                                 engine=types.SimpleNamespace(module=module), sp=SequenceParallel())  # fmt: skip


@pytest.mark.parametrize("document_mask, flash", [(False, False), (True, False), (True, True)])
def test_model_inputs_are_the_micro_batch_plus_flash_bounds_for_a_model_that_takes_them(document_mask, flash):
    """The model gets the micro batch's tensors unchanged (ids, labels; position ids with document masking); rows
    of one sequence for sdpa also an all-ones padding mask (attention.no_padding); a flash model (feeds_documents)
    the variable-length cuts at every document start and every row start of the B x L tokens, as int32, with L as
    the longest sequence; the batch itself is left as it was."""
    ids, positions = torch.arange(10).view(2, 5), torch.tensor([[0, 1, 2, 0, 1], [2, 3, 0, 1, 2]])  # row 1: mid-doc
    batch = {"input_ids": ids, "labels": ids + 1} | ({"position_ids": positions.clone()} if document_mask else {})
    inputs = step.model_inputs(fake_run(flash), batch)
    assert sorted(batch) == ["input_ids", "labels", *(["position_ids"] if document_mask else [])]
    assert all(torch.equal(inputs[k], v) for k, v in batch.items())
    assert not document_mask or torch.equal(batch["position_ids"], positions)
    if not flash:
        padding = {} if document_mask else {"attention_mask": torch.ones_like(ids)}
        assert sorted(inputs) == sorted([*batch, *padding])
        assert all(torch.equal(inputs[k], v) for k, v in padding.items())
        return
    cuts = torch.tensor([0, 3, 5, 7, 10], dtype=torch.int32)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert inputs[key].dtype == torch.int32 and torch.equal(inputs[key], cuts)
    assert inputs["max_length_q"] == inputs["max_length_k"] == 5
