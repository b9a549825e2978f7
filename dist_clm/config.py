"""Typed run configuration: defaults <- YAML file <- dotted command-line overrides.

One section per owner (run, data, model, train: the loop, optim, objective, checkpoint, stability,
distributed), each a frozen dataclass whose fields are documented where they are declared and which checks
itself; components receive their section. Unknown keys, wrong types and bad values are refused with one sentence
naming the key; a key that moved to its own section is refused naming where it is now. The config a run trains
with (its objective and document mask settled from the data) is written to the run directory as `config.yaml`,
so a run can always be reproduced from its own directory.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dist_clm.errors import UserError

Check = tuple[bool, str, str]  # (holds, the key within its section, what is wrong when it does not)


class ConfigError(UserError):
    """A config file or override that cannot be turned into a valid `Config`."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    dir: str = "runs/quickstart"  # everything a run writes: config.yaml, checkpoints/, tensorboard/, metrics.jsonl
    tensorboard: bool = True  # false: no TensorBoard files even when run.loggers names it (older configs' switch)
    loggers: list[str] = field(default_factory=lambda: ["tensorboard", "jsonl"])  # where the numbers go, rank 0
    # only: tensorboard (<dir>/tensorboard), wandb, mlflow, jsonl (<dir>/metrics.jsonl: always written, resume and
    # export read it). Each gets the same scalars, the resolved config and the run's identity; a resume continues
    # the same tracker run (ids in <dir>/trackers.json); a tracker that fails is a warning, never a stop
    name: str = ""  # the run's name in the trackers (default: the name of `dir`)
    # each tracker's own environment applies where these are unset (""): WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE,
    # WANDB_DIR, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME; a key set here wins over its variable
    wandb_project: str = ""  # (default: WANDB_PROJECT, else dist-clm)
    wandb_entity: str = ""  # (default: WANDB_ENTITY, else the account's)
    wandb_mode: str = ""  # offline (the default without WANDB_MODE): files under <dir>/wandb (or WANDB_DIR) for
    # `wandb sync`; online (needs WANDB_API_KEY)
    mlflow_tracking_uri: str = ""  # e.g. http://mlflow:5000 (default: MLFLOW_TRACKING_URI, else
    # sqlite:///<dir>/mlflow.db)
    mlflow_experiment: str = ""  # (default: MLFLOW_EXPERIMENT_NAME, else dist-clm)
    progress_bar: bool = True  # progress on rank 0: a bar on a terminal, a plain line every 30 s in a log file
    overwrite: bool = False  # when `dir` holds checkpoints of another training (other settings or data, or
    # checkpoint.resume=false): delete them, with the metrics and TensorBoard files, and start afresh (default: refuse)

    def checks(self) -> list[Check]:
        known = ("tensorboard", "jsonl", "wandb", "mlflow")
        unknown = [x for x in self.loggers if x not in known]
        return [
            (not unknown, "loggers", f"names {', '.join(map(repr, unknown))}; choose from {', '.join(known)}"),
            (
                self.wandb_mode in ("", "offline", "online"),
                "wandb_mode",
                f"is offline or online, not {self.wandb_mode!r}",
            ),  # fmt: skip
        ]


@dataclass(frozen=True, kw_only=True)
class MixSource:
    path: str  # a directory written by `dist-clm prepare`
    weight: float = 1.0  # share of training blocks, relative to the other sources (0 = validation only)
    name: str = ""  # how its metrics are named (default: the directory's name)


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    until: int = 0  # the stage's last step (the last stage lasts to the end of training: 0 there, or any step)
    weights: dict[str, float] | None = None  # data.mix source name -> its weight in this stage (a source not
    # named: 0); unset: the previous stage's (the first: data.mix's)
    block_size: int = 0  # tokens per block in this stage, e.g. a longer context for the last steps (context
    # extension); 0: the previous stage's (the first: data.block_size)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    path: str = ""  # a directory written by `dist-clm prepare` (holds manifest.json, train/, val/, tokenizer/)
    mix: list[MixSource] = field(default_factory=list)  # instead of `path`: several prepared directories,
    # trained on in proportion to their weights; each one's validation split is reported separately
    stages: list[StageConfig] = field(default_factory=list)  # the data changing over the run: the mixture of
    # data.mix (e.g. a cleaner mix for the decay of a WSD schedule) and the block size (e.g. a long-context stage
    # at the end), each stage's until its step (then the next stage's); a source's blocks continue across stages.
    # Stages that have begun are fixed for the run; later ones may be appended or changed before they begin
    document_mask: bool | None = None  # positions restart at each document and attention stays inside it; None
    # (the default): on when a training source is fine-tuning data (prepare --format chat / prompt-completion)
    block_size: int = 128  # tokens per training block, chosen here at train time, not at prepare time
    shuffle: bool = True  # shuffle the order of the training blocks, anew each epoch (seeded by train.seed)
    num_workers: int = 0  # DataLoader worker processes per rank
    shuffle_window: int = 0  # tokens: read the data a window at a time, a window being as many whole shards,
    # drawn at random, as hold about this many tokens (at least one), its blocks shuffled; so a rank reads a few
    # shards at a time (remote data through a bounded cache: e.g. 8 shards' worth); 0 = one global shuffle.
    # Larger is closer to the global shuffle (docs/PERFORMANCE.md). Fixed for a run: resume refuses a change
    prefetch_steps: int = 2  # remote data: fetch the shards the next N steps read into the cache ahead (0 = off)
    cache_dir: str = ""  # where remote data (path or mix paths like s3://bucket/prefix) is cached on each node,
    # shared by the node's ranks ("" = $DIST_CLM_CACHE, else ~/.cache/dist_clm/data)
    cache_limit: str | int = 0  # the most bytes of shards that cache holds, e.g. 20GB or 512MiB; least recently read
    # shards are removed to stay under it (a number is bytes; 0 = no limit)

    def block_sizes(self) -> list[int]:
        """Every block size the run trains on: block_size, then those data.stages change it to."""
        return list(dict.fromkeys([self.block_size, *(s.block_size for s in self.stages if s.block_size)]))

    def block_size_at(self, step: int) -> int:
        """The block size step `step` (1-based) trains at: data.block_size, or that of the stage holding it."""
        size = self.block_size
        for stage in self.stages:
            size = stage.block_size or size
            if not stage.until or step <= stage.until:
                break
        return size

    def checks(self) -> list[Check]:
        return [
            (self.block_size >= 2, "block_size", f"must be at least 2, got {self.block_size}"),
            (self.num_workers >= 0, "num_workers", f"must be 0 or more, got {self.num_workers}"),
            (self.shuffle_window >= 0, "shuffle_window", f"must be 0 or more tokens, got {self.shuffle_window}"),
            (self.prefetch_steps >= 0, "prefetch_steps", f"must be 0 or more, got {self.prefetch_steps}"),
            (not (self.path and self.mix), "mix", "cannot be used together with data.path; give one of them"),
            (all(m.weight >= 0 for m in self.mix), "mix", "weights must be 0 or more"),
            (not self.mix or any(m.weight > 0 for m in self.mix), "mix",
             "needs at least one source with a positive weight"),
            (len({m.name or Path(m.path).name for m in self.mix}) == len(self.mix), "mix",
             "has two sources with the same name; give each a distinct 'name'"),
            *_stage_checks(self),
        ]  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    preset: str = "tiny"  # a name from dist_clm.models.build.PRESETS; ignored when `pretrained` is set
    pretrained: str = ""  # a local Hugging Face model directory to continue pretraining from
    overrides: dict[str, Any] = field(default_factory=dict)  # transformers config fields, e.g. {n_layer: 4}
    rope_theta: float = 0.0  # the base of rotary position embeddings (Llama-style models), e.g. 500000 for long
    # contexts; 0: the preset's or pretrained model's
    rope_scaling: dict[str, Any] = field(default_factory=dict)  # transformers' RoPE scaling for a context longer
    # than the model was trained at, e.g. {rope_type: yarn, factor: 4.0, original_max_position_embeddings: 2048}
    # or {rope_type: linear, factor: 4.0}; empty: none (or the pretrained model's)
    attention: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2"] = "auto"  # transformers'
    # attention implementation while training; auto: with data.document_mask on a GPU, flash_attention_2 where
    # the flash_attn package is installed, else flex_attention where the model has it (Llama, GPT-2: a
    # block-sparse mask from the documents' bounds, not a dense L x L one; not with attention dropout), else
    # sdpa; sdpa otherwise and on CPU (FlexAttention has no backward pass there)
    router_aux_loss_coef: float | None = None  # Mixture-of-Experts models: the weight of the router's
    # load-balancing loss in the training loss (e.g. 0.01); None: the preset's or pretrained model's (transformers'
    # default 0.001)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The loop: how long, how much per step, in which number format, how often it evaluates and logs."""

    max_steps: int = 300  # optimizer steps
    micro_batch_size: int = 8  # blocks per rank per forward/backward
    grad_accum: int = 1  # micro batches per optimizer step
    global_batch_size: int = 0  # blocks per optimizer step over all ranks; when set, grad_accum is derived from
    # it and the world size, so a resume on another number of ranks keeps the same batch (0 = off)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPUs with bf16 tensor cores (A100,
    # H100 and later), fp16 with dynamic loss scaling on older GPUs with fp16 ones (V100, T4: their bf16 is emulated,
    # several times slower), fp32 on the CPU (bf16 also runs there, ~10x slower than fp32 without bf16 instructions)
    tf32: bool = True  # on GPUs, fp32 matrix products (fp32 runs; the fp32 parts of bf16 runs) use TF32 tensor cores
    # (PyTorch's default for convolutions, not for matmuls); false: full fp32 everywhere
    activation_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% slower
    compile: bool | Literal["auto"] = "auto"  # torch.compile the model through DeepSpeed (engine.compile); auto:
    # on GPUs (where it pays; the time the first step took, compilation included, is reported), not on the CPU
    loss_head: Literal["auto", "fused", "plain"] = "auto"  # fused: the output projection and cross-entropy a chunk
    # of the vocabulary at a time, never the whole B x L x vocabulary logits nor a second weight-sized tensor; peaks at
    # or below plain at any micro batch, for one more matrix product per chunk (dist_clm/models/loss_head.py); auto:
    # fused for the model types whose logits are a plain projection (GPT-2, Llama, Mistral, Qwen2), else plain
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: DeepSpeed's Muon (momentum orthogonalized by Newton-Schulz)
    # for the hidden layers' matrices, at optim.muon_lr with optim.muon_momentum; AdamW at optim.lr for embeddings,
    # the output head, norms and biases; ZeRO 1-3, no gradient clipping (optim.grad_clip's default with it)
    seed: int = 1234  # model init, data order, sampling
    log_every: int = 10  # steps between TensorBoard/console scalars
    eval_every: int = 100  # steps between validations (0 = only before and after)
    eval_blocks: int = 32  # validation blocks per evaluation (0 = the whole validation split)
    eval_tasks: list[str] = field(
        default_factory=list
    )  # downstream tasks during training (dist_clm/evaluation/downstream.py:
    # lm-evaluation-harness task names, folders or YAML files of task definitions, or dist_clm_suite), logged as
    # eval/<task>/<metric>; they never change the training (random state kept, weights read only)
    eval_tasks_every: int = 0  # steps between them (0: at every validation, train.eval_every); and at the end
    eval_tasks_limit: int = 0  # the first N examples of each task (0 = all)
    profile_steps: list[int] = field(default_factory=list)  # [first, last]: the PyTorch profiler over these steps
    # (inclusive), with dist_clm's named ranges (data wait, forward, backward, optimizer step, checkpoint,
    # validation, downstream tasks); one trace per rank into RUN/profile/ (TensorBoard's profile plugin, Perfetto)
    profile_ranks: list[int] = field(default_factory=lambda: [0])  # the ranks that record train.profile_steps and
    # train.memory_snapshot_steps
    memory_snapshot_steps: list[int] = field(default_factory=list)  # [first, last], on a GPU: the CUDA allocator's
    # history over these steps, dumped into RUN/memory/ (pytorch.org/memory_viz reads it); an out-of-memory error
    # dumps a snapshot too, whatever this says

    def checks(self) -> list[Check]:
        steps, ranks, memory = self.profile_steps, self.profile_ranks, self.memory_snapshot_steps
        return [
            (
                not memory or (len(memory) == 2 and 1 <= memory[0] <= memory[1]),
                "memory_snapshot_steps",
                f"must be [first, last] with 1 <= first <= last (or [] for none), got {memory}",
            ),
            (
                not steps or (len(steps) == 2 and 1 <= steps[0] <= steps[1]),
                "profile_steps",
                f"must be [first, last] with 1 <= first <= last (or [] for none), got {steps}",
            ),
            (bool(ranks) and all(r >= 0 for r in ranks), "profile_ranks", f"must list ranks (0 or more), got {ranks}"),
            (self.eval_tasks_every >= 0, "eval_tasks_every", f"must be 0 or more, got {self.eval_tasks_every}"),
            (self.eval_tasks_limit >= 0, "eval_tasks_limit", f"must be 0 or more, got {self.eval_tasks_limit}"),
            (self.max_steps >= 1, "max_steps", f"must be at least 1, got {self.max_steps}"),
            (self.micro_batch_size >= 1, "micro_batch_size", f"must be at least 1, got {self.micro_batch_size}"),
            (self.grad_accum >= 1, "grad_accum", f"must be at least 1, got {self.grad_accum}"),
            (self.global_batch_size >= 0, "global_batch_size", f"must be 0 or more, got {self.global_batch_size}"),
            (self.log_every >= 1, "log_every", f"must be at least 1, got {self.log_every}"),
            (self.eval_every >= 0, "eval_every", f"must be 0 or more, got {self.eval_every}"),
            (self.eval_blocks >= 0, "eval_blocks", f"must be 0 or more, got {self.eval_blocks}"),
        ]


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """The optimizer's settings (AdamW's; Muon's) and the learning-rate schedule (parallel/engine.py turns them into
    DeepSpeed's)."""

    lr: float = 2e-3  # peak learning rate, reached after warmup
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio at train.max_steps
    warmup_steps: int | float = 0.1  # linear warmup from 0 over this many steps, or (below 1) this fraction of
    # train.max_steps: 0.1 warms up over 30 steps of 300, 2 of 20
    schedule: Literal["cosine", "linear", "wsd"] = "cosine"  # after warmup: cosine or linear decay, or WSD
    # (warmup-stable-decay: constant lr, then a linear decay over the last decay_fraction of the steps)
    decay_fraction: float = 0.2  # WSD only
    weight_decay: float = 0.1  # AdamW decay, applied to matrices only (not norms, biases, embeddings)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = None  # clip the global gradient norm to this (0 = off); default: 1 with AdamW, off
    # with Muon (DeepSpeed would clip Muon's orthogonalized update, not the gradient)
    muon_lr: float = 0.02  # train.optimizer=muon: the peak learning rate of the Muon matrices (the schedule scales
    # it as it scales lr; lr is then the AdamW parameters')
    muon_momentum: float = 0.95  # train.optimizer=muon: Muon's (Nesterov) momentum

    def clip(self, optimizer: str) -> float:
        """The gradient-norm clip for train.optimizer: grad_clip, or its default for that optimizer."""
        return self.grad_clip if self.grad_clip is not None else (0.0 if optimizer == "muon" else 1.0)

    def warmup(self, max_steps: int) -> int:
        """The warmup in steps for a run of `max_steps`: warmup_steps, or its fraction of them rounded."""
        w = self.warmup_steps
        return round(w * max_steps) if isinstance(w, float) and w < 1 else int(w)

    def checks(self) -> list[Check]:
        return [
            (self.muon_lr > 0, "muon_lr", f"must be positive, got {self.muon_lr}"),
            (0 <= self.muon_momentum < 1, "muon_momentum", f"must be in [0, 1), got {self.muon_momentum}"),
            (self.lr > 0, "lr", f"must be positive, got {self.lr}"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be between 0 and 1, got {self.min_lr_ratio}"),
            (self.warmup_steps >= 0, "warmup_steps", f"must be 0 or more, got {self.warmup_steps}"),
            (
                self.warmup_steps < 1 or float(self.warmup_steps).is_integer(),
                "warmup_steps",
                f"must be a whole number of steps or a fraction of train.max_steps below 1, got {self.warmup_steps}",
            ),
            (0 < self.decay_fraction <= 1, "decay_fraction", f"must be in (0, 1], got {self.decay_fraction}"),
            (
                self.grad_clip is None or self.grad_clip >= 0,
                "grad_clip",
                f"must be 0 (off) or positive, got {self.grad_clip}",
            ),  # fmt: skip
        ]


@dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    """What the run minimizes (dist_clm/training/objectives.py)."""

    kind: Literal["auto", "clm", "sft", "dpo", "orpo"] = "auto"  # clm: next-token loss on every token, the mean of
    # each micro batch; sft: on the learned tokens of fine-tuning data only (its loss mask), averaged over the
    # learned tokens of the whole step (all ranks and micro batches); dpo / orpo: preference pairs (prepare
    # --format preference; dpo needs the reference values of prepare-reference), averaged over the step's pairs;
    # auto: sft for fine-tuning data, dpo for preference data, clm otherwise (settled before training starts)
    dpo_beta: float = 0.1  # DPO's beta: the strength of the pull towards the reference model
    orpo_lambda: float = 0.1  # ORPO's weight of the odds-ratio term beside the chosen answers' NLL

    def checks(self) -> list[Check]:
        return [
            (self.dpo_beta > 0, "dpo_beta", f"must be positive, got {self.dpo_beta}"),
            (self.orpo_lambda >= 0, "orpo_lambda", f"must be 0 or more, got {self.orpo_lambda}"),
        ]


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """When checkpoints are written, how many are kept, and whether a run continues from them."""

    save_every: int = 100  # steps between checkpoints (0 = only at the end)
    keep_last: int = 2  # complete checkpoints to keep
    async_save: bool = True  # the step loop waits only for a host copy of the checkpoint; a background thread
    # writes it, and it counts as complete (complete.json) at the first step boundary after every rank's files
    # are durable. Costs host memory for one copy of each rank's share while it is written
    resume: bool = True  # resume automatically from the latest complete checkpoint in run.dir

    def checks(self) -> list[Check]:
        return [
            (self.save_every >= 0, "save_every", f"must be 0 or more, got {self.save_every}"),
            (self.keep_last >= 1, "keep_last", f"must be at least 1, got {self.keep_last}"),
        ]


@dataclass(frozen=True, kw_only=True)
class StabilityConfig:
    """What counts as a bad step and what happens then (dist_clm/training/stability.py)."""

    max_bad_steps: int = 3  # steps in a row with a non-finite loss or gradient norm (each one skipped, never
    # applied) before rolling back to the last checkpoint past the data that led there (0 = never roll back)
    spike_factor: float = 2.0  # clm and sft: a step loss above this x the mean of the last spike_window good steps
    # is not applied and rolls back the same way (with no checkpoint yet, training goes on without it); dpo and orpo,
    # whose losses are noisy by nature, use the median of those steps + 10 robust spreads instead (0 = off for all)
    spike_window: int = 50  # good steps in the running mean that spikes are measured against
    max_rollbacks: int = 5  # rollbacks in one process before giving up with an error
    fault_injection: str = ""  # drills and tests only: "STEP:KIND[@RANK],..." multiplies step STEP's loss
    # (KIND nan, inf or xF; or sleepS, a pause of S seconds; see training/stability.py); announced in the log and
    # as faults/injected in TensorBoard

    def checks(self) -> list[Check]:
        return [
            (self.max_bad_steps >= 0, "max_bad_steps", f"must be 0 or more, got {self.max_bad_steps}"),
            (
                self.spike_factor == 0 or self.spike_factor > 1,
                "spike_factor",
                f"must be 0 (off) or more than 1, got {self.spike_factor}",
            ),
            (self.spike_window >= 1, "spike_window", f"must be at least 1, got {self.spike_window}"),
            (self.max_rollbacks >= 0, "max_rollbacks", f"must be 0 or more, got {self.max_rollbacks}"),
        ]


@dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """How the ranks share the model and wait for each other (DeepSpeed's ZeRO, offload, collectives)."""

    zero_stage: int = 2  # DeepSpeed ZeRO stage, 0-3
    offload_optimizer: bool = False  # ZeRO 1-3: optimizer state and step on the CPU (DeepSpeed's CPU Adam)
    offload_params: bool = False  # ZeRO 3: parameters on the CPU between uses
    sequence_parallel_size: int = 1  # ranks that share each block, each training on its own slice of the tokens
    # (DeepSpeed's Ulysses; parallel/sequence_parallel.py): for blocks longer than one GPU's activations hold. It
    # must divide the ranks, the attention heads and every block size; the global batch still counts blocks, so
    # it changes nothing in the math (a run may resume at another size)
    tensor_parallel_size: int = 1  # ranks that split each layer's matrices (DeepSpeed's AutoTP; parallel/
    # tensor_parallel.py): consecutive ranks of a node form a group and read the same micro batches; it must divide
    # the ranks on each node, the heads, key/value heads, MLP width and vocabulary. Llama- and Qwen3-style models
    tensor_parallel_across_nodes: bool = False  # allow a tensor-parallel group to span nodes (its all-reduces, two per
    # layer and pass, then cross the network: slow unless the nodes share NVLink)
    deepspeed_config: str = ""  # a DeepSpeed JSON merged over the generated one (see dist_clm/parallel/engine.py)
    collective_timeout_s: float = 300.0  # from the second step on, a collective that waits longer ends the run:
    # a rank died or stalled; every rank stops, naming it, with exit 75 (rerun / requeue resumes). Set-up,
    # checkpoint saves and loads may wait 30 min; downstream tasks (train.eval_tasks) as long as they take, unless
    # rank 0's heartbeat stands still this long

    @property
    def ranks_per_batch(self) -> int:
        """Ranks that read the same micro batches: a sequence- or tensor-parallel group (they never combine)."""
        return self.sequence_parallel_size * self.tensor_parallel_size

    def checks(self) -> list[Check]:
        return [
            (self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}"),
            (
                self.sequence_parallel_size >= 1,
                "sequence_parallel_size",
                f"must be 1 (off) or more, got {self.sequence_parallel_size}",
            ),
            (
                self.tensor_parallel_size >= 1,
                "tensor_parallel_size",
                f"must be 1 (off) or more, got {self.tensor_parallel_size}",
            ),
            (
                self.tensor_parallel_size == 1 or self.sequence_parallel_size == 1,
                "tensor_parallel_size",
                f"is {self.tensor_parallel_size} and distributed.sequence_parallel_size "
                f"{self.sequence_parallel_size}, but DeepSpeed's AutoTP builds a mesh of data and tensor parallelism "
                "only (no sequence dimension), so the two cannot combine; set one of them to 1",
            ),
            (
                not self.offload_params or self.zero_stage == 3,
                "offload_params",
                "needs distributed.zero_stage=3 (only ZeRO-3 partitions parameters)",
            ),
            (
                not self.offload_optimizer or self.zero_stage >= 1,
                "offload_optimizer",
                "needs distributed.zero_stage 1, 2 or 3",
            ),
            (
                self.collective_timeout_s > 0,
                "collective_timeout_s",
                f"must be above 0, got {self.collective_timeout_s}",
            ),
        ]


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole run's settings, one section per owner; frozen once built (preflight.settle derives the one config
    a run trains with, its objective and document mask settled from the data)."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self) -> Config:
        """Each section's checks, then the few that span two; each failure names the key and what to do."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            for ok, key, problem in getattr(section, "checks", list)():
                if not ok:
                    raise ConfigError(f"config key '{f.name}.{key}' {problem}.")
        o, t = self.optim, self.train
        if o.warmup(t.max_steps) >= t.max_steps:
            raise ConfigError(
                f"config key 'optim.warmup_steps' must be below train.max_steps ({t.max_steps}), got {o.warmup_steps}; "
                "or give it as a fraction of the steps (e.g. optim.warmup_steps=0.05)."
            )
        return self

    def replace(self, **sections: dict[str, Any]) -> Config:
        """A new config with some fields of some sections changed, e.g. replace(data={"document_mask": True})."""
        changed = {name: dataclasses.replace(getattr(self, name), **fields) for name, fields in sections.items()}
        return dataclasses.replace(self, **changed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# the keys a section of its own now holds, refused where they stood before with the new key named
MOVED = {
    **{f"train.{k}": f"optim.{k}" for k in (f.name for f in dataclasses.fields(OptimConfig))},
    **{f"train.{k}": f"checkpoint.{k}" for k in (f.name for f in dataclasses.fields(CheckpointConfig))},
    **{f"train.{k}": f"stability.{k}" for k in (f.name for f in dataclasses.fields(StabilityConfig))},
    **{f"train.{k}": f"distributed.{k}" for k in (f.name for f in dataclasses.fields(DistributedConfig))},
    "train.objective": "objective.kind",
    "train.dpo_beta": "objective.dpo_beta",
    "train.orpo_lambda": "objective.orpo_lambda",
}


# the settings whose change makes a resumed run another training: its math (the model, the data's shape, the
# optimizer, the schedule's shape, the precision, the seed); the data and the batch are the data part's to check
MATH_KEYS = (
    "model.preset", "model.pretrained", "model.overrides", "model.rope_theta", "model.rope_scaling",
    "model.router_aux_loss_coef",
    "data.block_size", "data.document_mask", "data.shuffle",
    "train.seed", "train.precision", "train.optimizer",
    "optim.lr", "optim.min_lr_ratio", "optim.warmup_steps", "optim.schedule", "optim.decay_fraction",
    "optim.muon_lr", "optim.muon_momentum", "optim.weight_decay", "optim.beta1", "optim.beta2", "optim.eps",
    "optim.grad_clip",
    "objective.kind", "objective.dpo_beta", "objective.orpo_lambda",
)  # fmt: skip


class Settings:
    """The part of a checkpoint that says which training it is (checkpoint.Stateful): the MATH_KEYS. A resume
    with any of them changed is another training, refused naming each one. Free choices stay free: the length
    of the run (to extend it), the ZeRO stage and the number of ranks (elastic resume), intervals, logging,
    offload, compilation."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def state_dict(self) -> dict:
        flat = _flat(self.cfg.to_dict())
        return {key: flat.get(key) for key in MATH_KEYS}

    def load_state_dict(self, state: dict) -> None:
        from dist_clm.errors import Mismatch

        now = self.state_dict()  # (a key the checkpoint predates was at its default then)
        defaults = Settings(Config()).state_dict()
        changes = [f"{k}: {state.get(k, defaults[k])!r} -> {now[k]!r}" for k in MATH_KEYS
                   if state.get(k, defaults[k]) != now[k]]  # fmt: skip
        if changes:
            raise Mismatch(changes)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in ("model.overrides", "model.rope_scaling"):
            out |= _flat(value, f"{name}.")
        else:
            out[name] = value
    return out


def _stage_checks(d: DataConfig) -> list[Check]:
    """data.stages: weights over data.mix's training sources, each stage with a positive weight, block sizes of at
    least 2, in step order."""
    if not d.stages:
        return []
    trained = {m.name or Path(m.path).name for m in d.mix if m.weight > 0}
    untils = [s.until for s in d.stages[:-1]]
    weighed = [s.weights for s in d.stages if s.weights is not None]
    named = {n for w in weighed for n in w}
    last = d.stages[-1].until
    return [
        (bool(d.mix) or not weighed, "stages", "weighs the sources of data.mix; list the prepared directories there"),
        (
            all(s.block_size == 0 or s.block_size >= 2 for s in d.stages),
            "stages",
            "block sizes must be at least 2 (or 0: the previous stage's)",
        ),
        (
            named <= trained,
            "stages",
            f"names {', '.join(sorted(named - trained))}, not a data.mix source with a weight above 0 "
            f"(those are: {', '.join(sorted(trained))})",
        ),
        (all(v >= 0 for w in weighed for v in w.values()), "stages", "weights must be 0 or more"),
        (
            all(any(v > 0 for v in w.values()) for w in weighed),
            "stages",
            "has a stage without a positive weight; give each stage at least one",
        ),
        (
            all(u >= 1 for u in untils)
            and untils == sorted(set(untils))
            and (last == 0 or not untils or last > untils[-1]),
            "stages",
            f"'until' steps must rise from stage to stage (got {[s.until for s in d.stages]}; the last may be 0)",
        ),
    ]


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, {dict: "a mapping", list: "a list"}.get(origin, str(tp))
    )


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where no information is lost."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is dict:
        if isinstance(value, dict):
            kt, vt = typing.get_args(tp) or (Any, Any)
            return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    elif tp is Any or (tp is type(None) and value is None):
        return value
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            if dataclasses.is_dataclass(item):
                return [_build(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is not None and len(args) == 1:  # (optional: what is wrong inside the value is named)
            return _coerce(value, args[0], key)
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string; accept it as the number it means
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}.")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        where = f"section '{prefix}'" if prefix else "the config file"
        raise ConfigError(f"{where} must be a mapping of keys to values, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if full in MOVED:
            new = MOVED[full]
            raise ConfigError(
                f"config key '{full}' is now '{new}' (section {new.split('.')[0]}); write {new}=... on the command "
                f"line, or `{new.split('.')[1]}:` under `{new.split('.')[0]}:` in a YAML file."
            )
        if key not in names:
            raise ConfigError(f"config key '{full}' is unknown; valid keys here are: {', '.join(names)}.")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full)
        else:
            kwargs[key] = _coerce(value, tp, full)
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key '{prefix}.{f.name}' is required here.")
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}' goes inside '{part}', which is not a section.")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`optim.lr=3e-4` -> ("optim.lr", "3e-4" as YAML reads it)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override '{text}' is not of the form section.key=value (e.g. optim.lr=3e-4).")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


ENV_OVERRIDES = "DIST_CLM_OVERRIDES"


def env_overrides() -> list[str]:
    """`section.key=value` words from DIST_CLM_OVERRIDES, which a command applies after its own: settings for
    every run started from a shell or a site (e.g. train.max_steps=4 to rehearse a script's commands)."""
    import shlex

    return shlex.split(os.environ.get(ENV_OVERRIDES, ""))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at `path` (if any), then `overrides` (`section.key=value`)."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file '{p}' does not exist; pass the path of a YAML file such as configs/tiny-cpu.yaml."
            )
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file '{p}' is not valid YAML{where}; fix its syntax.") from None
        if loaded is not None:
            if not isinstance(loaded, dict):
                sections = ", ".join(f.name for f in dataclasses.fields(Config))
                raise ConfigError(f"config file '{p}' must hold a mapping of sections ({sections}).")
            tree = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return _build(Config, tree, "").validate()
