"""Tensor parallelism's settings (parallel/tensor_parallel.py, parallel/fit.py): what DeepSpeed is told, which
models and layouts it refuses in one sentence, the families it names, and how a checkpoint's shards join."""

import pytest
import torch

from dist_clm.config import ConfigError, DistributedConfig, load_config
from dist_clm.errors import UserError
from dist_clm.models.build import PRESETS, TENSOR_PARALLEL_FAMILIES, Shape, model_shape
from dist_clm.parallel.engine import deepspeed_config
from dist_clm.parallel.fit import check_tensor_parallel, check_tensor_parallel_nodes, check_world


def test_deepspeed_gets_autotp_and_the_data_parallel_ranks_are_the_groups():
    cfg = load_config(None, ["distributed.tensor_parallel_size=2", "train.global_batch_size=8",
                             "train.micro_batch_size=2"])  # fmt: skip
    d = cfg.distributed
    assert d.ranks_per_batch == 2
    ds = deepspeed_config(cfg.train, cfg.optim, d, on_gpu=False, grad_accum=2)
    assert ds["tensor_parallel"] == {"autotp_size": 2}
    assert "tensor_parallel" not in deepspeed_config(cfg.train, cfg.optim, DistributedConfig(), on_gpu=False)
    check_world(d, 4)
    with pytest.raises(UserError, match="'distributed.tensor_parallel_size' is 2, which does not divide the 3 ranks"):
        check_world(d, 3)


def test_what_tensor_parallelism_cannot_split_is_one_sentence():
    llama = model_shape("tiny-llama", "", {})
    check_tensor_parallel(llama, 2)
    check_tensor_parallel(model_shape("tiny-qwen3", "", {}), 2)
    check_tensor_parallel(model_shape("tiny", "", {}), 1)  # (size 1: anything)
    with pytest.raises(UserError, match="AutoTP shards llama, mistral, qwen2, qwen3 models, not gpt2"):
        check_tensor_parallel(model_shape("tiny", "", {}), 2)
    with pytest.raises(UserError, match="leaves a Mixture-of-Experts model's experts whole"):
        check_tensor_parallel(model_shape("tiny-moe", "", {}), 2)
    with pytest.raises(UserError, match="does not divide the model's 2 key/value heads"):
        check_tensor_parallel(llama, 4)
    with pytest.raises(UserError, match="does not divide the model's 6 attention heads"):
        check_tensor_parallel(Shape("llama", 6, 6, 512), 4)
    check_tensor_parallel(Shape("llama", 4, 2, 512, vocab=513), 2)  # (a vocabulary is split unevenly, exactly)


def test_a_group_spans_one_node_unless_asked():
    table = [{"rank": r, "node": f"n{r // 2}"} for r in range(4)]  # 2 ranks per node
    check_tensor_parallel_nodes(2, table, across=False)
    with pytest.raises(UserError, match=r"ranks 0-3 form a tensor-parallel group, but they run on 2 nodes \(n0, n1\)"):
        check_tensor_parallel_nodes(4, table, across=False)
    check_tensor_parallel_nodes(4, table, across=True)


def test_tensor_and_sequence_parallelism_and_muon_are_refused_in_one_sentence():
    with pytest.raises(ConfigError, match="AutoTP builds a mesh of data and tensor parallelism only"):
        load_config(None, ["distributed.tensor_parallel_size=2", "distributed.sequence_parallel_size=2"])
    with pytest.raises(ConfigError, match="tensor_parallel_size' must be 1 \\(off\\) or more"):
        load_config(None, ["distributed.tensor_parallel_size=0"])
    cfg = load_config(None, ["distributed.tensor_parallel_size=2", "train.optimizer=muon", "distributed.zero_stage=2",
                             "optim.grad_clip=0"])  # fmt: skip
    with pytest.raises(UserError, match="orthogonalizes each matrix whole, but tensor parallelism"):
        deepspeed_config(cfg.train, cfg.optim, cfg.distributed, on_gpu=False)


def test_the_families_named_carry_a_tensor_parallel_plan_and_gpt2_none():
    from transformers import AutoConfig

    for family in TENSOR_PARALLEL_FAMILIES:
        assert AutoConfig.for_model(family).base_model_tp_plan, family
    assert not getattr(AutoConfig.for_model("gpt2"), "base_model_tp_plan", None)
    assert PRESETS["tiny-qwen3"]["model_type"] == "qwen3"


def test_shards_join_as_autotp_split_them():
    from dist_clm.evaluation.shards import Joined

    whole = torch.arange(5 * 6.0).view(5, 6)
    columns = [whole[:3], whole[3:]]  # (an uneven split: 3 + 2 output rows)
    assert torch.equal(Joined(columns, "columns", None).join(columns), whole)
    assert Joined(columns, "columns", None).shape == (5, 6)
    rows = [whole[:, :3], whole[:, 3:]]
    assert Joined(rows, "rows", None).shape == (5, 6) and torch.equal(Joined(rows, "rows", None).join(rows), whole)
    vocab = [whole[:3], whole[3:]]
    assert torch.equal(Joined(vocab, "vocabulary", 4).join(vocab), whole[:4])  # (padding rows beyond the vocabulary)
    same = [whole, whole.clone()]
    assert torch.equal(Joined(same, "replicated", None).join(same), whole)


def test_preflight_refuses_gpt2_before_the_group_forms():
    from dist_clm.training.preflight import preflight

    cfg = load_config(None, ["model.preset=tiny", "distributed.tensor_parallel_size=2"])
    with pytest.raises(UserError, match="AutoTP shards llama, mistral, qwen2, qwen3 models, not gpt2"):
        preflight(cfg, 2, one_node=False)


def test_the_memory_check_counts_a_group_as_one_data_parallel_rank():
    """The plan `train` checks before it starts resolves the batch over the data-parallel ranks: 2 ranks of one
    tensor-parallel group are one, so a global batch of one micro batch per step fits."""
    from dist_clm.training.preflight import preflight

    cfg = load_config(None, ["model.preset=tiny-llama", "model.overrides.vocab_size=512", "train.micro_batch_size=8",
                             "train.global_batch_size=8", "distributed.tensor_parallel_size=2"])  # fmt: skip
    preflight(cfg, 2, one_node=False, plan_check=True)
