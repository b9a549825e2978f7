"""A tensor-parallel checkpoint's parameters, whole: each group rank's shards consolidated over ZeRO's partitions,
then joined as AutoTP split them (its record in the checkpoint names the parameters split by input rows, by
vocabulary, and those replicated; every other one is split by output rows).

ZeRO 0-2 partition each group rank's parameters over its data-parallel ranks only: each group rank's files are
then a checkpoint of their own, which the export's reader (DeepSpeed's zero_to_fp32) consolidates through a view of
them under one model-parallel rank. ZeRO-3 (its model built under zero.Init, before AutoTP split it) partitions the
split parameters over the data-parallel ranks but the replicated ones over every rank, which zero_to_fp32 cannot
read (nor can DeepSpeed's universal converter in 0.19): `_zero3_partitions` reads the fp32 partitions from the
layout ZeRO-3 writes, one parameter at a time.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from dist_clm.checkpointing.checkpointer import COMPLETE, read_marker
from dist_clm.errors import UserError

FILE = re.compile(r"(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_(model|optim)_states\.pt$")


class Joined:
    """A parameter of a tensor-parallel checkpoint: its group ranks' shards (lazy), and how they join."""

    def __init__(self, shards: list, how: str, vocab: int | None):
        self.shards, self.how, self.vocab = shards, how, vocab
        dims = [list(s.shape) for s in shards]
        shape = dims[0]
        if how in ("rows", "columns"):
            axis = 1 if how == "rows" else 0
            shape[axis] = sum(d[axis] for d in dims)
        if how == "vocabulary":
            shape[0] = vocab or sum(d[0] for d in dims)
        self.shape = tuple(shape)

    def join(self, tensors: list):
        import torch

        if self.how == "replicated":
            return tensors[0]
        whole = torch.cat(tensors, dim=1 if self.how == "rows" else 0)
        return whole[: self.vocab] if self.how == "vocabulary" and self.vocab else whole


def joined(tag_dir: Path, lazy_weights: Callable) -> tuple[dict, Callable]:
    """(name -> Joined, materialize(part) -> fp32 tensors) of a tensor-parallel checkpoint; `lazy_weights` reads
    one group rank's view (export._lazy_weights) under ZeRO 0-2."""
    import torch

    files = {m.groups(): f for f in tag_dir.iterdir() if (m := FILE.match(f.name))}
    size = len({tp for _, tp, _ in files})
    states = torch.load(files[(None if read_marker(tag_dir)["zero_stage"] < 3 else "0"), "00", "model"],
                        map_location="cpu", mmap=True, weights_only=False)  # fmt: skip
    info = states.get("universal_checkpoint_info") or {}
    if info.get("parameter_with_sub_params"):
        raise UserError(f"'{tag_dir}' holds fused tensor-parallel parameters (AutoTP's sub-parameters), which "
                        "dist_clm cannot join yet; convert it with DeepSpeed's ds_to_universal.")  # fmt: skip
    rules = [(how, [re.compile(p) for p in info.get(key, [])]) for how, key in (
        ("replicated", "tp_replicated_parameter_patterns"), ("rows", "parameter_with_row_parallelism_patterns"),
        ("vocabulary", "vocabulary_parameter_patterns"))]  # fmt: skip

    def how(name: str) -> str:
        return next((h for h, patterns in rules if any(p.match(name) for p in patterns)), "columns")

    views = None
    if read_marker(tag_dir)["zero_stage"] == 3:
        per_rank = _zero3_partitions(files, size, lambda name: how(name) == "replicated")
    else:
        views = tempfile.TemporaryDirectory(prefix="dist_clm_tp_view_")
        per_rank = [lazy_weights(_view(tag_dir, rank, Path(views.name))) for rank in range(size)]
    lazy = {name: Joined([r[0][name] for r in per_rank], how(name), info.get("original_vocab_size"))
            for name in per_rank[0][0]}  # fmt: skip

    def materialize(part: dict) -> dict:
        _ = views  # (kept as long as the tensors may be read: the views hold the links to the files)
        return {name: j.join([r[1]({name: s})[name] for r, s in zip(per_rank, j.shards, strict=True)])
                for name, j in part.items()}  # fmt: skip

    return lazy, materialize


def _view(tag_dir: Path, rank: int, root: Path) -> Path:
    """Group rank `rank`'s files of `tag_dir`, linked under model-parallel rank 0 in a checkpoint directory of
    their own."""
    view = root / str(rank) / tag_dir.name
    view.mkdir(parents=True)
    own = f"mp_rank_{rank:02d}"
    for f in tag_dir.iterdir():
        if own in f.name:
            (view / f.name.replace(own, "mp_rank_00")).symlink_to(f.resolve())
    (view / COMPLETE).write_text((tag_dir / COMPLETE).read_text())
    return view


class _Slices:
    """A ZeRO-3 parameter of one group rank: where each of its partitions lies (a rank's flat fp32 group, an
    offset, a length), and its shape."""

    def __init__(self, shape, places: list):
        self.shape, self.places = tuple(shape), places

    def read(self):
        import torch

        n = math.prod(self.shape)
        parts = [flat.narrow(0, at, min(length, max(flat.numel() - at, 0))) for flat, at, length in self.places]
        return torch.cat(parts)[:n].view(self.shape).float().clone()


def _zero3_partitions(files: dict, size: int, replicated: Callable) -> list:
    """For each group rank: (name -> _Slices, materialize). ZeRO-3's layout, per rank: for each parameter group,
    one flat fp32 tensor holding, parameter after parameter in the order of the model states' param_shapes, this
    rank's ceil(numel / partitions) elements; a split parameter has the data-parallel ranks as its partitions (the
    file's zero_pp_rank), a replicated one every rank (rank dp x size + tp, the mesh's order)."""
    import torch

    dp = len({d for d, _, _ in files})
    flats, shapes = {}, {}
    for (d, tp, kind), f in files.items():
        state = torch.load(f, map_location="cpu", mmap=True, weights_only=False)
        if kind == "optim":
            flats[int(d), int(tp)] = state["optimizer_state_dict"]["fp32_flat_groups"]
        elif d == "0":
            shapes[int(tp)] = state["param_shapes"]
    world = dp * size
    offsets: dict[tuple[int, int], dict[str, tuple[int, int]]] = {}  # (dp, tp) -> name -> (group, offset)
    for d in range(dp):
        for tp in range(size):
            table = offsets.setdefault((d, tp), {})
            for group, params in enumerate(shapes[tp]):
                at = 0
                for name, shape in params.items():
                    table[name] = (group, at)
                    at += math.ceil(math.prod(shape) / (world if replicated(name) else dp))
    out = []
    for tp in range(size):
        lazy = {}
        for params in shapes[tp]:
            for name, shape in params.items():
                n = math.prod(shape)
                ranks = ([(r // size, r % size) for r in range(world)] if replicated(name)
                         else [(d, tp) for d in range(dp)])  # fmt: skip
                length = math.ceil(n / len(ranks))
                places = []
                for rank in ranks:
                    group, at = offsets[rank][name]
                    places.append((flats[rank][group], at, length))
                lazy[name] = _Slices(shape, places)
        out.append((lazy, lambda part: {k: v.read() for k, v in part.items()}))
    return out
