"""Exact and elastic resume of the loader, with real processes under torchrun (tests/loader_probe.py).

The token streams themselves are compared, step by step: the blocks of every optimizer step after a resume
(on the same or on another number of ranks, 0 or 2 loader workers, one source or a mixture) must be the very
blocks the uninterrupted run saw in that step. The resume point is mid-epoch and the second segment crosses
an epoch boundary. Equality of the arrays covers streaming's three checks at once: no block missing, none
repeated, none out of order.
"""

import subprocess
import sys

import numpy as np
import pytest

from dist_clm.data.format import read_manifest
from dist_clm.data.mixture import Mixture
from dist_clm.data.order import PackedBlocks
from dist_clm.data.stream import TokenStream
from tests.helpers import BIN, REPO

pytestmark = pytest.mark.slow


FIRST, TOTAL, GLOBAL, BLOCK = 100, 160, 4, 512


def probe(world: int, out, data, states=(), resume_only=False):
    cmd = [
        str(BIN / "torchrun"), "--nproc_per_node", str(world), "--master_port", str(29610 + world),
        str(REPO / "tests" / "loader_probe.py"), "--data", *map(str, data), "--out", str(out),
        "--first", str(FIRST), "--total", str(TOTAL), "--global-batch", str(GLOBAL), "--block", str(BLOCK),
        "--states", *map(str, states), *(["--resume-only"] if resume_only else []),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=None)
    assert r.returncode == 0, r.stderr[-3000:]


def global_steps(out, tag: str, world: int) -> np.ndarray:
    """(steps, global blocks per step, block): each step's blocks in global order (rank 0's share first)."""
    return np.concatenate([np.load(out / f"{tag}_world{world}.rank{r}.npy") for r in range(world)], axis=1)


def test_resume_is_exact_on_the_same_and_on_another_number_of_ranks(tmp_path, data_dir, data_dir_b):
    data = [data_dir, data_dir_b]
    probe(2, tmp_path, data, states=[2])  # full, seg1 and a resume on 2 ranks
    probe(1, tmp_path, data, states=[1, 2])  # full, seg1, resumes from 1 rank and from 2 ranks (2 -> 1)
    probe(2, tmp_path, data, states=[1], resume_only=True)  # 1 -> 2
    assert sys.executable  # the probes ran with this interpreter's torchrun

    # where the epoch boundary falls: the resume point is mid-epoch, the second segment crosses a boundary
    per_epoch = PackedBlocks(TokenStream(data_dir, "train", read_manifest(data_dir)), BLOCK, True, 7).per_epoch
    assert FIRST * GLOBAL % per_epoch != 0 and FIRST * GLOBAL < per_epoch < TOTAL * GLOBAL
    mixture = Mixture([3.0, 1.0])
    used_first = sum(mixture(g)[0] == 0 for g in range(FIRST * GLOBAL))
    used = sum(mixture(g)[0] == 0 for g in range(TOTAL * GLOBAL))
    assert used_first < per_epoch < used  # in the mixture too, the first source's epoch ends after the resume

    for setting in ("single", "mixed"):
        for workers in (0, 2):
            tag = f"{setting}_w{workers}"
            full = global_steps(tmp_path, f"{tag}_full", 2)
            assert full.shape == (TOTAL, GLOBAL, BLOCK)
            np.testing.assert_array_equal(full, global_steps(tmp_path, f"{tag}_full", 1))  # 1 rank = 2 ranks
            for before, after in ((2, 2), (1, 1), (2, 1), (1, 2)):
                head = global_steps(tmp_path, f"{tag}_seg1", before)
                tail = global_steps(tmp_path, f"{tag}_seg2_from{before}", after)
                resumed = np.concatenate([head, tail])
                assert resumed.shape == full.shape
                np.testing.assert_array_equal(resumed, full, err_msg=f"{tag}: resume {before} -> {after} ranks")
            # and the run is not trivially repetitive: its blocks differ from step to step
            assert len({full[s].tobytes() for s in range(TOTAL)}) == TOTAL
    # the two settings and the two worker counts really differ / agree as they should
    assert not np.array_equal(global_steps(tmp_path, "single_w0_full", 1), global_steps(tmp_path, "mixed_w0_full", 1))
    np.testing.assert_array_equal(
        global_steps(tmp_path, "mixed_w0_full", 1), global_steps(tmp_path, "mixed_w2_full", 1)
    )
