"""Where eval and generate put a model's weights: one device when it holds them, else whole decoder layers spread
over the GPUs (accelerate's map, computed from an empty model; GPU memory given as numbers, no GPU needed)."""

import torch

from dist_clm.evaluation.placement import device_map_for, device_of


def empty_llama(layers=4):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from dist_clm.models.build import preset_config

    config = preset_config("tiny-llama", {"num_hidden_layers": layers}, 512)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def test_one_device_when_it_holds_the_weights_and_layers_spread_whole_when_none_does():
    model = empty_llama()
    size = sum(p.numel() for p in model.parameters()) * 2  # bf16 bytes
    assert device_map_for(model, torch.bfloat16, "cpu") == {"": "cpu"}
    assert device_map_for(model, torch.bfloat16, "cuda", {0: 4 * size, 1: 4 * size, "cpu": 0}) == {"": 0}
    assert device_map_for(model, torch.bfloat16, "cuda:1", {0: 0, 1: 4 * size, "cpu": 0}) == {"": 1}

    spread = device_map_for(model, torch.bfloat16, "cuda", {0: size, 1: size, "cpu": 10 * size})
    assert set(spread.values()) == {0, 1}, spread  # (no room on one: both GPUs, nothing on the host)
    layers = {device_of(f"model.layers.{i}.mlp.up_proj.weight", spread) for i in range(4)}
    assert layers == {0, 1}
    for name, _ in model.named_parameters():  # every weight placed, each layer whole on one GPU
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if layer is not None:
            assert device_of(name, spread) == device_of(f"model.layers.{layer}.input_layernorm.weight", spread)
