"""Run under torchrun by tests/integration/data/test_loader_resume.py: what blocks does each rank see, and after
a resume?

For each data setting (one source; a 3:1 mixture of two) and each number of loader workers, this rank
records the token ids of every micro batch it gets:
    full      TOTAL steps from the start
    seg1      FIRST steps from the start, then the loader state (as the checkpoint saves it, through JSON)
    seg2_<w>  TOTAL - FIRST steps resumed from the state that seg1 saved with world size w (files in --states)
The global batch is fixed (--global-batch blocks per step); micro batch = global / (world * accum).
Files: OUT/<setting>_w<workers>_<part>_world<world>.rank<r>.npy, shape (steps, blocks per rank per step, block).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from dist_clm.data.format import read_manifest
from dist_clm.data.loader import TrainLoader
from dist_clm.data.order import DataPosition, Source


def take(loader: TrainLoader, steps: int, accum: int) -> np.ndarray:
    it, out = iter(loader), []
    for _ in range(steps):
        out.append(np.concatenate([next(it)["input_ids"].numpy() for _ in range(accum)]))
        loader.step_done()
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--states", nargs="*", default=[], help="world sizes whose seg1 states to resume from")
    ap.add_argument("--first", type=int, required=True)
    ap.add_argument("--total", type=int, required=True)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--resume-only", action="store_true", help="only the seg2 parts (full/seg1 exist already)")
    a = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = Path(a.out)
    micro = a.global_batch // (world * a.accum)
    settings = {
        "single": [Source("a", a.data[0], read_manifest(a.data[0]))],
        "mixed": [Source(Path(d).name, d, read_manifest(d), w) for d, w in zip(a.data, (3.0, 1.0), strict=False)],
    }
    for name, sources in settings.items():
        for workers in (0, 2):

            def make(state=None, sources=sources, workers=workers):
                position = DataPosition(sources, block_size=a.block, global_batch=a.global_batch)
                if state is not None:
                    position.load_state_dict(state)
                return TrainLoader(
                    sources, position, micro_batch=micro, grad_accum=a.accum, rank=rank, world=world, shuffle=True,
                    seed=7, num_workers=workers,
                )  # fmt: skip

            tag = f"{name}_w{workers}"
            mine = None
            if not a.resume_only:
                np.save(out / f"{tag}_full_world{world}.rank{rank}.npy", take(make(), a.total, a.accum))
                first = make()
                np.save(out / f"{tag}_seg1_world{world}.rank{rank}.npy", take(first, a.first, a.accum))
                mine = json.dumps(first.position.state_dict())  # the same on every rank: a function of the steps
                if rank == 0:
                    (out / f"{tag}_state_world{world}.json").write_text(mine)
            for w in a.states:
                saved = mine if int(w) == world and mine else (out / f"{tag}_state_world{w}.json").read_text()
                seg2 = take(make(json.loads(saved)), a.total - a.first, a.accum)
                np.save(out / f"{tag}_seg2_from{w}_world{world}.rank{rank}.npy", seg2)


if __name__ == "__main__":
    main()
