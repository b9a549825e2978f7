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
