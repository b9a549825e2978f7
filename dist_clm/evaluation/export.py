"""Models out of training checkpoints: weights for inference (eval, generate) and a Hugging Face directory.

Nothing here needs a GPU or a DeepSpeed engine. ZeRO 1-3 keep fp32 master weights partitioned in the optimizer
shards, gathered with DeepSpeed's own zero_to_fp32; ZeRO 0 keeps the module's own weights in the model-states
file. The export never builds the model: it writes one safetensors shard at a time.

An export is meant to be published: by default it names the checkpoint, the data and the tokenizer by what they
are (the checkpoint's tag, each source's name and fingerprint, the tokenizer's fingerprint), never by a local
path; the full local provenance stays in the run directory (config.yaml, the data's manifests), and
`provenance="full"` (`dist-clm export --provenance full`) copies it into the export too. Every file is readable
as the umask allows any new file (0644 under the usual 022), the weights included.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import sys
from pathlib import Path

from dist_clm import console
from dist_clm.checkpointing.checkpointer import (
    COMPLETE,
    read_marker,
    read_parts,
    reading,
    run_dir_of,
    saved_tensor_parallel,
)
from dist_clm.data.order import SKIPS, prepared_identity
from dist_clm.errors import UserError
from dist_clm.evaluation import shards
from dist_clm.fsutil import atomic_dir, refuse_non_empty
from dist_clm.parallel.process_group import import_deepspeed


def is_exported(path: Path) -> bool:
    """`path` is a Hugging Face model directory (an export), not a training checkpoint."""
    return (path / "config.json").is_file() and not (path / COMPLETE).is_file()


def _no_bar_in_a_log():
    """zero_to_fp32's progress bar on a terminal; none in a log file (its carriage-return frames)."""
    return contextlib.nullcontext() if sys.stderr.isatty() else console.without_lines("stderr", "checkpoint shards")


def load_state_dict(tag_dir: Path) -> dict:
    """The model's weights from a checkpoint, consolidated in fp32 on the CPU, without GPUs or an engine.

    ZeRO 1-3 keep fp32 master weights partitioned in the optimizer shards; DeepSpeed's own zero_to_fp32
    gathers them. ZeRO 0 keeps the module's own weights in the model-states file. Tensor parallelism's shards
    are joined (shards.py).
    """
    import torch

    if saved_tensor_parallel(tag_dir) > 1:
        lazy, materialize = shards.joined(tag_dir, _lazy_weights)
        return materialize(lazy)
    if read_marker(tag_dir)["zero_stage"] == 0:
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    import_deepspeed()  # (before the first import of deepspeed)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), _no_bar_in_a_log():  # (it prints its progress)
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def load_model(path: str | Path, device: str = "cpu", dtype=None):
    """(model in eval mode, tokenizer, source dir) from a checkpoint, a run, or an exported directory, in `dtype`
    (default: the precision its forward trained in, an export's own), placed for inference from `device`
    (evaluation/placement.py: one device, or the visible GPUs when one does not hold it). A checkpoint's weights
    are consolidated one tensor at a time straight into the model's place: no whole fp32 copy beside it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dist_clm.data.tokenizer import load_tokenizer
    from dist_clm.evaluation.placement import device_map_for
    from dist_clm.parallel.engine import use_tf32

    use_tf32(True, device.startswith("cuda"))  # (fp32 products on TF32 tensor cores, as training's default)
    p = Path(path)
    if is_exported(p):
        config = AutoConfig.from_pretrained(str(p))
        dtype = dtype or _export_dtype(config)
        device_map = device_map_for(_empty(config, dtype), dtype, device)
        with _no_bar_in_a_log():
            model = AutoModelForCausalLM.from_pretrained(str(p), attn_implementation="sdpa", dtype=dtype,
                                                         device_map=device_map)  # fmt: skip
        tok = load_tokenizer(p)
        where = p
    else:
        with reading(p) as where:  # (keep-k pruning leaves it alone meanwhile)
            config = AutoConfig.from_pretrained(str(where))
            model = _from_checkpoint(where, config, dtype or training_dtype(where), device)
        tok = load_tokenizer(run_dir_of(where) / "tokenizer")
    embedded = model.get_input_embeddings().num_embeddings
    if len(tok) > embedded:
        raise UserError(
            f"the tokenizer of '{where}' has {len(tok)} tokens but the model embeds only {embedded}; use the "
            "tokenizer the model was trained with."
        )
    return model.eval(), tok, where


def training_dtype(tag_dir: Path):
    """The precision a checkpoint's forward ran in (its run's DeepSpeed config): bf16 or fp16 weights, else fp32."""
    import torch

    try:
        ds = json.loads((run_dir_of(tag_dir) / "ds_config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float16 if ds.get("fp16", {}).get("enabled") else torch.float32


def _export_dtype(config):
    import torch

    given = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return getattr(torch, given) if isinstance(given, str) else given or torch.float32


def _empty(config, dtype):
    """The model of `config` with its parameters on the meta device (no memory), its buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)


def _from_checkpoint(tag_dir: Path, config, dtype, device: str):
    """The checkpoint's model in `dtype`, each tensor consolidated (DeepSpeed's lazy zero_to_fp32) and put
    straight where the device map places it."""
    from accelerate import dispatch_model
    from accelerate.utils import set_module_tensor_to_device

    from dist_clm.evaluation.placement import device_map_for, device_of

    model = _empty(config, dtype)
    device_map = device_map_for(model, dtype, device)
    lazy, materialize = _lazy_weights(tag_dir)
    expected = set(model.state_dict())
    tied = {k for k in expected - set(lazy) if k.endswith("lm_head.weight") and config.tie_word_embeddings}
    missing, unexpected = expected - set(lazy) - tied, set(lazy) - expected
    if missing or unexpected:
        raise UserError(
            f"checkpoint '{tag_dir}' does not match its config.json (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); it was written by another model."
        )
    for name in sorted(lazy):
        value = materialize({name: lazy[name]})[name]
        set_module_tensor_to_device(model, name, device_of(name, device_map), value=value, dtype=dtype)
        del value
    model.tie_weights()
    if len(set(device_map.values())) > 1:
        return dispatch_model(model, device_map)
    return model.to(next(iter(device_map.values())))  # (the buffers, built on the CPU)


def _lazy_weights(tag_dir: Path) -> tuple[dict, callable]:
    """(name -> lazily gathered tensor, materialize(dict of them) -> dict of fp32 tensors), without loading the
    whole model: ZeRO 1-3 through DeepSpeed's lazy zero_to_fp32 (partitions memory-mapped, gathered per
    tensor); ZeRO 0 from the model-states file, memory-mapped."""
    import torch

    if saved_tensor_parallel(tag_dir) > 1:
        return shards.joined(tag_dir, _lazy_weights)
    if read_marker(tag_dir)["zero_stage"] == 0:
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True, weights_only=False)
        return states["module"], lambda part: {k: v.float().contiguous() for k, v in part.items()}
    import_deepspeed()  # (before the first import of deepspeed)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, to_torch_tensor

    with contextlib.redirect_stdout(io.StringIO()), _no_bar_in_a_log():  # (it prints its progress)
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name, lazy_mode=True)
    return lazy, lambda part: to_torch_tensor(part, dtype=torch.float32)


def _write_weights(tag_dir: Path, out: Path, max_shard_size: str, dtype) -> int:
    """model.safetensors (or shards + index) from a checkpoint, one shard in memory at a time; returns the
    number of parameters. A tensor stored twice (tied embeddings) is written once: transformers ties it
    again on load, as its own save_pretrained does."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    lazy, materialize = _lazy_weights(tag_dir)
    seen, names = set(), []
    for name, tensor in lazy.items():
        key = (
            id(tensor)
            if not isinstance(tensor, torch.Tensor)
            else (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        )
        if key not in seen:
            seen.add(key)
            names.append(name)
    shapes = {n: torch.empty(tuple(lazy[n].shape), dtype=dtype, device="meta") for n in names}
    split = split_torch_state_dict_into_shards(
        shapes, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, tensors in split.filename_to_tensors.items():
        shard = {k: v.to(dtype) for k, v in materialize({n: lazy[n] for n in tensors}).items()}
        save_file(shard, str(out / filename), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sum(t.numel() for t in shapes.values())


PROVENANCE = ("public", "full")
# config keys that hold a local path or a private address: left out of a public export's dist_clm_config.yaml
LOCAL_KEYS = {"run": ("dir", "mlflow_tracking_uri"), "data": ("path", "cache_dir"), "model": ("pretrained",)}
LEFT_OUT = "<local, not exported>"


def export(
    path: str | Path, out_dir: str | Path, dtype: str = "float32", max_shard_size: str = "2GB",
    provenance: str = "public",
) -> Path:  # fmt: skip
    """A Hugging Face directory from a checkpoint: config, safetensors weights, tokenizer, generation config,
    the run's config and data provenance, and a model card (public by default, see the module docstring). No GPU
    and no engine are needed; the weights are consolidated one shard at a time, never holding a second copy."""
    if provenance not in PROVENANCE:
        raise UserError(f"provenance must be one of {', '.join(PROVENANCE)}, got '{provenance}'.")
    p = Path(path)
    if is_exported(p):
        raise UserError(f"'{p}' is already an exported Hugging Face directory; copy it instead of exporting.")
    out = Path(out_dir)
    refuse_non_empty(out)
    with reading(p) as tag_dir:  # (keep-k pruning leaves it alone meanwhile)
        return _export(tag_dir, out, dtype, max_shard_size, full=provenance == "full")


def _export(tag_dir: Path, out: Path, dtype: str, max_shard_size: str, full: bool) -> Path:
    import torch
    from transformers import AutoConfig, GenerationConfig

    from dist_clm.data.tokenizer import end_of_turn_ids, load_tokenizer

    run_dir = run_dir_of(tag_dir)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    config = AutoConfig.from_pretrained(str(tag_dir))
    tok = load_tokenizer(run_dir / "tokenizer")
    with atomic_dir(out) as tmp:
        n_params = _write_weights(tag_dir, tmp, max_shard_size, torch_dtype)
        config.dtype = dtype
        config.save_pretrained(str(tmp))
        # the special tokens only: greedy by default, and no sampling flag that a greedy call would ignore
        stops = [tok.eos_token_id, *end_of_turn_ids(tok)]  # a chat model's answer ends with its turn
        GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=stops if len(stops) > 1 else stops[0],
            pad_token_id=tok.eos_token_id,
        ).save_pretrained(str(tmp))  # fmt: skip
        tok.save_pretrained(str(tmp))
        run_config = _yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
        if run_config is not None:
            (tmp / "dist_clm_config.yaml").write_text(_config_text(run_config, full))
        provenance = _provenance(run_dir, tag_dir, run_config or {})
        shown = provenance if full else _public(provenance)
        (tmp / "data_provenance.json").write_text(json.dumps(shown, indent=2))
        card = _model_card(out.name, config, n_params, shown)
        (tmp / "README.md").write_text(card)
        _readable(tmp)
    return out


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _config_text(run_config: dict, full: bool) -> str:
    """The run's config.yaml; public: local paths and addresses replaced by a note that they were left out."""
    import yaml

    if full:
        return yaml.safe_dump(run_config, sort_keys=False)
    shown = copy.deepcopy(run_config)
    for section, keys in LOCAL_KEYS.items():
        for key in keys:
            if shown.get(section, {}).get(key):
                shown[section][key] = LEFT_OUT
    for source in shown.get("data", {}).get("mix") or []:
        if source.get("path"):
            source["path"] = LEFT_OUT
    head = "# the training configuration; local paths left out (dist-clm export --provenance full keeps them)\n"
    return head + yaml.safe_dump(shown, sort_keys=False)


def _public(prov: dict) -> dict:
    """The provenance without local paths: the checkpoint's tag, each source's name, fingerprint and counts."""
    sources = []
    for s in prov["sources"]:
        m = copy.deepcopy(s["manifest"])
        m.get("tokenizer", {}).pop("source", None)  # a local directory; its fingerprint says what it is
        origin = m.get("sources", {})
        for key in ("inputs", "listing"):  # file paths, globs, bucket URLs
            if key in origin:
                origin[key] = f"{len(origin[key])} given" if isinstance(origin[key], list) else "given"
        m.pop("undecodable_examples", None)  # (they name the files)
        sources.append({k: v for k, v in s.items() if k != "path"} | {"manifest": m})
    start = prov["started_from"] and _model_name(prov["started_from"])
    return {**prov, "checkpoint": Path(prov["checkpoint"]).name, "started_from": start, "sources": sources}


def _model_name(path: str) -> str:
    """A local model directory by its name: a Hugging Face cache snapshot (models--ORG--NAME/snapshots/HASH) as
    ORG/NAME, any other by its last component (an export: the name it was exported as)."""
    parts = Path(path).parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/")
    return Path(path).name


def _how_trained(prov: dict) -> str:
    """The objective and the model it started from, e.g. 'preference-tuned with DPO (beta 0.5) from `sft`'."""
    objective, start = prov["objective"], prov["started_from"]
    kind = objective["kind"]
    if kind in PREFERENCE:
        strength = "beta" if kind == "dpo" else "lambda"
        how = f"preference-tuned with {kind.upper()} ({strength} {objective[BETA[kind]]:g})"
    else:
        how = {"clm": "pretrained", "sft": "fine-tuned (SFT)"}.get(kind, "trained")
    if start is None:
        return f"{how} from scratch"
    return f"pretraining continued from `{start}`" if kind == "clm" else f"{how} from `{start}`"


def _figures(objective: dict, val: dict) -> str:
    """The card's line of the objective's own figures at the last validation, with what they were computed on."""
    kind = objective["kind"]
    if kind in PREFERENCE:
        reward = ("the chosen answer's implicit reward, beta x its log-probability ratio to the starting model, "
                  "minus the rejected one's" if kind == "dpo" else "the chosen answer's log odds minus the rejected "
                  "one's")  # fmt: skip
        return (f"Held-out preference pairs at step {val['step']} ({val['pairs']:,} pairs of the data's validation "
                f"split, in blocks of {val['block_size']} tokens): reward accuracy {val['reward_accuracy']:.3f} (the "
                f"share of pairs whose chosen answer is rewarded above the rejected one), reward margin "
                f"{val['reward_margin']:.4g} ({reward}), {kind.upper()} loss {val['loss']:.4g}.")  # fmt: skip
    what = "learned tokens" if kind == "sft" else "tokens"
    on = f"{val['tokens']:,} {what} of the data's validation split" if "tokens" in val else "the validation split"
    blocks = f", in blocks of {val['block_size']} tokens" if "block_size" in val else ""
    figures = f"perplexity {val['perplexity']:.2f} (loss {val['loss']:.4g})"
    return f"Validation at step {val['step']}: {figures} on {on}{blocks}."


def _readable(root: Path) -> None:
    """Every file and directory with the mode a new one gets under the umask (some writers make theirs 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _provenance(run_dir: Path, tag_dir: Path, run_config: dict) -> dict:
    """What the model was trained on and how: each source's manifest (without its histograms), step and tokens,
    the objective and the model it started from, and its last validation."""
    from dist_clm.config import load_config

    sources, stages, block_size = [], [], None
    progress = read_parts(tag_dir)["progress"]
    if (run_dir / "config.yaml").is_file():
        cfg = load_config(run_dir / "config.yaml")
        block_size = cfg.data.block_size_at(max(1, progress["step"]))
        stages = [{"until": s.until, "weights": s.weights, "block_size": s.block_size} for s in cfg.data.stages]
        mix = cfg.data.mix or [None]
        for m in mix:
            path = m.path if m else cfg.data.path
            manifest_path = Path(path) / "manifest.json"
            manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
            for split in manifest.get("splits", {}).values():
                split.pop("length_histogram", None)
            fingerprint = _fingerprint(manifest) if manifest else None  # (none for data read from a bucket)
            sources.append({"name": (m.name if m else "") or _dataset_name(manifest), "path": str(path),
                            "weight": m.weight if m else 1.0, "fingerprint": fingerprint,
                            "manifest": manifest})  # fmt: skip
    objective = {"kind": "clm"} | run_config.get("objective", {})
    return {
        "checkpoint": str(tag_dir),
        "objective": {k: v for k, v in objective.items() if k == "kind" or k == BETA.get(objective["kind"])},
        "started_from": run_config.get("model", {}).get("pretrained") or None,  # None: from scratch
        "validation": _validation(run_dir, progress["step"], objective["kind"]),
        "step": progress["step"],
        "tokens_seen": progress["tokens_seen"],
        "block_size": block_size,  # the tokens per block of its last steps: eval's default for the export
        "sources": sources,
        "stages": stages,  # the mixture and block sizes over the run, when they changed (data.stages)
        "skipped_windows": json.loads((run_dir / SKIPS).read_text()) if (run_dir / SKIPS).is_file() else [],
    }


PREFERENCE = ("dpo", "orpo")
BETA = {"dpo": "dpo_beta", "orpo": "orpo_lambda"}  # a preference objective's strength, in the run's config


def _validation(run_dir: Path, step: int, objective: str) -> dict | None:
    """The run's last validation at or before `step` (RUN/metrics.jsonl) and what it was computed on: the
    preference objectives' held-out pairs, else the perplexity of the validation split; None without one."""
    headline = "val/reward_accuracy" if objective in PREFERENCE else "val/perplexity"
    path, row = run_dir / "metrics.jsonl", None
    for line in path.read_text().splitlines() if path.is_file() else []:
        logged = json.loads(line)
        if headline in logged and logged["step"] <= step:
            row = logged
    if row is None:
        return None
    names = ("pairs", "reward_accuracy", "reward_margin", "loss", "chosen_perplexity", "chosen_tokens", "block_size")
    if objective not in PREFERENCE:
        names = ("perplexity", "loss", "tokens", "block_size")
    return {"step": row["step"], "split": "val"} | {n: row[f"val/{n}"] for n in names if f"val/{n}" in row}


def _dataset_name(manifest: dict) -> str:
    """What an unnamed source is: the Hugging Face dataset it came from, or the files' kind."""
    origin = manifest.get("sources", {})
    if origin.get("dataset"):
        return origin["dataset"] + (f" ({origin['config']})" if origin.get("config") else "")
    return "training data"


def _fingerprint(manifest: dict) -> str:
    """A short hash of the prepared data's identity (the one a resume checks), not of where it lies."""
    return hashlib.sha256(json.dumps(prepared_identity(manifest), sort_keys=True).encode()).hexdigest()[:16]


def _model_card(name: str, config, n_params: int, prov: dict) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [dist_clm, causal-lm, {config.model_type}]",
        "---",
        f"# {name}",
        "",
        f"A {config.model_type} causal language model ({n_params:,} parameters, vocabulary "
        f"{config.vocab_size:,}) {_how_trained(prov)} with dist_clm; exported from checkpoint `{prov['checkpoint']}` "
        f"at step {prov['step']}"
        + (f" after {prov['tokens_seen']:,} training tokens." if prov["tokens_seen"] else "."),
    ]
    if prov["validation"]:
        lines += ["", _figures(prov["objective"], prov["validation"])]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        f'generate = pipeline("text-generation", model="{name}")',
        'print(generate("def main(", max_new_tokens=40)[0]["generated_text"])',
        "```",
        "",
        "## Training data",
        "",
    ]
    for src in prov["sources"]:
        m = src["manifest"]
        splits = m.get("splits", {})
        counts = ", ".join(f"{k}: {v['documents']:,} documents, {v['tokens']:,} tokens" for k, v in splits.items())
        inputs = m.get("sources", {}).get("inputs", [])
        where = f"`{src['path']}`, " if "path" in src else ""
        given = ", ".join(f"`{i}`" for i in inputs) if isinstance(inputs, list) else inputs
        lines.append(
            f"- **{src['name']}** (weight {src['weight']:g}, fingerprint `{src.get('fingerprint', '?')}`): {where}"
            f"prepared {m.get('created', '?')} from {given or 'unknown inputs'}; {counts}; tokenizer fingerprint "
            f"`{m.get('tokenizer', {}).get('fingerprint', '?')}`."
        )
    if prov["skipped_windows"]:
        lines.append(
            f"- {len(prov['skipped_windows'])} data window(s) skipped after rollbacks (see data_provenance.json)."
        )
    lines += ["", "The full training configuration is in `dist_clm_config.yaml`; the data manifests in "
              "`data_provenance.json`.", ""]  # fmt: skip
    return "\n".join(lines)
