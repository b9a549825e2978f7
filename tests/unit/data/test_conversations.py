"""Fine-tuning records -> ids and a loss mask -> packed blocks of whole conversations (data/conversations.py)."""

from __future__ import annotations

import numpy as np
import pytest

from dist_clm.data import conversations
from dist_clm.errors import UserError


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


@pytest.mark.parametrize("fmt", ["chat", "preference"])
def test_plain_text_files_for_a_records_format_are_one_sentence_before_anything_is_written(tmp_path, fmt):
    from dist_clm.data.prepare import prepare

    (tmp_path / "notes.txt").write_text("just text, no messages\n")
    with pytest.raises(UserError, match=rf"--format {fmt} reads records .* but '.*notes.txt' is plain text; write its"):
        prepare(tmp_path / "no-tokenizer", tmp_path / "out", [str(tmp_path / "notes.txt")], fmt=fmt, block_size=64)
    assert not (tmp_path / "out").exists()
