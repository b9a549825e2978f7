"""Where an inference model's weights go (eval, generate, downstream tasks): all on one device when it holds them
(the CPU always does), else spread over the visible GPUs, whole decoder layers per GPU, with what is left on the
CPU. The map is accelerate's big-model placement (`infer_auto_device_map` over `get_balanced_memory`), the one
transformers' `device_map="auto"` uses; computed here from an empty (meta) model so that a checkpoint's weights
can be placed one tensor at a time as they are consolidated."""

from __future__ import annotations

import torch

HEADROOM = 0.85  # of a GPU's free memory for the weights: the rest for activations, the key/value cache, logits


def device_map_for(model, dtype: torch.dtype, device: str, max_memory: dict | None = None) -> dict:
    """{module name: device} for `model` (its parameters may be on the meta device) in `dtype`: {"": device} when
    `device` is the CPU or a GPU with room for the weights; else accelerate's balanced map over the GPUs in
    `max_memory` (default: what each visible GPU and the host have free now)."""
    if not device.startswith("cuda"):
        return {"": device}
    from accelerate.utils import compute_module_sizes, get_balanced_memory, get_max_memory, infer_auto_device_map

    max_memory = dict(max_memory or get_max_memory())
    gpu = torch.device(device).index or 0
    if compute_module_sizes(model, dtype=dtype)[""] <= HEADROOM * max_memory.get(gpu, 0):
        return {"": gpu}
    gpus = {k: int(HEADROOM * v) for k, v in max_memory.items() if k != "cpu"}
    whole = getattr(model, "_no_split_modules", None) or []  # (a decoder layer is never cut between devices)
    balanced = get_balanced_memory(model, max_memory={**gpus, "cpu": max_memory.get("cpu", 0)},
                                   no_split_module_classes=whole, dtype=dtype)  # fmt: skip
    return infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=whole, dtype=dtype)


def device_of(name: str, device_map: dict):
    """The device of parameter or buffer `name` under `device_map` (its longest matching module prefix)."""
    while True:
        if name in device_map:
            return device_map[name]
        if not name:
            raise KeyError(f"no device for {name!r} in the device map")
        name = name.rpartition(".")[0]


def input_device(model) -> torch.device:
    """Where a model's inputs go: the device of its input embeddings (the first of a model spread over devices)."""
    return model.get_input_embeddings().weight.device
