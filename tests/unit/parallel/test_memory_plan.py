"""The memory plan (parallel/memory_plan.py): its parameter counts against real and meta-device builds, its model
states against DeepSpeed's own estimators, the defaults it copies against the libraries', the levers and the
refusal, and the configs at real size."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from dist_clm.config import load_config
from dist_clm.errors import UserError
from dist_clm.models.build import PRESETS, active_params, build_model, count_params, preset_config
from dist_clm.parallel import memory_plan as mp

REPO = Path(__file__).resolve().parents[3]
README = REPO / "README.md"
GIB = 2**30

# Llama-3-70B's config.json, the fields that shape it
LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
             "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
             "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-05,
             "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001}  # fmt: skip


def meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def largest_module(model) -> int:
    """DeepSpeed's model_to_params' largest layer (its own function reads data pointers, all 0 on meta)."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


class Tok:
    def __init__(self, n: int):
        self.n, self.bos_token_id, self.eos_token_id = n, 0, 1

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama", "tiny-moe"])
def test_counts_equal_a_real_build(preset):
    """The analytic counts equal count_params / active_params of the model dist_clm builds (MoE experts switched
    to the sync-free forward included)."""
    model = build_model(preset, "", {}, Tok(1000))
    size = mp.model_size(mp.model_fields(preset, "", {}, 1000))
    assert (size.total, size.active) == (count_params(model), active_params(model))
    assert size.largest_module == largest_module(model)


def test_counts_equal_meta_builds_of_every_preset_and_family():
    """Every preset at full size, and Mistral / Qwen2 / Qwen3 configs (biases, q/k norms, head_dim), on the meta
    device: total, active and the largest module exact."""
    from transformers import AutoConfig

    cases = [(preset_config(name, {}, 32000, 0, 1), mp.model_fields(name, "", {}, 32000)) for name in PRESETS]
    for kind, extra in [("mistral", {}), ("qwen2", {}), ("qwen3", {"head_dim": 48}),
                        ("llama", {"attention_bias": True, "mlp_bias": True}), ("gpt2", {"n_inner": 200})]:  # fmt: skip
        shape = (dict(n_layer=2, n_head=4, n_embd=64) if kind == "gpt2" else
                 dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                      intermediate_size=96))  # fmt: skip
        fields = {"model_type": kind, "vocab_size": 500, **shape, **extra}
        cases.append((AutoConfig.for_model(kind, **{k: v for k, v in fields.items() if k != "model_type"}),
                      {**mp.FAMILY_DEFAULTS[kind], **fields}))  # fmt: skip
    for config, fields in cases:
        model, size = meta_model(config), mp.model_size(fields)
        assert (size.total, size.active, size.largest_module) == (
            count_params(model), active_params(model), largest_module(model)), config.model_type  # fmt: skip


def test_family_defaults_are_transformers_own():
    from transformers import AutoConfig

    for kind, defaults in mp.FAMILY_DEFAULTS.items():
        config = AutoConfig.for_model(kind)
        assert {key: getattr(config, key) for key in defaults} == defaults, kind


def test_zero_defaults_are_deepspeeds_own():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    z = DeepSpeedZeroConfig()
    ours = (z.reduce_bucket_size, z.prefetch_bucket_size, z.max_live_parameters, z.contiguous_gradients)
    assert ours == tuple(mp.ZERO_DEFAULTS.values())


def gpus(world: int, per_node: int = 8) -> mp.Machine:
    return mp.Machine(world, max(1, world // per_node), 80 * GIB, 2**40, on_gpu=True, gpu="H100", peak_tflops=989.0)


def states(preset: str, world: int, per_node: int, *overrides: str, vocab: int = 32000) -> tuple[int, mp.ModelSize]:
    cfg = load_config(None, ["train.precision=bf16", *overrides])
    size = mp.size_of_run(cfg.replace(model={"preset": preset}), vocab)
    plan = mp.plan(cfg.replace(model={"preset": preset}), size, gpus(world, per_node), levers=False)
    return plan.model_states, size


@pytest.mark.parametrize("preset,world,per_node", [("llama-1b", 8, 8), ("gpt2-350m", 16, 8), ("moe-small", 2, 2),
                                                   ("llama-8b", 64, 8)])  # fmt: skip
def test_model_states_equal_deepspeeds_estimators(preset, world, per_node):
    """Parameters + gradients + optimizer state per GPU: DeepSpeed's ZeRO-2 estimator, and its ZeRO-3 ones (all
    cold, from the counts; all live, from a built model), with and without CPU offload. (ZeRO-1 keeps whole
    16-bit gradients, which the ZeRO-2 estimator leaves out; ZeRO-3's gathered unit is the largest module here.)"""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    nodes = world // per_node
    ours, size = states(preset, world, per_node, "distributed.zero_stage=2")
    assert ours == pytest.approx(estimate_zero2_model_states_mem_needs(size.total, per_node, nodes, False)[1], abs=8)
    ours, _ = states(preset, world, per_node, "distributed.zero_stage=2", "distributed.offload_optimizer=true")
    assert ours == estimate_zero2_model_states_mem_needs(size.total, per_node, nodes, True)[1]
    if size.experts:  # (ZeRO-3 gathers a whole MoE block, more than DeepSpeed's largest module)
        return
    for offload, off_params, settings in [(False, False, []), (True, False, ["distributed.offload_optimizer=true"]),
                                          (True, True, ["distributed.offload_optimizer=true",
                                                        "distributed.offload_params=true"])]:  # fmt: skip
        ours, _ = states(preset, world, per_node, "distributed.zero_stage=3", *settings)
        theirs = estimate_zero3_model_states_mem_needs(size.total, size.largest_module, per_node, nodes, offload,
                                                       off_params, zero_init=True)[1]  # fmt: skip
        assert ours == pytest.approx(theirs, abs=8), settings


def test_model_states_equal_the_all_live_estimator_of_a_built_model(capsys):
    """DeepSpeed's estimator that reads a real model (its counts from the module tree) prints the same figure."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_live

    model = build_model("tiny-llama", "", {}, Tok(1000))
    estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=2, num_nodes=1)
    ours, _ = states("tiny-llama", 2, 2, "distributed.zero_stage=3", vocab=1000)
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if "offload_param=none, offload_optimizer=none" in line)
    assert float(row.split("GB")[0].split("|")[-1]) == pytest.approx(ours / 2**30, abs=0.01), printed


def test_a_run_that_does_not_fit_names_what_would():
    """llama-1b on one 16 GB GPU: the levers that alone make it fit, each tested by planning it; the refusal names
    the biggest term and the first lever; the same run on 8 GPUs fits."""
    cfg = load_config(REPO / "configs/llama-1b.yaml", ["distributed.zero_stage=2"])
    size = mp.size_of_run(cfg, 32000)
    small = mp.Machine(1, 1, 16 * 10**9, 2**40, on_gpu=True, gpu="A100", peak_tflops=312.0)
    plan = mp.plan(cfg, size, small)
    assert not plan.fits and plan.levers
    for lever in plan.levers:
        overrides, flags = [w for w in lever.split() if "=" in w], [w for w in lever.split() if w.startswith("--")]
        fixed = load_config(REPO / "configs/llama-1b.yaml", ["distributed.zero_stage=2", *overrides])
        machine = small
        if flags:  # (--gpus N --nodes M: more of the same GPUs)
            machine = mp.Machine(int(lever.split("--gpus ")[1].split()[0]), 1, small.device_bytes, 2**40, True)
        assert mp.plan(fixed, size, machine, levers=False).fits, lever
    sentence = mp.refusal(plan)
    assert "optimizer state" in sentence and plan.levers[0] in sentence and "--no-plan-check" in sentence
    assert mp.plan(cfg, size, gpus(8)).fits


def test_the_real_size_configs_plan_from_their_files(tmp_path):
    """configs/llama-8b.yaml (a preset) and configs/llama-70b-continued.yaml (a pretrained directory's config.json
    alone): the plan's count equals the model built on the meta device at full size, and both fit 80 GB GPUs."""
    from transformers import AutoConfig

    cfg8 = load_config(REPO / "configs/llama-8b.yaml", [])
    size8 = mp.size_of_run(cfg8, None)
    assert size8.total == count_params(meta_model(preset_config("llama-8b", cfg8.model.overrides, 128256))) == (
        8_030_261_248)  # fmt: skip
    h100s = mp.Machine(8, 1, mp.GPU_MEMORY["H100"], 10**12, on_gpu=True, gpu="H100", peak_tflops=989.0)
    plan8 = mp.plan(cfg8, size8, h100s)
    assert plan8.fits and mp.render(plan8) in README.read_text()  # (the README shows this plan)
    tp8 = load_config(
        REPO / "configs/llama-8b.yaml", ["distributed.tensor_parallel_size=8", "distributed.zero_stage=1"]
    )
    plan_tp = mp.plan(tp8, size8, h100s)  # (and this one: the alternative the config's comments describe)
    assert plan_tp.fits and "ZeRO-1, TP 8" in mp.render(plan_tp) and mp.render(plan_tp) in README.read_text()
    assert plan_tp.params < plan8.params / 5 and plan_tp.activations < plan8.activations

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    cfg70 = load_config(REPO / "configs/llama-70b-continued.yaml", [f"model.pretrained={tmp_path}"])
    size70 = mp.size_of_run(cfg70, None)
    assert size70.total == count_params(meta_model(AutoConfig.from_pretrained(tmp_path))) == 70_553_706_496
    plan = mp.plan(cfg70, size70, dataclasses.replace(h100s, world=64, nodes=8))
    assert plan.fits and plan.device_peak < 80 * 10**9 * mp.DEVICE_MARGIN and mp.render(plan) in README.read_text()
    assert plan.params < 5 * GIB  # (ZeRO-3: a share of the parameters and one gathered module per rank)


def test_the_plan_needs_the_vocabulary_and_a_known_family(tmp_path):
    with pytest.raises(UserError, match="needs the vocabulary"):
        mp.model_fields("tiny", "", {}, None)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "vocab_size": 10}))
    with pytest.raises(UserError, match="not mamba"):
        mp.model_fields("", str(tmp_path), {}, None)


# AutoTP's split of a Llama/Qwen3 model (transformers' plans): parameter name -> the dimension it splits
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # output rows, weights and biases
ROW = ("o_proj", "down_proj")  # input columns, weights only (their biases are added after the all-reduce)


def tensor_parallel_rank(model, tp: int) -> tuple[int, int]:
    """(split, replicated) parameters the first rank of a group of `tp` holds, from the built model's shapes:
    each split dimension over the group (the first ranks one more where it does not divide), an untied head by
    vocabulary rows, everything else whole."""
    split = whole = 0
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for name, p in model.named_parameters():
        shape, dim = list(p.shape), None
        if any(f".{key}." in name for key in COLUMN) or (name.startswith("lm_head.") and not tied):
            dim = 0
        elif any(f".{key}.weight" in name for key in ROW):
            dim = 1
        if dim is None:
            whole += p.numel()
            continue
        shape[dim] = -(-shape[dim] // tp)
        split += int(torch.Size(shape).numel())
    return split, whole


@pytest.mark.parametrize("preset,overrides,vocab", [
    ("tiny-llama", {}, 1000), ("tiny-qwen3", {}, 1000),
    ("tiny-llama", {"tie_word_embeddings": True, "intermediate_size": 343}, 1000),
    ("tiny-llama", {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}, 1001)])  # fmt: skip
def test_a_tensor_parallel_rank_holds_what_the_models_shapes_say(preset, overrides, vocab):
    """The parameters a rank of a tensor-parallel group holds (its shard of q/k/v/o, the MLP and an untied head;
    embeddings, norms, a tied head, the row projections' biases whole), counted from a built model's modules, equal
    the plan's per-rank parameter bytes at ZeRO-1, and at ZeRO-3 (less one gathered unit) the shard over the
    data-parallel ranks and the replicated parameters over all of them. (MLP width 343 and vocabulary 1001: split
    unevenly, the first rank's shard is the larger.)"""
    model = build_model(preset, "", overrides, Tok(vocab))
    world = 8
    for tp in [tp for tp in (1, 2, 4) if model.config.num_key_value_heads % tp == 0]:
        split, whole = tensor_parallel_rank(model, tp)
        args = [f"model.preset={preset}", "train.precision=bf16", f"distributed.tensor_parallel_size={tp}"]
        args += [f"model.overrides.{k}={str(v).lower()}" for k, v in overrides.items()]
        cfg1 = load_config(None, [*args, "distributed.zero_stage=1"])
        size = mp.size_of_run(cfg1, vocab)
        assert (size.total, mp.held(size, tp)) == (count_params(model), (split, whole)), tp
        assert mp.plan(cfg1, size, gpus(world), levers=False).params == 2 * (split + whole)
        cfg3 = load_config(None, [*args, "distributed.zero_stage=3"])
        plan3 = mp.plan(cfg3, size, gpus(world), levers=False)
        assert plan3.params - 2 * mp.gathered_unit(cfg3, size) == (2 * split * tp + 2 * whole) // world


def plan_at(tp: int, *overrides: str, preset: str = "llama-8b", world: int = 8, vocab: int = 128256) -> mp.MemoryPlan:
    cfg = load_config(None, [f"model.preset={preset}", "train.precision=bf16", f"distributed.tensor_parallel_size={tp}",
                             "data.block_size=4096", "train.micro_batch_size=1", *overrides])  # fmt: skip
    return mp.plan(cfg, mp.size_of_run(cfg, vocab), gpus(world), levers=False)


def test_model_states_per_rank_follow_the_tensor_parallel_split():
    """Llama-8B on 8 GPUs at tensor-parallel sizes 1, 2, 4: the split matrices at 1/TP on each rank, the
    embedding table and norms whole; ZeRO-1 partitions the fp32 states over the world / TP data-parallel ranks,
    ZeRO-3 the split matrices' over those and the replicated parameters' over the whole world."""
    d, layers, vocab = 4096, 32, 128256
    replicated = vocab * d + (2 * layers + 1) * d  # the input embedding, the norms
    total = 8_030_261_248
    split = total - replicated
    for tp in (1, 2, 4):
        dp = 8 // tp
        z1 = plan_at(tp, "distributed.zero_stage=1")
        assert z1.params == 2 * (split // tp + replicated)
        assert z1.grads == 2 * (split // tp + replicated) + 4 * (split // tp + replicated) // dp
        assert z1.optimizer == 12 * (split // tp + replicated) // dp
        z3 = plan_at(tp, "distributed.zero_stage=3")
        partition = (split + replicated) // 8  # (split / tp over dp: split / world)
        assert z3.optimizer == 12 * partition and z3.params == 2 * partition + 2 * vocab * d
    one, eight = plan_at(1, "distributed.zero_stage=1"), plan_at(8, "distributed.zero_stage=1")
    assert one.model_states == 6 * total and eight.model_states == 20 * (split // 8 + replicated)  # (one dp rank)


def test_the_inner_activations_and_the_fused_head_fall_with_tensor_parallelism():
    """Attention's q/k/v/context and the MLP's products split over the group, the hidden-width tensors do not:
    each doubling of TP takes half of what the previous took off. The fused head works on V/TP columns; the plain
    head gathers the whole logits on every rank (plus its shard's)."""
    act = {tp: plan_at(tp, "train.activation_checkpointing=false").activations for tp in (1, 2, 4)}
    tokens, hidden = 4096, 4 * 4096 * 32 * 2  # elements per token of the four hidden-width tensors, bytes
    assert act[1] > act[2] > act[4] > tokens * hidden
    assert act[1] - act[2] == 2 * (act[2] - act[4])
    assert act[4] - tokens * hidden == (act[1] - tokens * hidden) // 4
    plain = {tp: plan_at(tp, "train.loss_head=plain").loss_head for tp in (1, 2)}
    assert plain[2] == plain[1] + tokens * 128256 // 2 * 2
    small = {tp: plan_at(tp, "train.loss_head=fused", "data.block_size=64", "model.overrides.num_key_value_heads=4",
                         preset="tiny-llama", world=4,
                         vocab=1000).loss_head for tp in (1, 2, 4)}  # fmt: skip
    assert small[1] > small[2] > small[4]  # (the whole shard in one chunk: the vocabulary columns per rank)


def test_tensor_parallelism_keeps_the_global_batch_in_sequences():
    """A global batch in sequences: the accumulation is resolved over world / TP data-parallel ranks, so the
    tokens per step do not change with TP; with train.grad_accum the batch is micro x accumulation x dp."""
    with_global = [plan_at(tp, "train.global_batch_size=64").tokens_per_step for tp in (1, 2, 8)]
    assert with_global == [64 * 4096] * 3
    assert plan_at(2, "train.grad_accum=4").tokens_per_step == 1 * 4 * 4 * 4096


def test_the_tensor_parallel_lever_makes_a_run_fit():
    """Llama-8B at ZeRO-1 on 8 GPUs of 48 GB: too much; a tensor-parallel size that divides the node's GPUs and
    the heads makes it fit, offered after ZeRO-3 and activation checkpointing, with the accumulation that keeps
    the batch; never for a model AutoTP cannot split, nor beyond the GPUs of a node, nor under Muon."""
    cfg = load_config(REPO / "configs/llama-8b.yaml", ["distributed.zero_stage=1"])
    size = mp.size_of_run(cfg, None)
    small = mp.Machine(8, 1, 48 * 10**9, 2**40, on_gpu=True, gpu="L40S")
    plan = mp.plan(cfg, size, small)
    assert not plan.fits
    lever = "distributed.tensor_parallel_size=2 train.grad_accum=16"
    assert lever in plan.levers
    fixed = load_config(REPO / "configs/llama-8b.yaml", ["distributed.zero_stage=1", *lever.split()])
    assert mp.plan(fixed, size, small, levers=False).fits
    assert mp.plan(fixed, size, small).tokens_per_step == plan.tokens_per_step
    bare = cfg.replace(train={"activation_checkpointing": False})
    order = [override.split("=")[0] for override, _ in mp.candidate_levers(bare, size, small)]
    assert order[:3] == ["distributed.zero_stage", "train.activation_checkpointing", "distributed.tensor_parallel_size"]
    gpt = load_config(None, ["model.preset=gpt2-350m"])
    assert not any("tensor_parallel" in o for o, _ in mp.candidate_levers(gpt, mp.size_of_run(gpt, 50257), small))
    one_per_node = dataclasses.replace(small, nodes=8)
    assert not any("tensor_parallel" in o for o, _ in mp.candidate_levers(cfg, size, one_per_node))
    muon = cfg.replace(train={"optimizer": "muon"})  # (Muon orthogonalizes whole matrices: train refuses it with TP)
    assert not any("tensor_parallel" in o for o, _ in mp.candidate_levers(muon, size, small))


def test_the_plan_refuses_what_autotp_cannot_split():
    for overrides, match in [(["model.preset=gpt2-350m"], "not gpt2"), (["model.preset=moe-small"], "Experts"),
                             (["model.preset=llama-8b"], "key/value heads")]:  # fmt: skip
        tp = 16 if "llama-8b" in overrides[0] else 2
        cfg = load_config(None, [*overrides, f"distributed.tensor_parallel_size={tp}"])
        with pytest.raises(UserError, match=match):
            mp.plan(cfg, mp.size_of_run(cfg, 32000), gpus(16, 16))
