"""Fast unit tests of pure parts only exercised by real runs elsewhere: what a training step gives the model
(step.model_inputs), the node cache of remote data (remote.py: URLs, sizes, eviction), fine-tuning records ->
ids + loss mask -> packed blocks (conversations.py), and the one console path (console.py)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import types
from pathlib import Path
from string import hexdigits

import numpy as np
import pytest
import torch

from dist_clm import console
from dist_clm.data import conversations, remote
from dist_clm.errors import UserError, agreed
from dist_clm.training import step

# ---- step.model_inputs


def fake_run(feeds_documents: bool):
    """The parts of a Run that model_inputs reads: the device, the (DeepSpeed) engine's module and its attention,
    the sequence-parallel place (none)."""
    from dist_clm.parallel.sequence_parallel import SequenceParallel

    module = torch.nn.Module()
    module.config = types.SimpleNamespace(_attn_implementation="flash_attention_2" if feeds_documents else "sdpa")
    if feeds_documents:
        module._dist_clm_feeds_documents = True  # what attention.feed_documents marks a flash model with
    return types.SimpleNamespace(env=types.SimpleNamespace(device=torch.device("cpu")),
                                 engine=types.SimpleNamespace(module=module), sp=SequenceParallel())  # fmt: skip


@pytest.mark.parametrize("document_mask, flash", [(False, False), (True, False), (True, True)])
def test_model_inputs_are_the_micro_batch_plus_flash_bounds_for_a_model_that_takes_them(document_mask, flash):
    """The model gets the micro batch's tensors unchanged (ids, labels; position ids with document masking); rows
    of one sequence for sdpa also an all-ones padding mask (attention.no_padding); a flash model (feeds_documents)
    the variable-length cuts at every document start and every row start of the B x L tokens, as int32, with L as
    the longest sequence; the batch itself is left as it was."""
    ids, positions = torch.arange(10).view(2, 5), torch.tensor([[0, 1, 2, 0, 1], [2, 3, 0, 1, 2]])  # row 1: mid-doc
    batch = {"input_ids": ids, "labels": ids + 1} | ({"position_ids": positions.clone()} if document_mask else {})
    inputs = step.model_inputs(fake_run(flash), batch)
    assert sorted(batch) == ["input_ids", "labels", *(["position_ids"] if document_mask else [])]
    assert all(torch.equal(inputs[k], v) for k, v in batch.items())
    assert not document_mask or torch.equal(batch["position_ids"], positions)
    if not flash:
        padding = {} if document_mask else {"attention_mask": torch.ones_like(ids)}
        assert sorted(inputs) == sorted([*batch, *padding])
        assert all(torch.equal(inputs[k], v) for k, v in padding.items())
        return
    cuts = torch.tensor([0, 3, 5, 7, 10], dtype=torch.int32)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert inputs[key].dtype == torch.int32 and torch.equal(inputs[key], cuts)
    assert inputs["max_length_q"] == inputs["max_length_k"] == 5


# ---- data/remote.py


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The node cache configured under tmp_path with a 300-byte limit; the previous configuration restored after."""
    monkeypatch.setattr(remote, "_CONFIG", remote._CONFIG)
    monkeypatch.setattr(remote, "_MIRRORS", {})
    remote.configure(tmp_path / "cache", 300)
    return tmp_path / "cache"


@pytest.mark.parametrize(
    "path, expected",
    [("s3://bucket/data", True), ("gs://b/p/", True), ("oci://b/x", True), ("file:///tmp/data", False),
     ("/tmp/data", False), ("data/prepared", False), ("c:data", False)],
)  # fmt: skip
def test_is_remote_only_for_object_storage_urls(path, expected):
    """A scheme:// URL is remote, except file://; a plain path is local."""
    assert remote.is_remote(path) is expected


@pytest.mark.parametrize(
    "text, expected",
    [("20GB", 20 * 10**9), ("512MiB", 512 * 2**20), ("1.5k", 1500), ("2 tib", 2 * 2**40), (" 10 ", 10),
     ("64KB", 64_000), (4096, 4096), (0, None), (None, None), ("", None), ("0", None), ("0GB", None), (-1, None)],
)  # fmt: skip
def test_parse_size_decimal_and_binary_units_and_no_limit(text, expected):
    """Sizes: decimal (k, M, G, T) and binary (KiB...) units, case and spaces free; 0 / None / '' mean no limit."""
    assert remote.parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "20 GBs", "1e9", "-5GB", "12 PB"])
def test_parse_size_refuses_what_is_not_a_size(text):
    """Anything else is one sentence naming the key and the value."""
    with pytest.raises(UserError, match=r"data.cache_limit .* is not a size"):
        remote.parse_size(text)


def test_local_dir_of_a_local_path_is_itself_and_mirrors_are_per_url(cache):
    """A local prepared directory is read in place; a URL's mirror is CACHE/<16 hex digits>/ with a SOURCE file,
    one per URL (a trailing slash is the same URL), configured anew by configure()."""
    assert remote.local_dir("/data/prepared") == remote.local_dir(Path("/data/prepared")) == Path("/data/prepared")
    assert remote.mirror_of("/data/prepared") is None
    m = remote.mirror("s3://bucket/data/")
    assert m is remote.mirror("s3://bucket/data") is remote.mirror_of("s3://bucket/data")
    assert m.root.parent == cache and len(m.root.name) == 16 and set(m.root.name) <= set(hexdigits)
    assert (m.root / "SOURCE").read_text() == "s3://bucket/data\n"
    assert remote.mirror("s3://bucket/other").root != m.root
    remote.configure(cache, "1KB")
    assert remote.mirror("s3://bucket/data") is not m and remote._CONFIG.limit == 1000


def put_shard(mirror, split, name, size, age):
    """A cached shard of `size` bytes last read `age` seconds ago."""
    path = mirror.root / split / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    t = 1_700_000_000 - age
    os.utime(path, (t, t))
    return path


def test_making_room_evicts_the_least_recently_read_shards_of_any_mirror(cache):
    """Room for a new shard removes the least recently read shards of the whole cache, no more than needed;
    shard() of a cached shard returns it without a download and marks it recently read."""
    a, b = remote.mirror("s3://bucket/a"), remote.mirror("s3://bucket/b")
    oldest = put_shard(a, "train", "shard.00000.mds", 100, age=40)
    second = put_shard(b, "train", "shard.00000.mds", 100, age=30)
    third = put_shard(a, "val", "shard.00001.mds", 100, age=20)
    (other := a.root / "train" / "index.json").write_text("{}")  # (not a shard: never counted or evicted)
    assert a.shard("train", "shard.00000.mds", 100, check=None) == oldest  # now the most recently read
    assert a._make_room(150)
    assert [p.exists() for p in (oldest, second, third, other)] == [True, False, False, True]
    assert not a._make_room(301)


def test_reserving_room_counts_downloads_in_flight_and_clears_dead_ones(cache):
    """A live download's `.room` holds its bytes; a dead one's room and partial file are removed; a shard larger
    than the whole limit is one sentence saying to raise data.cache_limit."""
    m = remote.mirror("s3://bucket/data")
    kept = put_shard(m, "train", "shard.00000.mds", 100, age=10)
    names = (".shard.00001.mds.room", ".shard.00002.mds.room", ".shard.00002.mds.part")  # 1: alive, 2: dead
    live, dead_room, dead_part = (m.root / "train" / n for n in names)
    for path, size in ((live, 150), (dead_room, 100), (dead_part, 10)):
        path.write_bytes(b"\0" * size)
    with contextlib.ExitStack() as stack:
        for i in (1, 3):  # the downloads of shards 1 and 3 are alive: their locks are held
            fcntl.flock(stack.enter_context(open(m.root / "train" / f".shard.0000{i}.mds.lock", "a")), fcntl.LOCK_EX)
        room = m.root / "train" / ".shard.00003.mds.room"
        m._reserve(room, 50, "shard.00003.mds")  # 100 + 150 + 50 fit in 300: nothing evicted
        assert room.stat().st_size == 50 and kept.exists() and live.exists()
        assert not dead_room.exists() and not dead_part.exists()
        assert not m._make_room(101)  # the rooms in flight hold 200: 101 more cannot fit, whatever goes
        assert kept.exists() and live.exists() and room.exists()  # so the cached shard stays while it waits
        assert m._make_room(100) and not kept.exists()  # 200 + 100 fit once the least recently read shard goes
    with pytest.raises(UserError, match=r"data.cache_limit \(300 bytes\) cannot hold the shard 'big'"):
        m._reserve(m.root / "train" / ".big.room", 301, "big")


def test_not_found_is_told_apart_from_failures_worth_a_retry():
    """A missing file (FileNotFoundError, S3's 404 / NoSuchKey / NoSuchBucket) is not retried; others are."""
    from botocore.exceptions import ClientError

    s3_error = lambda code: ClientError({"Error": {"Code": code, "Message": "m"}}, "GetObject")  # noqa: E731
    assert remote._not_found(FileNotFoundError("x"))
    assert all(remote._not_found(s3_error(c)) for c in ("404", "NoSuchKey", "NoSuchBucket"))
    assert not remote._not_found(s3_error("500")) and not remote._not_found(TimeoutError("slow"))


# ---- data/conversations.py


@pytest.fixture(scope="module")
def tok(chat_tokenizer):
    from dist_clm.data.tokenizer import load_tokenizer

    return load_tokenizer(chat_tokenizer)


def learned_runs(tok, ids, mask):
    """The decoded text of each run of learned tokens."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return [tok.decode(ids[lo:hi]) for lo, hi in zip(edges[::2], edges[1::2], strict=True)]


def test_chat_learns_exactly_each_assistant_turn_and_its_end_of_turn(tok):
    """The chat rendering round-trips; the learned tokens are each assistant turn's content and what the template
    puts after it (<|im_end|> and newline), nothing of the system and user turns."""
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of  France?"},
            {"role": "assistant", "content": "Paris, of course."}, {"role": "user", "content": "And Italy?"},
            {"role": "assistant", "content": "  Rome.\n"}]  # fmt: skip
    ids, mask = conversations.Renderer(tok, "chat")({"messages": msgs}, "line 1")
    assert ids.dtype == mask.dtype == np.int64 and len(ids) == len(mask)
    assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False)
    assert learned_runs(tok, ids, mask) == ["Paris, of course.<|im_end|>\n", "  Rome.\n<|im_end|>\n"]


def test_prompt_completion_strings_learn_the_completion_and_eos_only(tok):
    """String prompt and completion: each tokenized on its own, the completion followed by EOS; both learned."""
    ids, mask = conversations.Renderer(tok, "prompt-completion")({"prompt": "Q: 2 plus 2?", "completion": " A: 4"}, "w")
    p, c = tok("Q: 2 plus 2?")["input_ids"], tok(" A: 4")["input_ids"]
    assert ids.tolist() == p + c + [tok.eos_token_id]
    assert mask.tolist() == [0] * len(p) + [1] * (len(c) + 1)


def test_prompt_completion_messages_learn_the_completions_assistant_turns_only(tok):
    """Lists of messages: an assistant turn in the prompt is context, not learned; the completion's is."""
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "earlier"},
              {"role": "user", "content": "again"}]  # fmt: skip
    record = {"prompt": prompt, "completion": [{"role": "assistant", "content": "answer"}]}
    ids, mask = conversations.Renderer(tok, "prompt-completion")(record, "w")
    assert learned_runs(tok, ids, mask) == ["answer<|im_end|>\n"]


def test_preference_pair_and_bad_records_are_one_sentence(tok):
    """A preference record gives (chosen, rejected) after the same prompt; a pair with equal answers, a chat with
    no assistant turn, an empty completion, mixed string/list columns and unknown roles are refused."""
    chosen, rejected = conversations.Renderer(tok, "preference").pair(
        {"prompt": "Say yes:", "chosen": " yes", "rejected": " no"}, "w")  # fmt: skip
    n = len(tok("Say yes:")["input_ids"])
    assert chosen[0][:n].tolist() == rejected[0][:n].tolist() and chosen[1][:n].sum() == rejected[1][:n].sum() == 0
    assert tok.decode(chosen[0][chosen[1] == 1]) == " yes<|endoftext|>"
    pc, chat = conversations.Renderer(tok, "prompt-completion"), conversations.Renderer(tok, "chat")
    cases = [
        (lambda: pc.pair({"prompt": "p", "chosen": "a", "rejected": "a"}, "line 3"), "line 3 has the same chosen"),
        (lambda: chat({"messages": [{"role": "user", "content": "hi"}]}, "line 4"), "line 4 has no assistant turn"),
        (lambda: pc({"prompt": "p", "completion": ""}, "line 5"), "line 5 has an empty completion"),
        (lambda: pc({"prompt": "p", "completion": [{"role": "assistant", "content": "b"}]}, "l6"), "both be strings"),
        (lambda: chat({"messages": [{"role": "robot", "content": "x"}]}, "l7"), "message 1 of 'messages' must have"),
    ]
    for call, fragment in cases:
        with pytest.raises(UserError, match=fragment):
            call()


def test_columns_name_what_each_format_reads():
    """columns(fmt) lists each fine-tuning format's columns, and a record missing one is told which."""
    assert conversations.columns("chat").names == ("messages",)
    assert conversations.columns("prompt-completion").names == ("prompt", "completion")
    assert conversations.columns("preference").names == ("prompt", "chosen", "rejected")
    with pytest.raises(UserError, match=r"has no column 'completion' .*this --format reads prompt, completion\."):
        conversations.columns("prompt-completion").check({"prompt": "p"}, "line 1")


def conv(n, learned_from=1, tag=1):
    """A conversation of n tokens (ids tag*100 + i) learned from token `learned_from` on."""
    return np.arange(n, dtype=np.int64) + 100 * tag, (np.arange(n) >= learned_from).astype(np.int64)


def test_packing_keeps_conversations_whole_pads_the_rest_truncates_and_drops():
    """Blocks are exactly block_size tokens of whole conversations (first fit, in order) then EOS padding with no
    learning; an over-long conversation keeps its first block_size tokens; one left with no learned target is
    dropped; all counted."""
    p = conversations.Packer(10, pad_id=0)
    a, b, c, d = conv(4, tag=1), conv(7, tag=2), conv(5, tag=3), conv(12, tag=4)
    dropped = (np.array([500, 501, 502]), np.array([1, 0, 0]))  # only its first token learned: never a target
    assert [blk for item in (a, b, c, d, dropped) for blk in p.add(item)] == []  # nothing closed yet
    pad = lambda n: (np.zeros(n), np.zeros(n))  # noqa: E731
    expected = [[a, c, pad(1)], [b, pad(3)], [(d[0][:10], d[1][:10])]]
    as_lists = lambda blocks: [[(i.tolist(), m.tolist()) for i, m in blk] for blk in blocks]  # noqa: E731
    assert as_lists(p.finish()) == as_lists(expected)
    assert p.stats == {"conversations": 4, "truncated": 1, "dropped": 1, "learned_tokens": 3 + 6 + 4 + 9,
                       "padding_tokens": 4}  # fmt: skip
    cut = conversations.Packer(10, 0)
    assert list(cut.add(conv(12, learned_from=10))) == [] and list(cut.finish()) == []  # its learned part cut off
    assert (cut.stats["truncated"], cut.stats["dropped"], cut.stats["conversations"]) == (1, 1, 0)


def test_packing_closes_the_oldest_of_eight_open_blocks_and_keeps_pairs_side_by_side():
    """A ninth block to open closes the oldest; with two lanes a pair's chosen and rejected sit at the same rank
    of two blocks that follow each other."""
    p = conversations.Packer(10, pad_id=0)
    closed = [list(p.add(conv(6, tag=t))) for t in range(9)]
    assert [len(c) for c in closed] == [0] * 8 + [1] and closed[8][0][0][0].tolist() == list(range(6))
    pairs = conversations.Packer(10, pad_id=0, lanes=2)
    for n_chosen, n_rejected, tag in ((3, 6, 1), (3, 5, 3), (2, 4, 5)):  # the third pair fits beside the first
        assert list(pairs.add(conv(n_chosen, tag=tag), conv(n_rejected, tag=tag + 1))) == []
    firsts = [[int(ids[0]) for ids, _ in blk] for blk in pairs.finish()]
    assert firsts == [[100, 500, 0], [200, 600], [300, 0], [400, 0]]  # (0: padding)


# ---- console.py


@pytest.fixture
def bound(monkeypatch):
    """Restores the console's binding afterwards; no rank or node from the environment."""
    ctx = console._CONTEXT
    saved = (ctx.rank, ctx.world, ctx.node, ctx.run)
    for var in ("RANK", "SLURM_PROCID", "SLURMD_NODENAME"):
        monkeypatch.delenv(var, raising=False)
    yield console.bind
    console.bind(*saved)


def test_one_process_prints_the_text_alone(bound, capsys):
    """A one-process run: info on stdout, warning on stderr marked as one, no rank prefix."""
    bound(0, 1, "nodeA")
    console.info("step 1")
    console.warning("careful")
    assert capsys.readouterr() == ("step 1\n", "warning: careful\n")


def test_multi_rank_lines_name_the_rank_and_info_is_the_main_ranks(bound, capsys):
    """Rank 0 of 2 says its info with `[rank 0/2 node]`; another rank says only every_rank info and its warnings,
    prefixed with itself; a warning every rank reaches alike (every_rank=False) is said by the main rank only."""
    bound(0, 2, "nodeA")
    console.info("main says")
    console.warning("alike", every_rank=False)
    assert capsys.readouterr() == ("[rank 0/2 nodeA] main says\n", "[rank 0/2 nodeA] warning: alike\n")
    bound(3, 4, "nodeB")
    console.info("not said")
    console.warning("alike", every_rank=False)
    console.info("mine", every_rank=True)
    console.warning("my own")
    assert capsys.readouterr() == ("[rank 3/4 nodeB] mine\n", "[rank 3/4 nodeB] warning: my own\n")


def test_error_line_is_said_once_or_by_the_rank_that_met_it(bound, capsys, monkeypatch):
    """`dist-clm: error: ...` on stderr: by the main rank bare, by another rank with `rank R: ` (and its SLURM
    node), and an agreed error only by the main rank."""
    bound(0, 2, "n0")
    console.error(agreed(UserError("every rank broke.")))
    assert capsys.readouterr() == ("", "dist-clm: error: every rank broke.\n")
    bound(1, 2, "n1")
    console.error(agreed(UserError("every rank broke.")))
    console.error(UserError("my shard is bad."))
    monkeypatch.setenv("SLURMD_NODENAME", "gpu07")
    console.error(UserError("mine again."))
    assert capsys.readouterr() == ("", "dist-clm: error: rank 1: my shard is bad.\n"
                                       "dist-clm: error: rank 1 on gpu07: mine again.\n")  # fmt: skip
