import itertools

import numpy as np
import pytest

from dist_clm.data.loader import PackedBlocks, TokenStream, TrainLoader
from dist_clm.data.prepare import read_manifest
from dist_clm.errors import UserError
from tests.test_prepare import read_split


def loader(data_dir, block=64, micro=2, accum=1, rank=0, world=1, shuffle=True, state=None, workers=0):
    m = read_manifest(data_dir)
    return TrainLoader(data_dir, m, block, micro, accum, rank, world, shuffle, seed=7, num_workers=workers, state=state)


def take_steps(ld, steps, accum=1):
    """Input ids of `steps` optimizer steps, as a list of (micro batch) arrays; marks the steps done."""
    it, out = iter(ld), []
    for _ in range(steps):
        for _ in range(accum):
            b = next(it)
            assert (b["input_ids"] == b["labels"]).all()  # labels = input_ids; the model shifts them
            out.append(b["input_ids"].numpy())
        ld.step_done()
    return out


def test_blocks_concatenate_to_the_token_stream_in_order(data_dir):
    stream = np.concatenate([c["tokens"] for c in read_split(data_dir / "train")]).astype(np.int64)
    for block in (64, 100, 333):
        ld = loader(data_dir, block=block, micro=3, shuffle=False)
        per_epoch = len(stream) // block
        steps = per_epoch // 3 + 2  # run past the end of the epoch
        batches = np.concatenate(take_steps(ld, steps))
        assert batches.shape[1] == block  # every block exactly block_size long
        flat = batches.reshape(-1)
        n = per_epoch * block
        np.testing.assert_array_equal(flat[:n], stream[:n])  # epoch 1: the stream, in order, tail dropped
        np.testing.assert_array_equal(flat[n:], stream[: len(flat) - n])  # epoch 2 starts over


def test_shuffled_epoch_is_a_permutation_of_the_blocks(data_dir):
    stream_blocks = PackedBlocks(TokenStream(data_dir, "train", read_manifest(data_dir)), 64, shuffle=False, seed=0)
    shuffled = PackedBlocks(TokenStream(data_dir, "train", read_manifest(data_dir)), 64, shuffle=True, seed=3)
    n = stream_blocks.per_epoch
    plain = {tuple(stream_blocks[i]["input_ids"].tolist()) for i in range(n)}
    mixed = [tuple(shuffled[i]["input_ids"].tolist()) for i in range(n)]
    assert set(mixed) == plain and len(set(mixed)) == n
    assert mixed != [tuple(stream_blocks[i]["input_ids"].tolist()) for i in range(n)]
    second = [tuple(shuffled[n + i]["input_ids"].tolist()) for i in range(n)]
    assert set(second) == plain and second != mixed  # a new order each epoch


def test_two_ranks_split_each_step_between_them(data_dir):
    one = take_steps(loader(data_dir, micro=2, accum=2, world=1), 5, accum=2)
    # world 2 with half the micro batch keeps the global batch: the union of ranks is the 1-rank stream
    r0 = take_steps(loader(data_dir, micro=1, accum=2, rank=0, world=2), 5, accum=2)
    r1 = take_steps(loader(data_dir, micro=1, accum=2, rank=1, world=2), 5, accum=2)
    for s in range(5):
        single = np.concatenate(one[2 * s : 2 * s + 2])
        both = np.concatenate(r0[2 * s : 2 * s + 2] + r1[2 * s : 2 * s + 2])
        np.testing.assert_array_equal(single, both)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_state_continues_exactly(data_dir, workers):
    full = take_steps(loader(data_dir, micro=2, accum=2, workers=workers), 9, accum=2)
    first = loader(data_dir, micro=2, accum=2, workers=workers)
    take_steps(first, 4, accum=2)
    state = first.state_dict()
    assert state == {"blocks_consumed": 16, "block_size": 64}
    rest = take_steps(loader(data_dir, micro=2, accum=2, state=state, workers=workers), 5, accum=2)
    for a, b in itertools.zip_longest(full[8:], rest):
        np.testing.assert_array_equal(a, b)


def test_block_size_change_on_resume_is_refused(data_dir):
    with pytest.raises(UserError, match="data.block_size' is 32 but the checkpoint was trained with 64"):
        loader(data_dir, block=32, state={"blocks_consumed": 8, "block_size": 64})


def test_block_larger_than_split_is_refused(data_dir):
    with pytest.raises(UserError, match="fewer than one block"):
        loader(data_dir, block=10**7)
