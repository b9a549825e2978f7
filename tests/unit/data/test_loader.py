import itertools
import os
import shutil

import numpy as np
import pytest
import torch

from dist_clm.config import StageConfig
from dist_clm.data.batches import MixedBlocks
from dist_clm.data.format import read_manifest
from dist_clm.data.loader import TrainLoader
from dist_clm.data.mixture import Mixture, Stage, StagedMixture
from dist_clm.data.order import DataPosition, PackedBlocks, Source
from dist_clm.data.prepare import prepare
from dist_clm.data.stream import ChunkStore, TokenStream, document_positions
from dist_clm.errors import Mismatch, UserError
from tests.helpers import new_in_shared_memory, read_split


def src(d, weight=1.0, name=None):
    return Source(name or d.name, str(d), read_manifest(d), weight)


def loader(data_dir, block=64, micro=2, accum=1, rank=0, world=1, shuffle=True, state=None, workers=0,
           shuffle_window=0, stages=None, **kw):  # fmt: skip
    """A TrainLoader; from `state` (a DataPosition's state_dict, which must let it continue) when given."""
    sources = data_dir if isinstance(data_dir, list) else [src(data_dir)]
    batch = world * micro * accum
    position = DataPosition(sources, block_size=block, global_batch=batch, shuffle_window=shuffle_window, stages=stages)
    if state is not None:
        position.load_state_dict(state)
    return TrainLoader(
        sources, position, micro_batch=micro, grad_accum=accum, rank=rank, world=world, shuffle=shuffle, seed=7,
        num_workers=workers, **kw,
    )  # fmt: skip


def take_steps(ld, steps, accum=1, key="input_ids"):
    """`key` of `steps` optimizer steps, as a list of (micro batch) arrays; marks the steps done."""
    it, out = iter(ld), []
    for _ in range(steps):
        for _ in range(accum):
            b = next(it)
            if "position_ids" not in b:
                assert (b["input_ids"] == b["labels"]).all()  # labels = input_ids; the model shifts them
            out.append(b[key].numpy())
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
    stream = TokenStream(data_dir, "train", read_manifest(data_dir))
    plain_blocks, shuffled = PackedBlocks(stream, 64, False, 0), PackedBlocks(stream, 64, True, 3)
    n = plain_blocks.per_epoch
    plain = [plain_blocks.position(k) for k in range(n)]
    mixed = [shuffled.position(k) for k in range(n)]
    assert sorted(mixed) == plain and mixed != plain  # no block missing or repeated, the order changed
    second = [shuffled.position(n + k) for k in range(n)]
    assert sorted(second) == plain and second != mixed  # a new order each epoch


def test_windowed_shuffle_is_a_permutation_that_reads_a_few_random_shards_at_a_time(data_dir):
    """data.shuffle_window: each epoch is still a permutation of all blocks, but consecutive blocks come from one
    window at a time: a few whole shards drawn at random from the corpus (not neighbours), their blocks mixed,
    in a new order each epoch; window 0 is the global shuffle, bit for bit."""
    from bisect import bisect_right

    stream = TokenStream(data_dir, "train", read_manifest(data_dir))
    blocks = PackedBlocks(stream, 64, True, 3, window=2 * stream.chunks.ends[0] * stream.chunk_tokens // 64)
    n, edges = blocks.per_epoch, blocks.edges.tolist()
    assert blocks.group == 2 and len(edges) - 1 > 6  # windows of two shards, of many
    size = {p: edges[p + 1] - edges[p] for p in range(len(edges) - 1)}
    for epoch in (0, 1):
        order = [blocks.position(epoch * n + k) // 64 for k in range(n)]
        assert sorted(order) == list(range(n))
        windows, open_, left, changes = [], [], 0, 0
        for k, b in enumerate(order):  # cut the order where the pieces begun so far are read whole
            piece = bisect_right(edges, b) - 1
            if piece not in open_:
                open_.append(piece)
                left += size[piece]
            changes += k > 0 and piece != bisect_right(edges, order[k - 1]) - 1
            left -= 1
            if left == 0:
                windows.append(sorted(open_))
                open_ = []
        assert not open_ and len(windows) == -(-(len(edges) - 1) // 2)  # each window read whole, once
        assert all(len(w) == 2 for w in windows[:-1])
        assert any(w[1] - w[0] > 1 for w in windows)  # random shards, not neighbours
        assert changes > 3 * len(windows)  # a window's shards mixed, not read one after the other
    first = [blocks.position(k) for k in range(n)]
    assert first != [blocks.position(n + k) for k in range(n)]
    global_ = PackedBlocks(stream, 64, True, 3)
    assert [PackedBlocks(stream, 64, True, 3, window=0).position(k) for k in range(n)] == [
        global_.position(k) for k in range(n)
    ]
    assert PackedBlocks(stream, 64, True, 3, window=n).window == n  # a window of the whole epoch: global


def test_windowed_shuffle_resumes_exactly_and_refuses_another_window(data_dir):
    whole = take_steps(loader(data_dir, shuffle_window=640), 8)
    first = loader(data_dir, shuffle_window=640)
    take_steps(first, 3)
    state = first.position.state_dict()
    assert state["shuffle_window"] == 640
    np.testing.assert_array_equal(np.concatenate(take_steps(loader(data_dir, shuffle_window=640, state=state), 5)),
                                  np.concatenate(whole[3:]))  # fmt: skip
    with pytest.raises(Mismatch, match="data.shuffle_window: 640 -> 0"):
        loader(data_dir, state=state)


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
    state = first.position.state_dict()
    assert {k: state[k] for k in ("blocks_consumed", "block_size", "global_batch", "mix", "shuffle_window",
                                  "stages")} == {"blocks_consumed": 16, "block_size": 64, "global_batch": 4,
                                                 "mix": [[data_dir.name, 1.0]], "shuffle_window": 0,
                                                 "stages": [[0, [1.0], 64]]}  # fmt: skip
    rest = take_steps(loader(data_dir, micro=2, accum=2, state=state, workers=workers), 5, accum=2)
    for a, b in itertools.zip_longest(full[8:], rest):
        np.testing.assert_array_equal(a, b)


def test_the_data_position_refuses_what_would_order_the_blocks_differently(data_dir, data_dir_b):
    """Every change that reorders the blocks already trained is named at once; what does not is accepted (the
    number of ranks with the same global batch, a moved directory)."""
    first = loader(data_dir, micro=2, accum=2)
    take_steps(first, 2, accum=2)
    state = first.position.state_dict()
    with pytest.raises(Mismatch) as refused:
        loader(data_dir, block=32, micro=4, accum=2, state=state)
    assert refused.value.changes == [
        "the global batch: 4 blocks per step, now 8; train.global_batch_size=4 keeps it on any number of ranks",
        "data.block_size: 64 -> 32",
    ]
    with pytest.raises(Mismatch, match=r"the training mixture \(\[\['prepared', 1.0\]\] -> "):
        loader([src(data_dir, 3.0), src(data_dir_b, 1.0)], micro=2, accum=2, state=state)
    moved = loader([src(data_dir, name="elsewhere")], micro=1, accum=2, world=2, state=state)
    assert moved.position.blocks_consumed == 8


def test_block_larger_than_split_is_refused(data_dir):
    with pytest.raises(UserError, match="fewer than one block"):
        loader(data_dir, block=10**7)


@pytest.mark.parametrize("weights", [[1.0], [3.0, 1.0], [0.5, 0.3, 0.2], [0.97, 0.02, 0.01], [1.0, 1.0]])
def test_mixture_realizes_the_weights_at_every_length(weights):
    mix = Mixture(weights)
    share = np.asarray(weights) / sum(weights)
    seen = np.zeros(len(weights))
    next_k = [0] * len(weights)
    for g in range(3 * Mixture.PERIOD + 123):
        i, k = mix(g)
        assert k == next_k[i]  # each source's blocks are taken in order, none skipped or repeated
        next_k[i] += 1
        seen[i] += 1
        assert np.all(np.abs(seen - share * (g + 1)) <= 1.5)  # never more than ~one block off, at any length
    assert np.all(np.abs(seen / seen.sum() - share) < 0.02 * share + 1e-3)


def test_mixed_loader_draws_sources_by_weight_and_resumes_exactly(data_dir, data_dir_b):
    sources = [src(data_dir, 3.0), src(data_dir_b, 1.0), src(data_dir, 0.0, name="val_only")]
    ld = loader(sources, micro=4, accum=2)
    got = take_steps(ld, 50, accum=2, key="source")
    counts = np.bincount(np.concatenate(got), minlength=2)
    assert abs(counts[0] / counts.sum() - 0.75) < 0.02  # weight 0: evaluated only, never trained on
    # the blocks really come from the right corpus: each block occurs in its source's token stream
    b = MixedBlocks(sources, 64, True, 7, False)
    for g in range(20):
        i, k = b.mixture(g)
        item = b[g]
        stream = b.blocks[i].stream
        np.testing.assert_array_equal(item["input_ids"].numpy(), stream.read(b.blocks[i].position(k), 64))
    full = take_steps(loader(sources, micro=4, accum=2), 30, accum=2)
    first = loader(sources, micro=4, accum=2)
    take_steps(first, 13, accum=2)
    rest = take_steps(loader(sources, micro=4, accum=2, state=first.position.state_dict()), 17, accum=2)
    for x, y in itertools.zip_longest(full[26:], rest):
        np.testing.assert_array_equal(x, y)


def test_staged_mixture_continues_each_source_and_realizes_each_stage():
    stages = [Stage(0, (3.0, 1.0), 64), Stage(1000, (1.0, 3.0), 64), Stage(5000, (0.0, 1.0), 64)]
    mix = StagedMixture(stages)
    got = [mix(g) for g in range(8000)]
    for i in (0, 1):  # each source's blocks continue across the boundaries: none skipped or read twice
        ks = [k for j, k in got if j == i]
        assert ks == list(range(len(ks)))
    for j, (lo, hi, share_a) in enumerate([(0, 1000, 0.75), (1000, 5000, 0.25), (5000, 8000, 0.0)]):
        sources = [i for i, _ in got[lo:hi]]
        assert sources.count(0) / len(sources) == pytest.approx(share_a, abs=1e-3)
        assert {mix.stage_of(g) for g in range(lo, hi)} == {j}
    assert mix.blocks_in(0) == [750, 250] and mix.blocks_in(1) == [1000, 3000] and mix.blocks_in(2) is None
    assert StagedMixture([Stage(0, (3.0, 1.0), 64)])(12345) == Mixture([3.0, 1.0])(12345)  # one stage: the mixture
    # a stage of longer blocks continues each source where the tokens read leave it (100 x 64 = 50 x 128 tokens)
    longer = StagedMixture([Stage(0, (1.0,), 64), Stage(100, (1.0,), 128), Stage(150, (1.0,), 128)])
    assert [longer(g) for g in (99, 100, 149, 150)] == [(0, 99), (0, 50), (0, 99), (0, 100)]
    assert (longer.block_size(99), longer.block_size(100)) == (64, 128)


def stage(until, **weights):
    return StageConfig(until=until, weights=weights)


def test_staged_loader_resumes_exactly_inside_and_across_stages(data_dir, data_dir_b):
    sources = [src(data_dir, name="a"), src(data_dir_b, name="b")]
    stages = [stage(5, a=3, b=1), stage(0, a=1, b=3)]

    whole = take_steps(loader(sources, micro=4, accum=2, stages=stages), 12, accum=2, key="source")
    per_step = [np.concatenate(whole[2 * s : 2 * s + 2]) for s in range(12)]
    assert np.mean(np.concatenate(per_step[:5]) == 0) == pytest.approx(0.75, abs=0.03)  # stage 1: a 3, b 1
    assert np.mean(np.concatenate(per_step[5:]) == 0) == pytest.approx(0.25, abs=0.03)  # stage 2: a 1, b 3
    tokens = take_steps(loader(sources, micro=4, accum=2, stages=stages), 12, accum=2)
    for at in (3, 5, 8):  # inside stage 1, at the boundary, inside stage 2
        first = loader(sources, micro=4, accum=2, stages=stages)
        take_steps(first, at, accum=2)
        rest = take_steps(
            loader(sources, micro=4, accum=2, stages=stages, state=first.position.state_dict()), 12 - at, 2
        )
        for x, y in itertools.zip_longest(tokens[2 * at :], rest):
            np.testing.assert_array_equal(x, y)
    first = loader(sources, micro=4, accum=2, stages=stages)
    take_steps(first, 8, accum=2)
    state = first.position.state_dict()
    assert first.stage(state["blocks_consumed"]) == 1
    assert first.describe_stage(0) == "data stage 1 of 2 (steps 1-5): a 75.0%, b 25.0% of the blocks"
    # a stage that has begun cannot change; a stage appended after the resume step can
    for changed in ([stage(4, a=3, b=1), stage(0, a=1, b=3)], [stage(5, a=3, b=1), stage(0, a=1, b=2)]):
        with pytest.raises(
            Mismatch, match="the data mixture of the 8 steps already trained .*: stages that have begun"
        ):
            loader(sources, micro=4, accum=2, stages=changed, state=state)
    more = [stage(5, a=3, b=1), stage(10, a=1, b=3), stage(0, a=1, b=0)]
    rest = take_steps(loader(sources, micro=4, accum=2, stages=more, state=state), 4, accum=2, key="source")
    np.testing.assert_array_equal(np.concatenate(rest[:4]), np.concatenate(whole[16:20]))  # steps 9-10 as before
    assert (np.concatenate(rest[4:]) == 0).all()  # steps 11-12: the appended stage
    # a run without stages may take them on from where it is, its past mixture kept
    plain = loader(sources[:1] + [src(data_dir_b, 3.0, name="b")], micro=4, accum=2)
    take_steps(plain, 2, accum=2)
    loader(sources, micro=4, accum=2, stages=[stage(2, a=1, b=3), stage(0, a=1)], state=plain.position.state_dict())


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory, corpus_dir, tokenizer_dir):
    """Documents of a few lines each (~20-60 tokens), so a block holds several."""
    import json

    root = tmp_path_factory.mktemp("short")
    lines = [ln for f in sorted(corpus_dir.iterdir())[:6] for ln in f.read_text().splitlines() if ln.strip()]
    docs = ["\n".join(lines[i : i + 4]) for i in range(0, len(lines), 4)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = root / "prepared"
    prepare(tokenizer_dir, out, [str(root / "docs.jsonl")], val_fraction=0.1, chunk_tokens=500, progress=False)
    return out


def test_document_positions_restart_at_each_document():
    pos = document_positions(10, np.array([0, 3, 4, 8]))
    assert pos.tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 0, 1]
    assert document_positions(4, np.array([2])).tolist() == [0, 1, 0, 1]  # a block starts mid-document


def test_document_mask_blocks_carry_positions_and_ignore_boundary_labels(short_docs):
    data_dir = short_docs
    b = MixedBlocks([src(data_dir)], 256, False, 0, document_mask=True)
    stream = b.blocks[0].stream
    seen_boundaries = 0
    for g in range(b.blocks[0].per_epoch):
        item = b[g]
        ids, starts = stream.read(g * 256, 256, with_starts=True)
        assert item["input_ids"].tolist() == ids.tolist()
        pos, labels = item["position_ids"].numpy(), item["labels"].numpy()
        for s in starts[starts > 0]:
            assert ids[s - 1] == read_manifest(data_dir)["tokenizer"]["eos_id"]  # each document ends with EOS
            assert pos[s] == 0 and labels[s] == -100
            seen_boundaries += 1
        assert (labels == -100).sum() == (starts > 0).sum()
    assert seen_boundaries > 100


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_document_mask_loss_equals_documents_run_one_by_one(short_docs, family):
    """A packed block with document masking = its documents run alone (token-weighted), to float precision."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(vocab_size=512, attn_implementation="sdpa", initializer_range=0.2)  # large weights: context matters
    if family == "gpt2":
        config = AutoConfig.for_model("gpt2", n_layer=2, n_head=2, n_embd=32, n_positions=256, **kw)
    else:
        config = AutoConfig.for_model(
            "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, **kw,
        )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    b = MixedBlocks([src(short_docs)], 256, False, 0, document_mask=True)
    stream = b.blocks[0].stream
    block = next(g for g in range(100) if len(stream.read(g * 256, 256, with_starts=True)[1]) >= 3)
    item = b[block]
    with torch.no_grad():
        packed = model(
            input_ids=item["input_ids"][None],
            labels=item["labels"][None],
            position_ids=item["position_ids"][None],
            use_cache=False,
        ).loss.item()
        plain = model(input_ids=item["input_ids"][None], labels=item["input_ids"][None], use_cache=False).loss.item()
        _, starts = stream.read(block * 256, 256, with_starts=True)
        bounds = [*starts.tolist(), 256] if starts[0] == 0 else [0, *starts.tolist(), 256]
        nll, count = 0.0, 0
        for lo, hi in itertools.pairwise(bounds):
            if hi - lo < 2:
                continue
            doc = item["input_ids"][lo:hi][None]
            nll += model(input_ids=doc, labels=doc, use_cache=False).loss.item() * (hi - lo - 1)
            count += hi - lo - 1
    assert len(bounds) >= 4
    assert abs(packed - nll / count) <= 1e-5 * abs(packed)
    assert abs(plain - packed) > 1e-3  # without the mask the documents see each other: a different loss


def test_compressed_shards_read_the_same_and_need_no_shared_memory(tmp_path, corpus_dir, tokenizer_dir, data_dir):
    out = tmp_path / "zstd"
    prepare(
        tokenizer_dir, out, [str(corpus_dir)], val_fraction=0.15, chunk_tokens=1000, shard_bytes=1 << 14,
        compression="zstd", progress=False,
    )  # fmt: skip
    shm_before = set(os.listdir("/dev/shm"))
    plain, packed = ChunkStore(data_dir / "train"), ChunkStore(out / "train")
    assert len(plain) == len(packed)
    for i in range(len(plain)):
        np.testing.assert_array_equal(plain[i]["tokens"], packed[i]["tokens"])
        for store in (plain, packed):  # the memory-mapped views are what streaming's own decoding gives
            for column, values in store[i].items():
                np.testing.assert_array_equal(store.arrays(i)[column], values)
    assert new_in_shared_memory(shm_before) == set()  # reading leaves nothing in shared memory
    assert not list((out / "train").glob(".*.tmp"))


def test_changed_directory_is_refused(tmp_path, data_dir):
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    m = read_manifest(copy)
    m["splits"]["train"]["chunks"] += 1
    with pytest.raises(UserError, match="the directory was changed after prepare"):
        TokenStream(copy, "train", m)
