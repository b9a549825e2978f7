"""Every byte of a training run, planned before the job starts: what each rank holds on its device (parameters,
gradients, optimizer state, activations, the loss head, DeepSpeed's buffers), what each node's host holds while
the model is built, loaded, checkpointed and exported, the checkpoint's size on disk, the time per step at a
stated MFU, and, when the run does not fit, the overrides that would make it fit.

Without torch: the parameters are counted from the model's config fields (per family, the layer shapes
transformers builds; a test checks each count against a real build and a meta-device build at full size), so the
plan runs before the process group in a fraction of a second (a meta build imports torch and transformers: 9 s).

The model states follow DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`): 16-bit parameters and gradients, fp32 master weights, gradients and
the optimizer's moments; in fp32 runs DeepSpeed keeps the same structure with 4-byte "16-bit" copies. The
activations per layer are the tensors autograd saves for the backward pass, counted per token for each family
(the coefficients below; bench/memory_plan.py measures them against the real saved tensors).

One assumption is encoded in one place, `built_share`: with ZeRO stage 3 a rank builds and loads only its 1/world
share of the parameters (deepspeed.zero.Init), with stages 0-2 every rank builds the whole model in fp32.

Tensor parallelism (distributed.tensor_parallel_size, DeepSpeed's AutoTP) changes what a rank holds before ZeRO
partitions anything (`held`): its shard of the split matrices and the replicated parameters whole. ZeRO then
partitions over the data-parallel ranks of each tensor-parallel position (`zero_share`), except that under ZeRO-3
the replicated parameters, built partitioned before AutoTP runs, stay partitioned over every rank.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_clm.config import Config
from dist_clm.errors import UserError
from dist_clm.models.build import PLAIN_HEADS, PRESETS, TENSOR_PARALLEL_FAMILIES, chunk_columns

GB = 10**9
GiB = 2**30

# bf16 dense peak per GPU (TFLOP/s, the makers' figures without sparsity; SXM) and memory
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
GPU_MEMORY = {"H100": 80 * GiB, "H200": 141 * GB, "A100": 80 * GiB}

# transformers' config defaults for the fields the counts read (a test compares them with AutoConfig.for_model)
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, n_inner=None, tie_word_embeddings=True),
    "llama": dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_size=4096,
                  intermediate_size=11008, attention_bias=False, mlp_bias=False, tie_word_embeddings=False),
    "mistral": dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096,
                    intermediate_size=14336, tie_word_embeddings=False),
    "qwen2": dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_size=4096,
                  intermediate_size=22016, tie_word_embeddings=False),
    "qwen3": dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_size=4096,
                  head_dim=128, intermediate_size=22016, attention_bias=False, tie_word_embeddings=False),
    "qwen3_moe": dict(num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=4, hidden_size=2048,
                      intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                      decoder_sparse_step=1, mlp_only_layers=[], attention_bias=False, tie_word_embeddings=False),
}  # fmt: skip

# DeepSpeed's ZeRO defaults (deepspeed/runtime/zero/config.py; a test compares them), in elements
ZERO_DEFAULTS = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000,
                 "stage3_max_live_parameters": 1_000_000_000, "contiguous_gradients": True}  # fmt: skip

# Saved for the backward pass, per token and layer, in elements of the compute dtype: (x hidden width, x MLP
# width, x attention width (heads x head_dim), x key/value width). Counted from the modules' forward (norm inputs,
# the projections' inputs, q/k/v and their rotated copies, SDPA's output, the MLP's intermediate products: GPT-2's
# tanh GELU keeps four, SwiGLU three), checked against autograd's saved tensors by bench/memory_plan.py.
ACTIVATION_COEFFICIENTS = {"gpt2": (7, 6, 0, 0), "llama": (4, 4, 5, 4)}
CHECKPOINTED = 1  # activation checkpointing keeps each layer's input (x hidden width) and recomputes one layer

HOST_MARGIN = 0.85  # of a node's memory the ranks may plan to use: the OS, page cache of the shards, the loader
DEVICE_MARGIN = 0.92  # of a GPU's memory: the CUDA context (~0.5 GB) and the caching allocator's fragmentation
EXPORT_SHARD = 2 * GB  # `dist-clm export`'s default --max-shard-size: it gathers and writes one shard at a time
IMPORT_BASELINE = 1.1 * GB  # what a CPU rank holds whatever its model: the imports, the process group, DeepSpeed
# (a whole run of a one-layer, width-16 model peaks at 0.98 GB here; tests/integration/parallel/test_memory_plan.py)


@dataclass(frozen=True)
class ModelSize:
    """A model's parameter counts, from its config fields alone."""

    model_type: str
    total: int  # every parameter once (a tied head counted with the embeddings): count_params of the built model
    active: int  # those one token passes through (MoE: top-k of each layer's experts)
    tables: int  # embedding tables and an untied output head (AdamW under Muon)
    vectors: int  # norms and biases (AdamW under Muon)
    largest_module: int  # the parameters of the largest module (DeepSpeed's model_to_params)
    gathered_unit: int  # the most ZeRO-3 gathers at once: the largest module, or a whole MoE block (a leaf module)
    experts: int  # MoE: each sparse layer's experts, of which top_k route each token (0, 0: dense)
    top_k: int
    sparse_layers: int
    expert_params: int  # MoE: the parameters of one sparse layer's experts
    layers: int
    width: int
    mlp_width: int  # the MLP's intermediate width (MoE: the experts' times top-k, summed over the routed tokens)
    attention_width: int  # heads x head_dim
    kv_width: int
    heads: int
    vocab: int
    # tensor parallelism (AutoTP's plans for the Llama-style families; none for the others, which it cannot split):
    # the split parameters as (elements per unit, units), each split by its units over a group (attention by
    # key/value heads, the MLP by its width, an untied head by vocabulary rows); the rest stays whole on each rank
    split: tuple[tuple[int, int], ...] = ()
    head: int = 0  # an untied output head's parameters (0: tied, the embedding table's)

    @property
    def kv_heads(self) -> int:
        return self.heads * self.kv_width // self.attention_width

    @property
    def replicated(self) -> int:
        """The parameters every rank of a tensor-parallel group holds whole: the embedding table (and a head tied
        to it), the norms (Qwen3's per-head query and key norms too), the row-parallel projections' biases."""
        return self.total - sum(per * units for per, units in self.split)


def model_fields(preset: str, pretrained: str, overrides: dict[str, Any], vocab: int | None) -> dict[str, Any]:
    """The config fields of a run's model: its pretrained directory's config.json, or its preset with
    model.overrides and the tokenizer's vocabulary (an override of vocab_size wins, as in build.preset_config)."""
    if pretrained:
        path = Path(pretrained) / "config.json"
        if not path.is_file():
            raise UserError(f"model.pretrained '{pretrained}' is not a model directory with config.json; give a "
                            "directory written by save_pretrained (or `dist-clm export`).")  # fmt: skip
        fields = json.loads(path.read_text())
        fields = fields.get("text_config") or fields
        fields.setdefault("model_type", json.loads(path.read_text()).get("model_type"))
    else:
        if preset not in PRESETS:
            raise UserError(f"config key 'model.preset' must be one of {', '.join(PRESETS)}, got {preset!r}.")
        fields = {**PRESETS[preset], **({"vocab_size": vocab} if vocab else {}), **overrides}
    if fields.get("model_type") not in FAMILY_DEFAULTS:
        raise UserError(f"the memory plan counts {', '.join(FAMILY_DEFAULTS)} models, not {fields.get('model_type')}; "
                        "run with --no-plan-check.")  # fmt: skip
    if not fields.get("vocab_size"):
        raise UserError("the plan needs the vocabulary: give data.path (its tokenizer) or --vocab N.")
    return {**FAMILY_DEFAULTS[fields["model_type"]], **fields}


def size_of_run(cfg: Config, vocab: int | None) -> ModelSize:
    """The counts of the run's model; `vocab`: its data's tokenizer's (None: model.overrides' or the pretrained
    config's)."""
    m = cfg.model
    return model_size(model_fields(m.preset, m.pretrained, m.overrides, vocab))


def model_size(f: dict[str, Any]) -> ModelSize:
    """The parameter counts of the model transformers builds from config fields `f` (model_fields)."""
    kind, vocab = f["model_type"], int(f["vocab_size"])
    if kind == "gpt2":
        d, layers, mlp = f["n_embd"], f["n_layer"], f["n_inner"] or 4 * f["n_embd"]
        positions = f["n_positions"]
        per_layer = 3 * d * d + 3 * d + d * d + d + d * mlp + mlp + mlp * d + d + 4 * d
        head = 0 if f["tie_word_embeddings"] else vocab * d
        total = vocab * d + positions * d + layers * per_layer + 2 * d + head
        vectors = layers * (3 * d + d + mlp + d + 4 * d) + 2 * d
        largest = max(vocab * d, positions * d, 3 * d * d + 3 * d, d * mlp + mlp)
        return ModelSize(kind, total, total, vocab * d + positions * d + head, vectors, largest, largest, 0, 0, 0, 0,
                         layers, d, mlp, d, d, f["n_head"], vocab, (), head)  # fmt: skip
    d, layers, heads = f["hidden_size"], f["num_hidden_layers"], f["num_attention_heads"]
    kv, hd = f.get("num_key_value_heads") or heads, f.get("head_dim") or d // heads
    q, k = heads * hd, kv * hd
    qkv_bias = kind == "qwen2" or (kind != "mistral" and bool(f.get("attention_bias")))
    attention = d * q + 2 * d * k + q * d + (q + 2 * k) * qkv_bias + d * (qkv_bias and kind != "qwen2")
    attention += 2 * hd if kind.startswith("qwen3") else 0  # q_norm, k_norm
    mlp_bias = kind == "llama" and bool(f.get("mlp_bias"))
    dense = 3 * d * f["intermediate_size"] + (2 * f["intermediate_size"] + d) * mlp_bias
    experts, top_k = f.get("num_experts") or 0, f.get("num_experts_per_tok") or 0
    expert = 3 * d * (f.get("moe_intermediate_size") or 0)
    sparse = [kind == "qwen3_moe" and experts > 0 and i not in (f.get("mlp_only_layers") or [])
              and (i + 1) % f.get("decoder_sparse_step", 1) == 0 for i in range(layers)]  # fmt: skip
    n_sparse = sum(sparse)
    mlp_total = (layers - n_sparse) * dense + n_sparse * (d * experts + experts * expert)
    head = 0 if f["tie_word_embeddings"] else vocab * d
    total = vocab * d + head + layers * (attention + 2 * d) + mlp_total + d
    active = total - n_sparse * (experts - top_k) * expert
    bias_count = (q + 2 * k + d * (kind != "qwen2")) * qkv_bias
    vectors = layers * (2 * d + bias_count + (2 * hd if kind.startswith("qwen3") else 0)) + d
    vectors += (layers - n_sparse) * (2 * f["intermediate_size"] + d) * mlp_bias
    linears = [d * q + q * qkv_bias, d * k + k * qkv_bias, q * d, d * f["intermediate_size"]]
    largest = max(vocab * d, *linears, *([d * experts, expert // 3] if n_sparse else []))
    mlp_width = f["intermediate_size"] if n_sparse < layers else top_k * f["moe_intermediate_size"]
    block = d * experts + experts * expert if n_sparse else 0  # (a whole MoE block: ZeRO-3 gathers it at once)
    split: tuple[tuple[int, int], ...] = ()
    if not n_sparse:  # (AutoTP leaves a MoE model's experts whole: no tensor parallelism for it)
        # q/k/v by output rows (weights and biases) and o by input columns, whole key/value heads per rank; gate and
        # up by output rows (and biases), down by input columns; o's and down's biases stay whole (added after the
        # all-reduce)
        per_kv_head = (2 * d * q + 2 * d * k + (q + 2 * k) * qkv_bias) // kv
        split = ((layers * per_kv_head, kv), (layers * (3 * d + 2 * mlp_bias), f["intermediate_size"]))
        split += ((d, vocab),) if head else ()
    return ModelSize(kind, total, active, vocab * d + head, vectors, largest, max(largest, block),
                     experts if n_sparse else 0, top_k if n_sparse else 0, n_sparse, experts * expert, layers, d,
                     mlp_width, q, k, heads, vocab, split, head)  # fmt: skip


@dataclass(frozen=True)
class Machine:
    """Where the run goes: its ranks, their nodes, and the memory of each rank's device and of each node's host."""

    world: int
    nodes: int
    device_bytes: int  # per rank: a GPU's memory, 0 where unknown (CPU ranks: unused, they share the host's)
    host_bytes: int  # per node
    on_gpu: bool
    gpu: str = ""  # H100, H200, A100, or another name (the peak table's key)
    peak_tflops: float = 0.0  # per rank, bf16 dense; 0: unknown (no time is planned)

    @property
    def ranks_per_node(self) -> int:
        return max(1, self.world // self.nodes)


def machine_here(world: int, one_node: bool) -> Machine:
    """This machine for `world` ranks (launched_world): its GPUs as nvidia-smi names them, or, with none (or
    DS_ACCELERATOR=cpu), CPU ranks sharing the host's memory. Ranks on several nodes: the launcher's
    LOCAL_WORLD_SIZE per node."""
    import os

    import psutil

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or world) if not one_node else world
    nodes, host = max(1, world // max(1, per_node)), psutil.virtual_memory().total
    gpus = [] if os.environ.get("DS_ACCELERATOR") == "cpu" else nvidia_gpus()
    if not gpus:
        return Machine(world, nodes, host, host, on_gpu=False)
    name, mib = gpus[0]
    gpu = next((key for key in PEAK_TFLOPS if key in name), name)
    return Machine(world, nodes, mib * 2**20, host, on_gpu=True, gpu=gpu, peak_tflops=PEAK_TFLOPS.get(gpu, 0.0))


def nvidia_gpus() -> list[tuple[str, int]]:
    """(name, MiB of memory) of each GPU nvidia-smi lists; none without it."""
    import contextlib
    import subprocess

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
        if out.returncode == 0:
            rows = [line.rsplit(",", 1) for line in out.stdout.splitlines() if "," in line]
            return [(name.strip(), int(mib)) for name, mib in rows if mib.strip().isdigit()]
    return []


@dataclass(frozen=True)
class MemoryPlan:
    """The terms of a run's memory, in bytes: per rank on its device, per node on its host, and on disk."""

    size: ModelSize
    machine: Machine
    precision: str
    params: int
    grads: int
    optimizer: int
    activations: int
    loss_head: int
    buffers: int
    runtime: int  # what the process holds besides the terms (a CPU rank's imports)
    host_build: int  # per node
    host_load: int
    host_checkpoint: int
    host_export: int
    checkpoint: int  # on disk, one checkpoint
    tokens_per_step: int
    step_seconds: float | None
    mfu: float
    levers: list[str] = field(default_factory=list)
    zero_stage: int = 0
    tensor_parallel: int = 1

    @property
    def device_peak(self) -> int:
        """The most a rank holds: the training step's terms; on CPU ranks, whose device is the host, also the model
        states with the asynchronous checkpoint's host copy of the rank's share, if that is more."""
        step = self.params + self.grads + self.optimizer + self.activations + self.loss_head + self.buffers
        if self.machine.on_gpu:
            return step
        saving = self.params + self.grads + self.optimizer + self.host_checkpoint // self.machine.ranks_per_node
        return max(step, saving)

    @property
    def budget(self) -> int:
        """What one rank may plan to use: its device's memory with a margin (CPU ranks: their share of the host,
        less their imports)."""
        m = self.machine
        if m.on_gpu:
            return int(m.device_bytes * DEVICE_MARGIN)
        return int(m.host_bytes * HOST_MARGIN / m.ranks_per_node) - self.runtime

    @property
    def host_peak(self) -> int:
        return max(self.host_build, self.host_load, self.host_checkpoint)

    @property
    def fits(self) -> bool:
        m = self.machine
        host_ok = not m.on_gpu or self.host_peak <= m.host_bytes * HOST_MARGIN
        device_ok = (m.on_gpu and not m.device_bytes) or self.device_peak <= self.budget
        return device_ok and host_ok

    @property
    def model_states(self) -> int:
        """Parameters, gradients and optimizer state per rank: what DeepSpeed's estimators estimate."""
        return self.params + self.grads + self.optimizer

    def biggest(self) -> tuple[str, int]:
        terms = {
            "parameters": self.params,
            "gradients": self.grads,
            "optimizer state": self.optimizer,
            "activations": self.activations,
            "loss head": self.loss_head,
            "DeepSpeed's buffers": self.buffers,
        }
        return max(terms.items(), key=lambda kv: kv[1])  # fmt: skip


def built_share(cfg: Config, machine: Machine) -> float:
    """The share of the parameters one rank holds while the model is built or loaded: 1/world under ZeRO-3 (built
    partitioned, deepspeed.zero.Init), the whole model in stages 0-2."""
    return 1 / machine.world if cfg.distributed.zero_stage == 3 else 1.0


def precision_of(cfg: Config, machine: Machine) -> str:
    """train.precision on this machine: auto is bf16 on the GPUs of the peak table, fp32 on CPU ranks."""
    p = cfg.train.precision
    return ("bf16" if machine.on_gpu else "fp32") if p == "auto" else p


def _compute_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def offloaded(cfg: Config, m: Machine) -> tuple[bool, bool]:
    """(optimizer, parameters) off the device: DeepSpeed's CPU offload, which moves nothing for CPU ranks."""
    d = cfg.distributed
    return d.offload_optimizer and m.on_gpu, d.offload_params and m.on_gpu


def held(s: ModelSize, tp: int) -> tuple[int, int]:
    """The parameters one rank of a tensor-parallel group of `tp` ranks holds before ZeRO partitions anything: (its
    shard of the split ones, the replicated ones). A dimension that does not divide is split unevenly, the first
    ranks one unit more: this counts the largest shard."""
    return sum(per * -(-units // tp) for per, units in s.split), s.replicated


def zero_share(cfg: Config, m: Machine, split: int, whole: int) -> int:
    """Of the bytes of a per-parameter state of what one rank holds (`split`: its tensor-parallel shard's, `whole`:
    the replicated parameters'), what ZeRO leaves on it: stage 0 all; 1-2 a share over the data-parallel ranks of its
    tensor-parallel position (world / tensor_parallel_size); 3 the shard's likewise and the replicated parameters'
    over every rank (zero.Init partitions the model over the world before AutoTP splits it: DeepSpeed 0.19.8's
    checkpoints hold each replicated parameter once, in world partitions)."""
    stage, tp = cfg.distributed.zero_stage, cfg.distributed.tensor_parallel_size
    if stage == 0:
        return split + whole
    if stage == 3:
        return (split * tp + whole) // m.world
    return (split + whole) // (m.world // tp)


def gathered_unit(cfg: Config, s: ModelSize) -> int:
    """What ZeRO-3 gathers at once: the largest module; under tensor parallelism the larger of the embedding table
    (replicated, gathered whole) and the largest split module's shard."""
    tp = cfg.distributed.tensor_parallel_size
    return s.gathered_unit if tp == 1 else max(s.vocab * s.width, -(-s.gathered_unit // tp))


def params_bytes(cfg: Config, s: ModelSize, m: Machine, p: int) -> int:
    """The model's working copy (16-bit, or fp32 in fp32 runs) of what the rank holds (tensor parallelism: its shard
    of the split parameters, the replicated ones whole); ZeRO-3: its share plus one gathered unit."""
    unit = gathered_unit(cfg, s)
    if offloaded(cfg, m)[1]:
        return p * unit
    split, whole = held(s, cfg.distributed.tensor_parallel_size)
    if cfg.distributed.zero_stage == 3:
        return zero_share(cfg, m, p * split, p * whole) + p * unit
    return p * (split + whole)


def grads_bytes(cfg: Config, s: ModelSize, m: Machine, p: int) -> int:
    """The working gradients and the fp32 gradient partition the optimizer steps with (stage 0: the whole fp32
    copy beside 16-bit gradients; stage 1: whole working gradients; 2: partitioned; 3: partitioned plus one
    gathered unit's), of the parameters the rank holds."""
    stage = cfg.distributed.zero_stage
    split, whole = held(s, cfg.distributed.tensor_parallel_size)
    off = offloaded(cfg, m)[0]
    fp32 = 0 if off else zero_share(cfg, m, 4 * split, 4 * whole)
    if stage == 0:
        return p * (split + whole) + (fp32 if p != 4 else 0)
    if stage == 1:
        return p * (split + whole) + fp32
    if stage == 2:
        return (0 if off else zero_share(cfg, m, p * split, p * whole)) + fp32
    return fp32 + p * gathered_unit(cfg, s)


def optimizer_bytes(cfg: Config, s: ModelSize, m: Machine, p: int) -> int:
    """fp32 master weights (not in a plain fp32 stage-0 run) and the moments: AdamW's two; Muon's one momentum
    for the hidden matrices (embedding tables, the head, norms and biases keep AdamW's two), of the rank's ZeRO
    share of what it holds. On the host when distributed.offload_optimizer is set (then 0 here)."""
    if offloaded(cfg, m)[0]:
        return 0
    split, whole = held(s, cfg.distributed.tensor_parallel_size)
    master = 0 if cfg.distributed.zero_stage == 0 and p == 4 else 4
    if cfg.train.optimizer == "adamw":
        return zero_share(cfg, m, (master + 8) * split, (master + 8) * whole)
    # (Muon never runs under tensor parallelism, engine.optimizer_config refuses it: its AdamW part is counted whole)
    return zero_share(cfg, m, (master + 4) * split, (master + 4) * whole + 4 * (s.tables + s.vectors))


def activation_bytes(cfg: Config, s: ModelSize, m: Machine, p: int) -> int:
    """What the forward pass keeps for the backward, per rank: tokens of a micro batch (over the sequence-parallel
    ranks) x layers x the elements each layer saves per token; with checkpointing, each layer's input and one
    layer recomputed. Under tensor parallelism a rank keeps its heads' q/k/v and context and its share of the MLP
    width; the hidden-width tensors (residuals, the norms' inputs and outputs) are whole on every rank."""
    tokens = rank_tokens(cfg)
    tp = cfg.distributed.tensor_parallel_size
    a, b, c, k = ACTIVATION_COEFFICIENTS["gpt2" if s.model_type == "gpt2" else "llama"]
    inner = b * -(-s.mlp_width // tp) + (c * s.attention_width + k * s.kv_width) // tp
    per_layer = a * s.width + inner
    if s.experts:  # each token's k routed copies in and out of the experts, and the router's logits and softmax
        per_layer += 2 * s.top_k * s.width + 2 * s.experts
    # MoE under transformers 4: each sparse layer stacks its experts' weights for the grouped products, a copy
    # autograd keeps for the backward (models/moe_experts.py)
    stacked = p * s.expert_params
    if cfg.train.activation_checkpointing:
        return p * tokens * (CHECKPOINTED * s.width * s.layers + per_layer) + stacked
    return p * tokens * per_layer * s.layers + stacked * s.sparse_layers


def rank_tokens(cfg: Config) -> int:
    """The tokens of a micro batch one rank works on: a sequence-parallel rank its slice of each block, a
    tensor-parallel rank the whole micro batch (its group reads the same one)."""
    return cfg.train.micro_batch_size * max(cfg.data.block_sizes()) // cfg.distributed.sequence_parallel_size


def fused_head(cfg: Config, s: ModelSize) -> bool:
    return cfg.train.loss_head == "fused" or (cfg.train.loss_head == "auto" and s.model_type in PLAIN_HEADS)


def loss_head_bytes(cfg: Config, s: ModelSize, m: Machine, p: int) -> int:
    """Plain: the B x L x V logits, their fp32 copy, the log-softmax kept for the backward and its gradient. Fused
    (models/loss_head.py, a chunk of the vocabulary at a time): a chunk's fp32 logits for every token and their
    working copies, the hidden states' fp32 gradient summed over the chunks, and each token's log-sum-exp; the
    head's weight gradient is the parameter's own, as the plain head's is (counted with the gradients). Under tensor
    parallelism the head holds a rank's vocabulary rows: the fused head goes through those (vocabulary-parallel,
    the log-sum-exps combined over the group); the plain head gathers the whole logits on every rank, beside its
    shard's."""
    tokens, tp = rank_tokens(cfg), cfg.distributed.tensor_parallel_size
    rows = -(-s.vocab // tp)
    if not fused_head(cfg, s):
        return tokens * s.vocab * (p + 4 + 4 + 4 - (4 if p == 4 else 0)) + (tokens * rows * p if tp > 1 else 0)
    chunk = chunk_columns(tokens, rows)
    return tokens * chunk * (4 + 4 + p) + tokens * s.width * 4 + tokens * 4


def buffer_bytes(cfg: Config, s: ModelSize, m: Machine, p: int, zero: dict) -> int:
    """What DeepSpeed holds besides the model states its estimators count, at the sizes of the generated DeepSpeed
    config: the gradient-reduction bucket (two under overlap_comm); under ZeRO-3 also the prefetch bucket, the
    16-bit gradient partition, and the gathered parameters it keeps live for their reuse in the backward pass
    (up to stage3_max_live_parameters; the estimators count one module). On CPU ranks only the touched part of
    an empty bucket is resident: at most the parameters."""
    stage = cfg.distributed.zero_stage
    if stage == 0:
        return 0
    split, whole = held(s, cfg.distributed.tensor_parallel_size)

    def setting(key: str) -> int:
        return int(zero.get(key, ZERO_DEFAULTS[key]))

    reduce = setting("reduce_bucket_size") if m.on_gpu else min(setting("reduce_bucket_size"), split + whole)
    contiguous = zero.get("contiguous_gradients", ZERO_DEFAULTS["contiguous_gradients"])
    overlap = zero.get("overlap_comm", stage == 3)
    dtype = 4 if stage == 1 else p  # (ZeRO-1 stages its fp32 accumulator there)
    total = reduce * dtype * (2 if overlap else 1) if contiguous or stage == 3 else 0
    if stage == 3:
        prefetch = setting("stage3_prefetch_bucket_size")
        total += p * (prefetch if m.on_gpu else min(prefetch, split + whole)) + zero_share(cfg, m, p * split, p * whole)
        if not offloaded(cfg, m)[1]:
            live = min(split + whole, setting("stage3_max_live_parameters"))
            total += p * max(0, live - gathered_unit(cfg, s))
    return total


def host_terms(cfg: Config, s: ModelSize, m: Machine, checkpoint: int) -> tuple[int, int, int, int]:
    """Per node: building (fp32, each rank its built_share), loading a pretrained directory (the same, plus one
    safetensors shard being read), the asynchronous checkpoint's host copy of each rank's share (when
    checkpoint.async_save), and an export (one process, a shard at a time gathered in fp32 and written)."""
    share, ranks = built_share(cfg, m), m.ranks_per_node
    build = int(ranks * (4 * s.total * share + 4 * s.largest_module))
    load = build + ranks * 5 * GB if cfg.model.pretrained else 0  # (save_pretrained's default shards: 5 GB)
    off_optimizer, off_params = offloaded(cfg, m)
    split, whole = held(s, cfg.distributed.tensor_parallel_size)
    off_states = zero_share(cfg, m, 16 * split, 16 * whole) * ranks if off_optimizer else 0
    host = (4 * s.total if off_params else 0) + off_states
    saving = ranks * checkpoint // m.world if cfg.checkpoint.async_save else 0
    export = min(EXPORT_SHARD, 4 * s.total)  # (one shard's weights at a time: docs/PERFORMANCE.md, Export memory)
    return build + host, load + host, saving + host, export


def checkpoint_bytes(cfg: Config, s: ModelSize, p: int) -> int:
    """One checkpoint on disk: the working parameters and the optimizer's fp32 master weights and moments, the whole
    model's once; under tensor parallelism at stages 0-2 the replicated parameters' once per group rank (DeepSpeed
    writes each group rank's module and the optimizer partitions of each tensor-parallel position apart)."""
    copies = cfg.distributed.tensor_parallel_size if cfg.distributed.zero_stage < 3 else 1
    n = s.total + (copies - 1) * s.replicated
    moments = 8 * n if cfg.train.optimizer == "adamw" else 4 * n + 4 * (s.tables + s.vectors)  # (Muon: no TP)
    master = 0 if cfg.distributed.zero_stage == 0 and p == 4 else 4 * n
    return p * n + master + moments


def flops_per_token(s: ModelSize, block: int) -> float:
    """Training FLOPs per token, as build.flops_per_token (6N active + attention's 12·L·d·T)."""
    return 6.0 * s.active + 12.0 * s.layers * s.width * block


def plan(cfg: Config, size: ModelSize, machine: Machine, mfu: float = 0.4, levers: bool = True) -> MemoryPlan:
    """Every term of the run `cfg` of a model of `size` on `machine`; `levers`: also the overrides that would make
    it fit, when it does not."""
    from dist_clm.parallel.engine import deepspeed_config, resolve_grad_accum

    t, d = cfg.train, cfg.distributed
    precision = precision_of(cfg, machine)
    p = _compute_bytes(precision)
    check_parallel(cfg, size, machine)
    dp = machine.world // d.ranks_per_batch  # (a sequence- or tensor-parallel group reads one micro batch)
    grad_accum = resolve_grad_accum(t, dp)
    ds = deepspeed_config(dataclasses.replace(t, precision="fp32"), cfg.optim, d, on_gpu=False, grad_accum=grad_accum)
    checkpoint = checkpoint_bytes(cfg, size, p)
    block = max(cfg.data.block_sizes())
    tokens = t.micro_batch_size * grad_accum * dp * block
    seconds = None
    if machine.peak_tflops:
        seconds = tokens * flops_per_token(size, block) / (machine.world * machine.peak_tflops * 1e12 * mfu)
    out = MemoryPlan(
        size, machine, precision,
        params=params_bytes(cfg, size, machine, p), grads=grads_bytes(cfg, size, machine, p),
        optimizer=optimizer_bytes(cfg, size, machine, p), activations=activation_bytes(cfg, size, machine, p),
        loss_head=loss_head_bytes(cfg, size, machine, p),
        buffers=buffer_bytes(cfg, size, machine, p, ds["zero_optimization"]),
        runtime=0 if machine.on_gpu else int(IMPORT_BASELINE),
        **dict(zip(("host_build", "host_load", "host_checkpoint", "host_export"),
                   host_terms(cfg, size, machine, checkpoint), strict=True)),
        checkpoint=checkpoint, tokens_per_step=tokens, step_seconds=seconds, mfu=mfu, zero_stage=d.zero_stage,
        tensor_parallel=d.tensor_parallel_size,
    )  # fmt: skip
    if levers and not out.fits:
        out = dataclasses.replace(out, levers=find_levers(cfg, size, machine))
    return out


def check_parallel(cfg: Config, size: ModelSize, machine: Machine) -> None:
    """The refusals train gives parallel settings that the ranks or the model cannot take, before planning them."""
    from dist_clm.models.build import Shape
    from dist_clm.parallel import fit

    d = cfg.distributed
    fit.check_layout(d, machine.world, machine.ranks_per_node)
    shape = Shape(size.model_type, size.heads, size.kv_heads, None, size.vocab, size.experts)
    fit.check_tensor_parallel(shape, d.tensor_parallel_size)


def candidate_levers(cfg: Config, size: ModelSize, machine: Machine) -> list[tuple[str, dict]]:
    """The changes that shrink a rank's memory, cheapest in speed first, each as (override, config sections)."""
    t, d = cfg.train, cfg.distributed
    out: list[tuple[str, dict]] = []
    if d.zero_stage < 3:
        out.append(("distributed.zero_stage=3", {"distributed": {"zero_stage": 3}}))
    if not t.activation_checkpointing:
        out.append(("train.activation_checkpointing=true", {"train": {"activation_checkpointing": True}}))
    tp = d.tensor_parallel_size * 2  # (after those: two all-reduces per layer and pass, within a node)
    splits = size.model_type in TENSOR_PARALLEL_FAMILIES and not size.experts  # (AutoTP's families, no MoE)
    divides = machine.ranks_per_node % tp == 0 and size.heads % tp == 0 and size.kv_heads % tp == 0
    if splits and divides and d.sequence_parallel_size == 1 and t.optimizer == "adamw":  # (Muon: whole matrices)
        change: dict = {"distributed": {"tensor_parallel_size": tp}}
        override = f"distributed.tensor_parallel_size={tp}"
        if not t.global_batch_size:  # (half the data-parallel ranks: twice the accumulation keeps the batch)
            change["train"] = {"grad_accum": t.grad_accum * 2}
            override += f" train.grad_accum={t.grad_accum * 2}"
        out.append((override, change))
    if t.micro_batch_size > 1:
        micro = t.micro_batch_size // 2
        if t.global_batch_size:
            out.append((f"train.micro_batch_size={micro}", {"train": {"micro_batch_size": micro}}))
        else:
            out.append((f"train.micro_batch_size={micro} train.grad_accum={t.grad_accum * 2}",
                        {"train": {"micro_batch_size": micro, "grad_accum": t.grad_accum * 2}}))  # fmt: skip
    sp = d.sequence_parallel_size * 2
    blocks_ok = all(b % sp == 0 for b in cfg.data.block_sizes())
    if size.model_type in PLAIN_HEADS and machine.world % sp == 0 and size.heads % sp == 0 and blocks_ok:
        out.append((f"distributed.sequence_parallel_size={sp}", {"distributed": {"sequence_parallel_size": sp}}))
    if d.zero_stage >= 1 and not d.offload_optimizer and machine.on_gpu:
        out.append(("distributed.offload_optimizer=true", {"distributed": {"offload_optimizer": True}}))
    return out


def find_levers(cfg: Config, size: ModelSize, machine: Machine) -> list[str]:
    """The levers that alone make the run fit; if none does, the first ones that together do (one line); and
    always, on GPUs, the number of GPUs at which it fits as it is set (ZeRO-3 spreads the model states)."""
    levers = candidate_levers(cfg, size, machine)
    alone = [override for override, change in levers if plan(cfg.replace(**change), size, machine, levers=False).fits]
    if not alone:
        combined, merged = [], cfg
        for override, change in levers:
            merged, _ = merged.replace(**change), combined.append(override)
            if plan(merged, size, machine, levers=False).fits:
                alone = [" ".join(combined)]
                break
    zero3 = cfg.replace(distributed={"zero_stage": 3})
    for factor in (2, 4, 8, 16, 32, 64):  # more nodes like these, ZeRO-3 spreading the model states over them
        nodes = machine.nodes * factor if machine.nodes > 1 or machine.world >= 8 or not machine.on_gpu else 1
        more = dataclasses.replace(machine, world=machine.world * factor, nodes=nodes)
        if plan(zero3, size, more, levers=False).fits:
            stage = "" if cfg.distributed.zero_stage == 3 else "distributed.zero_stage=3 "
            where = (
                f"--gpus {more.world} --nodes {more.nodes}"
                if machine.on_gpu
                else f"on {more.nodes} nodes of {more.ranks_per_node} rank(s) (launch slurm --nodes {more.nodes})"
            )
            alone.append(f"{stage}{where}")  # fmt: skip
            break
    return alone


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def render(pl: MemoryPlan) -> str:
    """The plan as the `dist-clm plan` command prints it."""
    s, m = pl.size, pl.machine
    where = f"{m.world} x {m.gpu or 'GPU'} ({_size(m.device_bytes)} each)" if m.on_gpu else (
        f"{m.world} CPU rank(s) (host memory {_size(m.host_bytes)} per node, {_size(pl.budget)} per rank after the "
        f"margin and imports)")  # fmt: skip
    active = f", {_count(s.active)} active per token" if s.active != s.total else ""
    tp = pl.tensor_parallel
    parallel = f", TP {tp} ({m.world // tp} data-parallel rank(s))" if tp > 1 else ""
    lines = [
        f"model: {s.model_type}, {_count(s.total)} parameters{active} ({s.total:,}); vocabulary {s.vocab:,}",
        f"machine: {where}, {m.nodes} node(s); precision {pl.precision}, ZeRO-{pl.zero_stage}{parallel}",
        "per rank, on its device:",
        *(f"  {name:<22}{_size(value):>12}" for name, value in (
            ("parameters", pl.params), ("gradients", pl.grads), ("optimizer state", pl.optimizer),
            ("activations", pl.activations), ("loss head", pl.loss_head), ("DeepSpeed buffers", pl.buffers))),
        f"  {'peak':<22}{_size(pl.device_peak):>12}   of {_size(pl.budget)} usable"
        f" -> {'fits' if pl.device_peak <= pl.budget else 'DOES NOT FIT'}",
        f"host memory per node: building {_size(pl.host_build)}"
        + (f", loading {_size(pl.host_load)}" if pl.host_load else "")
        + f", checkpointing {_size(pl.host_checkpoint)}, exporting {_size(pl.host_export)} (of {_size(m.host_bytes)})",
        f"checkpoint on disk: {_size(pl.checkpoint)}",
    ]  # fmt: skip
    if pl.step_seconds is not None:
        per_day = pl.tokens_per_step * 86400 / pl.step_seconds
        lines.append(f"time: {pl.step_seconds:.2f} s per step of {pl.tokens_per_step:,} tokens, "
                     f"{per_day / 1e9:.2f} B tokens per day at {pl.mfu:.0%} MFU "
                     f"({m.peak_tflops:g} TFLOP/s peak per rank)")  # fmt: skip
    else:
        lines.append(f"time: give --peak-tflops (or a GPU of {', '.join(PEAK_TFLOPS)}) for the time per step")
    if not pl.fits:
        lines.append(
            "it does not fit; what would make it fit (each an override):"
            if pl.levers
            else "it does not fit, and no single setting makes it fit: use a machine with more memory."
        )
        lines += [f"  {lever}" for lever in pl.levers]
    return "\n".join(lines)


def refusal(pl: MemoryPlan) -> str:
    """The one sentence train and launch say when the plan does not fit: what is needed, what there is, the
    biggest term and the first lever."""
    m = pl.machine
    lever = f"try {pl.levers[0]}" if pl.levers else "use a machine with more memory"
    if m.on_gpu and pl.device_peak <= pl.budget or (m.on_gpu and not m.device_bytes):
        phase = max(("building", pl.host_build), ("loading", pl.host_load), ("checkpointing", pl.host_checkpoint),
                    key=lambda kv: kv[1])  # fmt: skip
        need = f"{_size(phase[1])} of host memory per node while {phase[0]} but a node has {_size(m.host_bytes)}"
    else:
        name, value = pl.biggest()
        where = (f"a GPU of {_size(m.device_bytes)} allows {_size(pl.budget)}" if m.on_gpu else
                 f"{_size(m.host_bytes)} of memory on a node of {m.ranks_per_node} rank(s) leaves {_size(pl.budget)} "
                 "each")  # fmt: skip
        need = f"{_size(pl.device_peak)} per rank but {where} ({name}, {_size(value)}, is the biggest term)"
    return (
        f"the memory plan says this run needs {need}; {lever}, or pass --no-plan-check to run anyway "
        "(`dist-clm plan` with the same settings shows every term)."
    )
