"""Setting up a training run: its data sources, tokenizer, model and settings, all checked; the run directory
(locked for this run); the parts a checkpoint carries, each continuing from the newest checkpoint if it can
(before anything is written); the run directory's config.yaml, tokenizer/ and ds_config.json; the DeepSpeed
engine, with its state from that checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_clm import console
from dist_clm.checkpointing import rundir
from dist_clm.checkpointing.checkpointer import Checkpointer, RandomState, Stateful
from dist_clm.checkpointing.rundir import RunOwner, claim, write_run_files
from dist_clm.config import Config, Settings
from dist_clm.data.loader import TrainLoader
from dist_clm.data.order import DataPosition, Source
from dist_clm.data.reference_store import read_record
from dist_clm.data.run_data import check_sources, run_tokenizer, training_sources
from dist_clm.errors import Mismatch, UserError, agreed
from dist_clm.models import attention, loss_head, moe
from dist_clm.models.build import Shape, active_params, count_params, flops_per_token
from dist_clm.parallel import fit, partitioned, sequence_parallel, tensor_parallel
from dist_clm.parallel.collectives import agree_on_error, barrier
from dist_clm.parallel.engine import (
    deepspeed_config,
    muon_flags,
    param_groups,
    resolve_grad_accum,
    resolve_precision,
    scheduler_factory,
    use_tf32,
)
from dist_clm.parallel.process_group import DistEnv, describe
from dist_clm.training import objectives
from dist_clm.training.preemption import ignore_stop_signals
from dist_clm.training.preflight import settle
from dist_clm.training.stability import LossGuard


@dataclass
class Progress:
    """The loop's counters (a checkpoint part)."""

    step: int = 0  # optimizer steps applied or skipped (a rollback sets it back)
    tokens_seen: int = 0  # training tokens of those steps (skipped data windows are not counted)

    def advance(self, tokens: int) -> None:
        self.step += 1
        self.tokens_seen += tokens

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]


@dataclass
class Run:
    """What a training run is made of once set up; the loop, validation and checkpoints work on it."""

    cfg: Config
    env: DistEnv
    sources: list[Source]  # every prepared directory, validation-only ones (weight 0) included
    engine: Any  # the DeepSpeed engine; engine.module is the transformers model
    scheduler: Any  # the learning-rate schedule DeepSpeed steps
    grad_accum: int  # micro batches per optimizer step on this world size
    precision: str  # bf16, fp16 or fp32
    n_params: int
    flops_per_token: float  # training FLOPs per token (forward + backward), for MFU
    owner: RunOwner  # rank 0's lock on the run directory, released by train() at the end
    objective: objectives.Objective  # what the run minimizes (objective.kind, settled from the data)
    parts: dict[str, Stateful]  # what a checkpoint carries besides the engine and RandomState (make_parts)
    random: RandomState  # this rank's random generators (a part of its own: a file per rank)
    checkpointer: Checkpointer
    resumed_from: Path | None  # the checkpoint the run continues, or None: a fresh start
    sp: sequence_parallel.SequenceParallel = sequence_parallel.SequenceParallel()  # (size 1: none)
    tp: tensor_parallel.TensorParallel = tensor_parallel.TensorParallel()  # (size 1: none)
    router: moe.RouterLoad | None = None  # a Mixture-of-Experts model's router load (models/moe.py), or None

    @property
    def progress(self) -> Progress:
        return self.parts["progress"]

    @property
    def position(self) -> DataPosition:
        return self.parts["data"]

    @property
    def guard(self) -> LossGuard:
        return self.parts["guard"]

    @property
    def dp(self) -> tuple[int, int]:
        """(this rank's data-parallel rank, how many there are): a sequence- or tensor-parallel group reads as one."""
        group = self.cfg.distributed.ranks_per_batch
        return self.env.rank // group, self.env.world_size // group

    @property
    def eval_share(self) -> tuple[int, int, bool]:
        """(this rank's share, how many shares, whether it counts its sums) of a validation or evaluation pass:
        a tensor-parallel group computes its forward passes together, on one share, counted once; every other rank
        scores a share of its own (sequence parallelism shards the training passes only)."""
        if self.tp.size == 1:
            return self.env.rank, self.env.world_size, True
        return *self.dp, self.tp.counts()

    @property
    def counts(self) -> bool:
        """Whether this rank counts its micro batches' blocks and tokens, and its validation sums: one rank of each
        group that shares them does."""
        return self.sp.counts() and self.tp.counts()

    @property
    def global_batch(self) -> int:
        """Blocks per optimizer step over all ranks."""
        return self.dp[1] * self.cfg.train.micro_batch_size * self.grad_accum

    @property
    def source_names(self) -> list[str]:
        """The sources trained on, in the loader's order."""
        return [s.name for s in self.sources if s.weight > 0]

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.position.block_size_at()  # (of the step the data position stands at)

    @property
    def compiled(self) -> bool:
        return bool(getattr(self.engine, "is_compiled", False))

    @property
    def zero0_fp32(self) -> bool:
        """ZeRO-0 in fp32, the one setting where DeepSpeed has no overflow path to skip a bad update."""
        return self.cfg.distributed.zero_stage == 0 and self.precision == "fp32"

    def blank_batch(self) -> dict[str, torch.Tensor]:
        """A micro batch of token 0 standing in for one that could not be read (it is never applied)."""
        shape = (self.cfg.train.micro_batch_size, self.position.block_size_at())
        batch = {"input_ids": torch.zeros(shape, dtype=torch.int64), "labels": torch.zeros(shape, dtype=torch.int64),
                 "source": torch.zeros(shape[0], dtype=torch.int64)}  # fmt: skip
        if self.cfg.data.document_mask:
            batch["position_ids"] = torch.arange(shape[1]).expand(shape).contiguous()
        return batch

    def loader(self) -> TrainLoader:
        """This rank's training batches, from where the data position stands."""
        rank, world = self.dp  # (every rank of a sequence- or tensor-parallel group reads the same blocks)
        return TrainLoader.from_config(
            self.cfg.data, self.cfg.train, self.sources, self.position, rank=rank, world=world,
            grad_accum=self.grad_accum, pin_memory=self.env.device != "cpu",
            worker_init=ignore_stop_signals,  # a signal to the process group is for the main process
        )  # fmt: skip


def setup(cfg: Config, env: DistEnv, world: list[dict]) -> Run:
    """Collective (deepspeed.initialize): the run per `cfg` on this rank, from freshly initialised weights.
    `world` is distributed.world_table's, written to RUN/ranks.json."""
    import deepspeed

    problem, parts = None, None
    try:
        parts = _checked(cfg, env, world)
    except UserError as e:
        problem = e
    agree_on_error(problem, env.device)  # a bad setting stops every rank alike, none waits for another
    cfg, sources, tok, model, grad_accum, ds_config, precision, fused = parts  # (cfg: settled from the data)
    t, ckpt = cfg.train, cfg.checkpoint
    n_params, active = count_params(model), active_params(model)
    flops = flops_per_token(model.config, active, cfg.data.block_size)
    sparse = f" ({active / 1e6:.2f} M active per token)" if active < n_params else ""
    d = cfg.distributed
    dp = env.world_size // d.ranks_per_batch
    groups = ""
    if d.tensor_parallel_size > 1:
        where = "" if d.tensor_parallel_across_nodes else ", each on one node"
        groups = f", {dp} tensor-parallel group(s) of {d.tensor_parallel_size} consecutive ranks{where}"
    console.info(
        f"model: {model.config.model_type}, {n_params / 1e6:.2f} M parameters{sparse}, {flops / 1e6:.1f} MFLOPs per "
        f"token; {describe(world)} on {env.device}, {precision}, ZeRO-{d.zero_stage}{groups}, attention "
        f"{model.config._attn_implementation}",
    )
    owner = claim(cfg.run.dir, env)  # the first write
    objective = objectives.for_run(cfg.objective, cfg.stability.spike_factor)
    size, mpu, sp = cfg.distributed.sequence_parallel_size, None, sequence_parallel.SequenceParallel()
    if size > 1:  # (collective: the groups)
        mpu = sequence_parallel.groups(size)
        sp = sequence_parallel.install(model, size, mpu)
    global_batch = env.world_size // cfg.distributed.ranks_per_batch * t.micro_batch_size * grad_accum
    checkpointer = Checkpointer(cfg.run.dir, ckpt.keep_last, env, cfg.distributed.zero_stage, 16 * n_params,
                                ckpt.async_save, cfg.distributed.tensor_parallel_size)  # fmt: skip
    parts, resumed_from = resume(checkpointer, lambda: make_parts(cfg, env, sources, global_batch, objective), cfg,
                                 env)  # fmt: skip
    if env.is_main:
        write_run_files(cfg.run.dir, cfg.to_dict(), tok, ds_config, world)
    with muon_flags(model, t.optimizer):
        engine, _, _, scheduler = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, cfg.optim.weight_decay),
            config=ds_config,
            lr_scheduler=scheduler_factory(cfg.optim, t.max_steps),
            mpu=mpu,
        )
    sp = sequence_parallel.fit_reduction(sp, engine)  # (the loss scale DeepSpeed's gradient reduction needs)
    tp = tensor_parallel.TensorParallel()
    if cfg.distributed.tensor_parallel_size > 1:  # (AutoTP replaced the sharded layers, the output head among them)
        tp = tensor_parallel.install(engine)
        output_head(engine.module, fused, cfg.data.document_mask, tp.group)
    router = moe.RouterLoad(model) if moe.is_moe(model.config) else None
    random = RandomState(env)
    if resumed_from is not None:
        checkpointer.load_engine(engine, resumed_from, random)
    if t.compile is True or (t.compile == "auto" and env.device != "cpu"):
        engine.compile()
    return Run(cfg, env, sources, engine, scheduler, grad_accum, precision, n_params, flops, owner, objective, parts,
               random, checkpointer, resumed_from, sp, tp, router)  # fmt: skip


def make_parts(cfg: Config, env: DistEnv, sources: list[Source], global_batch: int, objective) -> dict[str, Stateful]:
    """The parts of a run that a checkpoint carries as JSON, at their start."""
    st = cfg.stability
    return {
        "progress": Progress(),
        "settings": Settings(cfg),
        "data": DataPosition.from_config(cfg.data, cfg.run.dir, sources, global_batch, writes=env.is_main),
        "guard": LossGuard(st.max_bad_steps, objective.spike_rule(), st.spike_window),
    }


def resume(checkpointer: Checkpointer, make, cfg: Config, env: DistEnv) -> tuple[dict[str, Stateful], Path | None]:
    """Collective, before the run writes anything: its parts (`make()`), each continuing from the newest
    checkpoint it can be loaded from whole, or at their start when there is none (the checkpoint, or None). A part
    that cannot continue refuses, naming what changed, and so does checkpoint.resume=false in a directory with
    checkpoints; with run.overwrite=true the earlier run's outputs are deleted instead and the run starts afresh."""
    parts, run_dir = make(), Path(cfg.run.dir)
    tag_dir = checkpointer.choose()
    if tag_dir is None:
        return parts, None
    fresh = "choose a new run.dir, or set run.overwrite=true to delete its checkpoints and start afresh"
    if not cfg.checkpoint.resume:
        why = "checkpoint.resume=false"
        refusal = (
            f"checkpoint.resume=false but run directory '{run_dir}' holds checkpoints (the newest: {tag_dir.name}); "
        )
    else:
        try:
            checkpointer.load_parts(tag_dir, parts)
            return parts, tag_dir
        except Mismatch as e:
            why = "; ".join(e.changes)
            refusal = f"run directory '{run_dir}' holds checkpoints of another training ({why}); resume with the "
            refusal += "same settings, "
    if not cfg.run.overwrite:
        raise agreed(UserError(refusal + fresh + "."))  # (every rank read the same checkpoint)
    if env.is_main:
        rundir.clear(run_dir, why)
    barrier()
    return make(), None


def check_reference(sources: list[Source], model) -> None:
    """dpo: the stored reference values were computed with the model this run starts from (the same weights)."""
    from dist_clm.training.preference import weights_fingerprint

    (source,) = [s for s in sources if s.weight > 0]
    stored = read_record(source.path)
    mine = weights_fingerprint(model)
    if stored["weights"] != mine:
        raise UserError(
            f"the reference values of '{source.path}' were computed with another model ({stored['model']}, weights "
            f"{stored['weights']}) than this run starts from (weights {mine}); recompute them with `dist-clm "
            "prepare-reference` and the model in model.pretrained, or train from that model."
        )


def _checked(cfg: Config, env: DistEnv, world: list[dict]) -> tuple:
    """The settled config, sources, tokenizer, model, accumulation, DeepSpeed config, precision and whether the
    loss head is the fused one, every check passed."""
    sources = training_sources(cfg.data)
    given, cfg = cfg.data.block_size, settle(cfg, sources)
    if cfg.data.block_size != given:
        console.info(f"data.block_size is {cfg.data.block_size}, the size the fine-tuning data packs its "
                     f"conversations into (not {given})")  # fmt: skip
    t = cfg.train
    tok = run_tokenizer(sources)
    d = cfg.distributed
    size = d.sequence_parallel_size
    fit.check_world(d, env.world_size)
    fit.check_tensor_parallel_nodes(d.tensor_parallel_size, world, d.tensor_parallel_across_nodes)
    grad_accum = resolve_grad_accum(t, env.world_size // d.ranks_per_batch)  # (data-parallel ranks: a group is one)
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    on_gpu = env.device != "cpu"
    precision = resolve_precision(t.precision, on_gpu)
    use_tf32(t.tf32, on_gpu)
    choices = attention.attention_for(cfg.model.attention, cfg.data.document_mask, on_gpu, precision)
    m = cfg.model
    # under ZeRO-3 the model is built or loaded partitioned, never whole on a rank (parallel/partitioned.py)
    building = deepspeed_config(t, cfg.optim, cfg.distributed, on_gpu=on_gpu, grad_accum=grad_accum)
    with partitioned.construction(building):
        model = attention.build_model_with(choices, m.preset, m.pretrained, m.overrides, tok, cfg.data.document_mask,
                                           rope=(m.rope_theta, m.rope_scaling))  # fmt: skip
    if not m.pretrained:
        partitioned.initialize(model, t.seed)  # (the same initial weights whatever the stage and the ranks)
    moe.apply_router_settings(model, m.router_aux_loss_coef)
    if cfg.objective.kind == "dpo":
        check_reference(sources, model)
    fused = t.loss_head != "plain" and loss_head.fits(model.config)
    if t.loss_head == "fused" and not fused:
        raise UserError(
            f"config key 'train.loss_head' is 'fused' but {model.config.model_type} models are not known to compute "
            f"their logits as a plain projection ({', '.join(loss_head.PLAIN_HEADS)} are); use auto or plain."
        )
    shape = Shape.of(model.config)
    fit.check_sequence_parallel(shape, size, cfg.data.block_sizes())
    fit.check_tensor_parallel(shape, d.tensor_parallel_size)
    if d.tensor_parallel_size == 1:  # (else once AutoTP has replaced the output head: setup)
        output_head(model, fused, cfg.data.document_mask)
    fit.check_positions(shape, cfg.data.block_sizes(), cfg.data.block_size)
    check_sources(sources, tok, model.config.vocab_size, cfg.model.pretrained)
    ds_config = deepspeed_config(t, cfg.optim, cfg.distributed, on_gpu=on_gpu, grad_accum=grad_accum,
                                 leaf_modules=moe.leaf_classes(model))  # fmt: skip
    if t.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return cfg, sources, tok, model, grad_accum, ds_config, precision, fused


def output_head(model, fused: bool, document_mask: bool, group=None) -> None:
    """The fused loss head where the run uses it (over a vocabulary split across tensor-parallel `group`), then
    flash attention's document bounds where it needs them (they call the head with the bounds; under sequence
    parallelism they serve the whole rows of validation)."""
    if fused:
        loss_head.install(model, group=group)
    if document_mask and model.config._attn_implementation == attention.FLASH:
        attention.feed_documents(model)
