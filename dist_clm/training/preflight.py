"""Before the process group: the config a run trains with, settled from its data (objective.kind,
data.document_mask, a fine-tuning source's block size), and every check that needs only that config, the data's
manifests, the model's shape and the number of ranks. They run before torch.distributed, DeepSpeed or the model is
touched (this module imports none of them), so a mistake answers in a second rather than after the model is built;
set-up runs them again on the built model, where the ranks agree on the first error. `dist-clm train` (and `launch
slurm`, for the job's nodes) also asks the memory plan whether the run fits (check_memory): a run that cannot is
refused here rather than killed by the kernel minutes after the model is built."""

from __future__ import annotations

import dataclasses

from dist_clm import console
from dist_clm.config import Config
from dist_clm.data.format import read_manifest
from dist_clm.data.order import Source
from dist_clm.data.reference_store import read_record
from dist_clm.data.run_data import check_vocab, training_sources
from dist_clm.errors import UserError, agreed
from dist_clm.models.build import model_shape
from dist_clm.parallel import fit, memory_plan
from dist_clm.parallel.engine import deepspeed_config, resolve_grad_accum


def preflight(cfg: Config, world: int, one_node: bool = True, plan_check: bool = False) -> Config:
    """`cfg` settled from the data for `world` ranks, or the first mistake in it as one sentence. With ranks on
    several nodes the data's files are read after the process group forms instead, so that a node which sees other
    files than the rest stops every rank with the same sentence rather than leaving them waiting for it. Every
    rank meets the same error here (the same config; on one node the same files), so the main rank alone says it.
    `plan_check`: also refuse a run the memory plan says this machine cannot hold (check_memory)."""
    try:
        return _preflight(cfg, world, one_node, plan_check)
    except UserError as e:
        raise agreed(e) from None


def check_memory(cfg: Config, machine: memory_plan.Machine, vocab: int | None) -> None:
    """One sentence when the memory plan of `cfg` does not fit `machine` (naming its biggest term and the first
    lever); nothing when the model's vocabulary is unknown (a preset whose data is read after the group forms)."""
    m = cfg.model
    if vocab is None and not m.pretrained and "vocab_size" not in m.overrides:
        return
    try:
        pl = memory_plan.plan(cfg, memory_plan.size_of_run(cfg, vocab), machine)
    except (KeyError, TypeError, ValueError) as e:  # (a config.json or override the counts do not read: no plan)
        console.warning(f"no memory plan for this run ({type(e).__name__}: {e}); starting without its check.")
        return
    if not pl.fits:
        raise UserError(memory_plan.refusal(pl))


def data_vocab(cfg: Config) -> int | None:
    """The vocabulary of the run's data (the tokenizer in its first source's manifest), where that manifest can be
    read from here; None otherwise (no data given, or data only the compute nodes see)."""
    first = cfg.data.mix[0].path if cfg.data.mix else cfg.data.path
    if not first:
        return None
    try:
        return read_manifest(first)["tokenizer"]["vocab_size"]
    except (UserError, OSError, KeyError):
        return None


def _preflight(cfg: Config, world: int, one_node: bool, plan_check: bool = False) -> Config:
    d, t, m = cfg.distributed, cfg.train, cfg.model
    fit.check_world(d, world)
    if (t.profile_steps or t.memory_snapshot_steps) and max(t.profile_ranks) >= world:
        raise UserError(f"train.profile_ranks={t.profile_ranks} names a rank this run of {world} rank(s) does not "
                        f"have; list ranks below {world}.")  # fmt: skip
    grad_accum = resolve_grad_accum(t, world // d.ranks_per_batch)
    # (the precision is resolved on the device, after the process group forms)
    deepspeed_config(dataclasses.replace(t, precision="fp32"), cfg.optim, d, on_gpu=False, grad_accum=grad_accum)
    sources = None
    if one_node:
        sources = training_sources(cfg.data)
        cfg = settle(cfg, sources)
    if m.pretrained and not one_node:
        return cfg
    shape = model_shape(m.preset, m.pretrained, m.overrides)
    if shape is not None:
        fit.check_sequence_parallel(shape, d.sequence_parallel_size, cfg.data.block_sizes())
        fit.check_tensor_parallel(shape, d.tensor_parallel_size)
        fit.check_positions(shape, cfg.data.block_sizes(), cfg.data.block_size)
        if sources is not None and shape.vocab is not None:
            check_vocab(sources, shape.vocab)
    if plan_check and shape is not None and shape.model_type in memory_plan.FAMILY_DEFAULTS:
        vocab = sources[0].manifest["tokenizer"]["vocab_size"] if sources else None
        check_memory(cfg, memory_plan.machine_here(world, one_node), vocab)
    return cfg


def settle(cfg: Config, sources: list[Source]) -> Config:
    """The config the run trains with: objective.kind, data.document_mask and (fine-tuning data) data.block_size
    settled from the data, so that config.yaml and the resume check see the values trained with; every
    fine-tuning check passed."""
    tuned = [s for s in sources if s.weight > 0 and "fine_tuning" in s.manifest]
    paired = [s for s in tuned if s.manifest["fine_tuning"].get("pairs")]
    kind = cfg.objective.kind
    if kind == "auto":
        kind = "dpo" if paired else "sft" if tuned else "clm"
    mask = bool(tuned) if cfg.data.document_mask is None else cfg.data.document_mask
    cfg = cfg.replace(objective={"kind": kind}, data={"document_mask": mask})
    if kind in ("dpo", "orpo"):
        check_preference(cfg, tuned, paired)
    elif paired:
        raise UserError(
            f"'{paired[0].path}' holds preference pairs, which train with objective.kind dpo or orpo, not {kind}."
        )
    if kind == "sft" and not tuned:
        raise UserError(
            "config key 'objective.kind' is sft but no training source is fine-tuning data; prepare it with "
            "`dist-clm prepare --format chat` (or prompt-completion), or use clm."
        )
    packed = sorted({s.manifest["fine_tuning"]["block_size"] for s in tuned})
    if len(packed) > 1:
        raise UserError(
            f"the fine-tuning sources pack their conversations into blocks of {' and '.join(map(str, packed))} tokens, "
            "but a run trains at one; prepare them again with the same --block-size."
        )
    if packed:  # (whole conversations are packed at prepare time: the data decides the block size)
        if any(stage.block_size not in (0, packed[0]) for stage in cfg.data.stages):
            raise UserError(
                f"'{tuned[0].path}' packs whole conversations into blocks of {packed[0]} tokens, so data.stages cannot "
                "change data.block_size; remove block_size from the stages (or prepare it again with --block-size)."
            )
        cfg = cfg.replace(data={"block_size": packed[0]})
    return cfg


def check_preference(cfg: Config, tuned: list[Source], paired: list[Source]) -> None:
    """dpo / orpo: one training source, of pairs; an even micro batch (whole pairs); dpo: its reference values."""
    what = cfg.objective.kind
    if not paired or len(tuned) != 1 or sum(1 for s in cfg.data.mix if s.weight > 0) > 1:
        raise UserError(
            f"config key 'objective.kind' is {what}, which trains on one source of preference pairs (prepare "
            "--format preference) and nothing mixed with it; set data.path to such a directory."
        )
    if cfg.data.document_mask is False:
        raise UserError(f"config key 'data.document_mask' is false, but {what} scores each conversation of a pair "
                        "on its own; leave it unset (on) or set it true.")  # fmt: skip
    if cfg.train.micro_batch_size % 2:
        raise UserError(
            f"config key 'train.micro_batch_size' is {cfg.train.micro_batch_size}; {what} reads whole pairs (a chosen "
            "and a rejected block), so it must be even."
        )
    if what == "dpo" and read_record(paired[0].path) is None:
        raise UserError(
            f"'{paired[0].path}' has no reference values for dpo; compute them with `dist-clm prepare-reference "
            f"{paired[0].path} --model STARTING_MODEL`, or use objective.kind=orpo (no reference)."
        )
