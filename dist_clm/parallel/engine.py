"""What the run's settings mean for DeepSpeed: its config, the learning-rate schedule, the parameter groups.

Precedence of the DeepSpeed config, lowest first: what dist_clm generates from the `train`, `optim` and
`distributed` sections -> the user's JSON file (`distributed.deepspeed_config`), merged key by key -> the batch
keys, which only `train.*` may set (the loader must agree with them; a file that sets them differently is
refused). Sequence and tensor parallelism are `distributed.sequence_parallel_size` and `tensor_parallel_size` (the
loader must feed their groups), never the file's. The result is written to RUN/ds_config.json.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

from dist_clm.config import DistributedConfig, OptimConfig, TrainConfig
from dist_clm.errors import UserError

BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
# DeepSpeed keys that split the model over ranks; their ranks need the same batch, which only dist_clm's own
# settings arrange with the loader, so a value above 1 in the user's file is refused, naming the setting
MODEL_PARALLEL_KEYS = {
    ("sequence_parallel_size",): "distributed.sequence_parallel_size",
    ("tensor_parallel", "autotp_size"): "distributed.tensor_parallel_size",
    ("tensor_parallel", "tp", "tp_size"): "distributed.tensor_parallel_size",
    ("tensor_parallel", "tensor_parallel", "tp_size"): "distributed.tensor_parallel_size",
}


def resolve_precision(precision: str, on_gpu: bool) -> str:
    if precision == "fp16" and not on_gpu:
        raise UserError(
            "config key 'train.precision' is fp16, which DeepSpeed supports on GPUs only; use bf16 or fp32 (or auto) "
            "on the CPU."
        )
    if precision != "auto":
        return precision
    if not on_gpu:
        return "fp32"
    import torch  # (here: the checks before the process group read this module without torch)

    if torch.cuda.is_bf16_supported(including_emulation=False):  # (emulated bf16 is several times slower)
        return "bf16"
    return "fp16" if torch.cuda.get_device_capability()[0] >= 7 else "fp32"  # V100, T4: fp16 tensor cores


def use_tf32(enabled: bool, on_gpu: bool) -> None:
    """fp32 matrix products and convolutions on a GPU's TF32 tensor cores (10-bit mantissa, fp32 range and
    accumulation: 8x an A100's or H100's fp32 rate), or in full fp32; process-wide, GPUs only (the CPU is left
    alone)."""
    import torch

    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def resolve_grad_accum(t: TrainConfig, world: int) -> int:
    """train.grad_accum, or the one that makes train.global_batch_size blocks per step on `world` data-parallel
    ranks (the world size over the ranks that share a batch: a sequence- or tensor-parallel group)."""
    if not t.global_batch_size:
        return t.grad_accum
    per_pass = t.micro_batch_size * world
    if t.global_batch_size % per_pass:
        raise UserError(
            f"config key 'train.global_batch_size' is {t.global_batch_size}, which is not a multiple of "
            f"train.micro_batch_size x data-parallel ranks = {t.micro_batch_size} x {world} = {per_pass}; change the "
            "micro batch size or the number of ranks so that it divides the global batch."
        )
    return t.global_batch_size // per_pass


def deepspeed_config(
    t: TrainConfig, o: OptimConfig, d: DistributedConfig, on_gpu: bool, grad_accum: int | None = None,
    leaf_modules: list[str] = (),
) -> dict:  # fmt: skip
    """The DeepSpeed config the loop's, optimizer's and distributed settings mean (the user's JSON merged in);
    DeepSpeed owns the optimizer. `leaf_modules`: the model's Mixture-of-Experts blocks (moe.leaf_classes), which
    ZeRO-3 gathers whole."""
    precision = resolve_precision(t.precision, on_gpu)
    zero: dict = {"stage": d.zero_stage}
    if d.zero_stage == 3 and leaf_modules:
        zero["leaf_module"] = {"classes": list(leaf_modules)}
    if d.zero_stage == 3 and t.optimizer == "muon":
        zero["reduce_scatter"] = False  # (DeepSpeed's Muon orthogonalizes whole matrices: it refuses reduce-scatter)
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    generated = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum or t.grad_accum,
        "gradient_clipping": o.clip(t.optimizer),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},  # 0: dynamic
        "zero_optimization": zero,
        "optimizer": optimizer_config(t, o, d, on_gpu),
        "steps_per_print": 1 << 40,  # we log ourselves
    }
    if d.zero_stage == 3 and t.optimizer == "muon" and precision != "fp32":
        # ZeRO-3's Muon gathers each matrix's fp32 momentum partitions in the communication dtype and keeps the
        # gathered copy: in bf16 the momentum would lose fp32's mantissa every step; fp32 traffic (twice bf16's
        # bytes for the gradients' reduce too) keeps it exact
        generated["communication_data_type"] = "fp32"
    if d.sequence_parallel_size > 1:  # (for the record: the groups reach DeepSpeed as the mpu, see sequence_parallel)
        generated["sequence_parallel_size"] = d.sequence_parallel_size
    if d.tensor_parallel_size > 1:  # DeepSpeed's AutoTP shards the model in deepspeed.initialize (tensor_parallel.py)
        generated["tensor_parallel"] = {"autotp_size": d.tensor_parallel_size}
    return with_user_config(generated, d)


def with_user_config(generated: dict, d: DistributedConfig) -> dict:
    """`generated` with the user's DeepSpeed JSON (distributed.deepspeed_config) merged over it, its keys checked:
    no batch size that differs from train.*, no model-parallel degree, no scheduler, no DeepCompile under sequence
    parallelism."""
    if not d.deepspeed_config:
        return generated
    path = Path(d.deepspeed_config)
    try:
        user = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config key 'distributed.deepspeed_config' names '{path}', which does not exist.") from None
    except json.JSONDecodeError as e:
        raise UserError(
            f"'{path}' (distributed.deepspeed_config) is not valid JSON: {e.msg} at line {e.lineno}."
        ) from None
    for key in BATCH_KEYS:
        if key in user and user[key] != generated.get(key, user[key]):
            raise UserError(
                f"'{path}' sets {key}={user[key]}, but batch sizes come from train.* (they decide what the loader "
                "reads); remove it from the file and set train.micro_batch_size / grad_accum / global_batch_size."
            )
    for keys, what in MODEL_PARALLEL_KEYS.items():
        value = _lookup(user, keys)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 1:
            raise UserError(f"'{path}' sets {'.'.join(keys)}={value}; set {what} instead (the loader must feed "
                            "its groups), and remove it from the file.")  # fmt: skip
    if d.sequence_parallel_size > 1 and _lookup(user, ("compile", "deepcompile")):
        raise UserError(
            f"'{path}' sets compile.deepcompile, which reduces gradients its own way (divided by every rank), "
            "but sequence parallelism scales its loss for DeepSpeed's usual reduction; remove it, or set "
            "distributed.sequence_parallel_size=1."
        )
    if "scheduler" in user:
        raise UserError(f"'{path}' sets a scheduler; choose it with optim.schedule instead (cosine, linear, wsd).")
    return _merge(generated, user)


def optimizer_config(t: TrainConfig, o: OptimConfig, d: DistributedConfig, on_gpu: bool) -> dict:
    """DeepSpeed's optimizer block: torch's AdamW, or DeepSpeed's Muon with its auxiliary AdamW (muon_flags says
    which parameters are whose)."""
    adamw = {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay}
    if t.optimizer == "adamw":
        # torch's AdamW; fused (one kernel for all parameters) on GPU, where it needs no compilation
        fused = {"fused": True} if on_gpu and not d.offload_optimizer else {}
        return {"type": "AdamW", "params": {**adamw, "torch_adam": True, **fused}}
    if d.tensor_parallel_size > 1:
        raise UserError(
            "config key 'train.optimizer' is muon, which orthogonalizes each matrix whole, but tensor parallelism "
            "leaves each rank a slice of it (the slices' orthogonalizations are not the matrix's); use adamw, or set "
            "distributed.tensor_parallel_size=1 (ZeRO-3 trains Muon on large models)."
        )
    if d.zero_stage == 0:
        raise UserError(
            "config key 'train.optimizer' is muon, which dist_clm runs with ZeRO stages 1-3 (DeepSpeed's stage-0 "
            "wrappers step its auxiliary AdamW once more at start); set distributed.zero_stage to 1, 2 or 3."
        )
    if o.clip(t.optimizer):
        raise UserError(
            f"config key 'optim.grad_clip' is {o.grad_clip:g}, but with train.optimizer=muon DeepSpeed clips the "
            "orthogonalized update rather than the gradient, which shrinks every Muon step (Muon's update has a "
            "fixed scale already); leave optim.grad_clip unset (no clipping with Muon) or set it to 0."
        )
    return {"type": "Muon", "params": {**adamw, "adam_lr": o.lr, "muon_lr": o.muon_lr, "momentum": o.muon_momentum,
                                       "torch_adam": True}}  # fmt: skip


@contextlib.contextmanager
def muon_flags(model, optimizer: str):
    """Around deepspeed.initialize: DeepSpeed gives Muon every parameter of two or more dimensions whose name has
    neither 'embed' nor 'lm_head' in it, which hands GPT-2's token and position tables (wte, wpe) to Muon; Muon
    is for hidden matrices only, so every embedding table and the output head go to AdamW, found by module."""
    import torch

    if optimizer != "muon":
        yield
        return
    import deepspeed

    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings()
    tables |= {id(head.weight)} if head is not None else set()
    flag = deepspeed.set_optimizer_flags

    def flag_by_module(config, module) -> None:
        flag(config, module)
        for p in module.parameters():
            if id(p) in tables:
                p.use_muon = False

    deepspeed.set_optimizer_flags = flag_by_module  # (deepspeed.initialize looks it up in its module each call)
    try:
        yield
    finally:
        deepspeed.set_optimizer_flags = flag


def _lookup(tree: dict, keys: tuple[str, ...]):
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def lr_factor(step: int, o: OptimConfig, max_steps: int) -> float:
    """The learning rate of update `step` (0-based) of `max_steps` as a fraction of optim.lr.

    Linear warmup over optim.warmup_steps (or that fraction of max_steps), then one of: cosine to min_lr_ratio at
    max_steps; linear to it; or WSD: constant, then linear to min_lr_ratio over the last decay_fraction of the steps.
    """
    warmup = o.warmup(max_steps)
    if step < warmup:
        return (step + 1) / warmup
    floor = o.min_lr_ratio
    if o.schedule == "wsd":
        decay = max(1, round(o.decay_fraction * max_steps))
        progress = min(1.0, max(0.0, (step - (max_steps - decay)) / decay))
        return 1.0 - (1.0 - floor) * progress
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if o.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduler_factory(o: OptimConfig, max_steps: int):
    """For deepspeed.initialize(lr_scheduler=...): a LambdaLR over DeepSpeed's optimizer. One function for the
    three shapes, so min_lr_ratio means the same in each (DeepSpeed's WarmupDecayLR decays to 0 and has no WSD);
    DeepSpeed steps it once per optimizer step and saves it in every checkpoint."""
    import torch

    def make(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, o, max_steps))

    return make


def learning_rates(scheduler) -> dict[str, float]:
    """The schedule's current rates: `lr` (AdamW's groups), and `muon_lr` where Muon trains some groups."""
    out: dict[str, float] = {}
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        out.setdefault("muon_lr" if group.get("use_muon") else "lr", lr)
    return out


def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay matrices only: not biases, norm weights or embeddings (their decay hurts and buys nothing)."""
    import torch

    from dist_clm.parallel.partitioned import shape

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if len(shape(p)) < 2 or id(p) in embeddings else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
