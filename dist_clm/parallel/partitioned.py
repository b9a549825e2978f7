"""A model built and loaded in pieces under ZeRO-3, never whole on any rank, starting from the same weights
whatever the ZeRO stage or the number of ranks.

Under ZeRO-3 transformers builds a preset (`from_config`) and loads a pretrained directory (`from_pretrained`,
one safetensors shard at a time) inside `deepspeed.zero.Init` when it finds a live `HfDeepSpeedConfig`: each
module's parameters are partitioned over the ranks as soon as that module is built, in the run's precision, so a
rank holds its share of the model plus one module at a time (DeepSpeed's engine then skips its whole-model
`.to(device)`). That is the library's own way, used here as is.

What it does not give is the initial weights of a plain build. transformers initializes a fresh model in
`post_init` through its own module walk (not `nn.Module.apply`, which `zero.Init` wraps to gather), so under
ZeRO-3 its initialization writes into empty partitions and the model keeps the constructors' defaults (an N(0, 1)
embedding table instead of N(0, 0.02)). `initialize(model, seed)` runs transformers' initialization again on
every build, from the run's seed, one module at a time, gathering a partitioned module's parameters (and its
children's) for it:
the same draws in the same order on a whole fp32 model and on a partitioned one, so the weights are equal
across stages and rank counts (drawn in fp32 and rounded once, as DeepSpeed rounds a whole model's).

Parameters under `zero.Init` report an empty 1-D tensor: `shape` here (and models.build.param_numel) give the
real ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def shape(p: torch.nn.Parameter) -> torch.Size:
    """A parameter's shape, partitioned (ZeRO-3's ds_shape) or not."""
    return getattr(p, "ds_shape", None) or p.shape


def is_partitioned(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def construction(ds_config: dict) -> Iterator[None]:
    """Around building or loading the model: under ZeRO-3 (`ds_config`'s stage 3) transformers builds and loads
    it inside deepspeed.zero.Init, partitioned as it goes; otherwise nothing changes. The batch size is left for
    DeepSpeed to derive (under sequence parallelism the data-parallel world is smaller than the world this
    context sees; the engine checks it with its groups)."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    live = HfDeepSpeedConfig({k: v for k, v in ds_config.items() if k != "train_batch_size"})
    try:
        yield
    finally:
        del live  # (transformers holds it weakly: other models of this process build whole again)


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """`params` whole inside the block (DeepSpeed's GatheredParameters) where ZeRO-3 partitions them; with
    `modifier_rank`, that rank's changes reach every rank's partition at the end."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


@torch.no_grad()
def initialize(model, seed: int) -> None:
    """transformers' initialization of a fresh `model` again, from `seed`, module by module in the order of its
    own walk (children first, each sub-model with its own `_init_weights`), each module's parameters gathered
    where partitioned and drawn in fp32."""
    from transformers import PreTrainedModel

    torch.manual_seed(seed)
    for module, owner in _walk(model, model, PreTrainedModel):
        # its own parameters and its children's: some families initialize a child's weight from the parent
        # (GPT-2 scales each block's c_proj.weight from its attention and MLP modules), none reaches deeper
        params = list({id(p): p for m in (module, *module.children()) for p in m.parameters(recurse=False)}.values())
        with gathered(params, modifier_rank=0):
            kept = [p.data for p in params]
            for p in params:
                p.data = p.data.float()
                if hasattr(p, "_is_hf_initialized"):  # (transformers 5 skips tensors it marks as initialized)
                    p._is_hf_initialized = False
            module._is_hf_initialized = False
            owner._init_weights(module)
            module._is_hf_initialized = True
            for p, data in zip(params, kept, strict=True):
                if p.data is not data:
                    data.copy_(p.data)  # (rounded once to the run's precision)
                    p.data = data


def _walk(module, owner, pretrained_class):
    """(module, the PreTrainedModel whose `_init_weights` applies to it), children before their parent."""
    for child in module.children():
        yield from _walk(child, child if isinstance(child, pretrained_class) else owner, pretrained_class)
    yield module, owner
