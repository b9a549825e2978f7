"""The blocks and documents behind a step (data/step_blocks.py): where a step starts past rolled-back windows, the
runs of a step a rollback undid, and the document pieces of a block against the stream's document starts."""

import json
from types import SimpleNamespace

import numpy as np

from dist_clm.data.step_blocks import first_block, pieces, undone_starts
from dist_clm.data.stream import TokenStream


def position(skips: list[dict], global_batch: int = 4):
    ends = {s["from_block"]: s["to_block"] for s in skips}
    return SimpleNamespace(global_batch=global_batch, skip_ends=lambda: ends, skipped_windows=lambda: skips)


def test_a_step_starts_where_the_one_before_ended_past_every_skipped_window():
    # a rollback at step 5 back to the checkpoint of step 2 skipped the blocks of steps 3-5 ([8, 20)); a second
    # one at step 7 (after the first) back to step 6 skipped that step's window too
    skips = [{"from_block": 8, "to_block": 20, "diverged_at_step": 5, "reason": "r1"},
             {"from_block": 36, "to_block": 40, "diverged_at_step": 7, "reason": "r2"}]  # fmt: skip
    p = position(skips)
    assert [first_block(p, s) for s in range(1, 9)] == [0, 4, 20, 24, 28, 32, 40, 44]
    assert [first_block(position([]), s) for s in (1, 2, 10)] == [0, 4, 36]
    # the undone runs: steps 3-5 first ran on [8, 20), step 7 first on [36, 40)
    assert undone_starts(p, 3) == [{"first_block": 8, "reason": "r1", "diverged_at_step": 5}]
    assert [u["first_block"] for u in undone_starts(p, 5)] == [16]
    assert [u["first_block"] for u in undone_starts(p, 7)] == [36]
    assert undone_starts(p, 2) == undone_starts(p, 6) == []


def test_the_pieces_of_a_block_are_its_documents_read_back_from_their_ranges(data_dir):
    stream = TokenStream(data_dir, "train", json.loads((data_dir / "manifest.json").read_text()))
    everything = stream.read(0, stream.tokens, with_starts=True)[1]
    inner = next(int(s) for s in everything if s > 3 * stream.chunk_tokens)  # a document far into the stream
    for offset, size in ((0, 64), (inner - 10, 64), (inner + 5, 3 * stream.chunk_tokens), (stream.tokens - 64, 64)):
        ids = np.empty(size, dtype=np.int64)
        found = pieces(stream, offset, ids)
        assert (ids == stream.read(offset, size)).all()
        assert [p.at for p in found][0] == 0 and sum(p.end - p.start for p in found) == size
        for p in found:
            assert p.document in set(everything.tolist())  # each id is where a document starts
            assert p.document == 0 or p.document <= offset + p.at  # ... at or before the piece
            assert (stream.read(p.document + p.start, p.end - p.start) == ids[p.at : p.at + p.end - p.start]).all()
    first = pieces(stream, inner - 10, np.empty(64, dtype=np.int64))
    assert first[0].document < inner and first[1].document == inner and first[1].start == 0 and first[1].at == 10
