"""Preference data for DPO / ORPO: pairs prepared once with loss masks, packed into a chosen block and a rejected
block that follow each other, and read pair by pair (shuffled by pairs, never split)."""

import json
import math

import numpy as np
import pytest
import torch

from dist_clm.config import load_config
from tests.helpers import PREF_BLOCK, TINY_PREF, assert_clean_error, run_cli


def test_pairs_are_packed_into_a_chosen_and_a_rejected_block_in_the_same_order(pref_data):
    from dist_clm.data.format import read_manifest
    from dist_clm.data.stream import TokenStream
    from dist_clm.data.synthetic import REFUSALS
    from dist_clm.data.tokenizer import load_tokenizer

    manifest = read_manifest(pref_data)
    assert manifest["fine_tuning"]["objective"] == "dpo" and manifest["fine_tuning"]["pairs"]
    train = manifest["splits"]["train"]
    assert train["tokens"] % (2 * PREF_BLOCK) == 0 and train["conversations"] > 150  # whole pairs of blocks
    tok = load_tokenizer(pref_data / "tokenizer")
    stream = TokenStream(pref_data, "train", manifest)
    ids, learned, positions = stream.read_learned(0, stream.tokens)
    for start in range(0, stream.tokens, 2 * PREF_BLOCK):
        segments = []
        for block in (start, start + PREF_BLOCK):
            s = slice(block, block + PREF_BLOCK)
            docs = np.split(np.arange(PREF_BLOCK), np.flatnonzero(positions[s] == 0)[1:])
            segments.append([d for d in docs if learned[s][d].any()])  # conversations (not padding)
        chosen, rejected = segments
        assert len(chosen) == len(rejected) > 0
        for c, r in zip(chosen, rejected, strict=True):
            c_text, r_text = tok.decode(ids[start + c]), tok.decode(ids[start + PREF_BLOCK + r])
            assert c_text.split("<|im_start|>assistant")[0] == r_text.split("<|im_start|>assistant")[0]  # one prompt
            assert (
                tok.decode(ids[start + PREF_BLOCK + r][learned[start + PREF_BLOCK + r] == 1]).split("<|im_end|>")[0]
                in REFUSALS
            )
            assert " is " in tok.decode(ids[start + c][learned[start + c] == 1])


def test_the_loader_keeps_each_pair_together_and_shuffles_by_pairs(pref_data):
    from dist_clm.data.batches import MixedBlocks
    from dist_clm.data.format import read_manifest
    from dist_clm.data.order import Source

    source = Source("pref", str(pref_data), read_manifest(pref_data))
    blocks = MixedBlocks([source], PREF_BLOCK, shuffle=True, seed=3, document_mask=True)
    plain = MixedBlocks([source], PREF_BLOCK, shuffle=False, seed=3, document_mask=True)
    stored = {tuple(plain.__getitems__([k])["input_ids"][0]) for k in range(0, 2 * blocks.blocks[0].per_epoch)}
    batch = {k: torch.as_tensor(v) for k, v in blocks.__getitems__(list(range(16))).items()}
    offsets = [blocks.offset(0, k) for k in range(16)]
    assert all(offsets[2 * j + 1] == offsets[2 * j] + PREF_BLOCK for j in range(8))  # rejected follows its chosen
    assert all(o % (2 * PREF_BLOCK) == 0 for o in offsets[::2])  # every pair starts at a pair boundary
    assert offsets[::2] != sorted(offsets[::2])  # shuffled, by pairs
    assert all(tuple(row.tolist()) in stored for row in batch["input_ids"])


def test_a_pair_whose_answers_are_the_same_is_one_sentence_and_writes_nothing(tmp_path, chat_tokenizer):
    path = tmp_path / "bad.jsonl"
    same = [{"role": "assistant", "content": "4."}]
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "2+2?"}], "chosen": same, "rejected": same}))
    out = tmp_path / "out"
    r = run_cli("prepare", str(path), "--tokenizer", str(chat_tokenizer), "--out", str(out), "--format", "preference",
                "--block-size", "64", "--quiet")  # fmt: skip
    assert_clean_error(r, "line 1 of", "has the same chosen and rejected answer")
    assert not out.exists()


def test_pairs_given_as_plain_strings_learn_each_answer_and_its_end(tmp_path, chat_tokenizer):
    """Preference records whose prompt and answers are plain text: the prompt is context, each answer and the
    end-of-text token after it are learned; chosen and rejected sit at the same place of blocks that follow each
    other."""
    from dist_clm.data.format import read_manifest
    from dist_clm.data.stream import TokenStream
    from dist_clm.data.tokenizer import load_tokenizer

    records = [{"prompt": f"Q: {a} plus {b}?\nA:", "chosen": f" {a + b}.", "rejected": f" {a + b + 1}."}
               for a in range(20) for b in range(5)]  # fmt: skip
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "data"
    r = run_cli("prepare", str(path), "--tokenizer", str(chat_tokenizer), "--out", str(out), "--format", "preference",
                "--block-size", "64", "--val-fraction", "0.1", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = read_manifest(out)
    splits = manifest["splits"]
    assert manifest["fine_tuning"]["pairs"]
    assert splits["train"]["conversations"] + splits["val"]["conversations"] == len(records)  # pairs
    tok = load_tokenizer(out / "tokenizer")
    found = set()
    for split in ("train", "val"):
        stream = TokenStream(out, split, manifest)
        ids, learned, positions = stream.read_learned(0, stream.tokens)
        for start in range(0, stream.tokens, 128):
            sides = []
            for block in (start, start + 64):  # the chosen block, then the rejected one
                s = slice(block, block + 64)
                docs = np.split(np.arange(64), np.flatnonzero(positions[s] == 0)[1:])
                sides.append([(tok.decode(ids[s][d][learned[s][d] == 0]), tok.decode(ids[s][d][learned[s][d] == 1]))
                              for d in docs if learned[s][d].any()])  # fmt: skip
            for (prompt, chosen), (prompt_again, rejected) in zip(*sides, strict=True):
                assert prompt == prompt_again
                found.add((prompt.strip(), chosen, rejected))
    eos = tok.eos_token
    assert found == {(r["prompt"], r["chosen"] + eos, r["rejected"] + eos) for r in records}


def test_prepare_reference_says_what_it_computes_then_its_progress(pref_data, start_model):
    """Before the model loads: the pairs, the blocks and the model; then its progress, block by block, with the
    time left (what a log file gets every DIST_CLM_PROGRESS_SECONDS); then the record it wrote."""
    manifest = json.loads((pref_data / "manifest.json").read_text())
    pairs = {split: s["documents"] for split, s in manifest["splits"].items()}
    lines = (start_model.parent / "prepare-reference.out").read_text().splitlines()
    assert (
        lines[0].startswith(
            f"prepare-reference: the log-probabilities of {sum(pairs.values())} pairs (train "
            f"{pairs['train']}, val {pairs['val']}; "
        )
        and f"under {start_model}, on " in lines[0]
    )
    progress = lines[1:-1]
    assert progress and all(line.startswith("prepare-reference: ") and " blocks (" in line for line in progress)
    assert "left" in progress[0] and "(100%)" in progress[-1]
    assert lines[-1].startswith("reference values of the conversations")


def test_damaged_preference_data_stops_a_dpo_run_with_one_sentence(tmp_path, pref_data, start_model):
    """A shard whose bytes changed after prepare: the step that reads it trains a blank batch (no pairs, no
    reference values), the update is dropped and the run stops with the shard's sentence, no traceback."""
    import shutil

    from tests.helpers import metrics, train_losses

    data = tmp_path / "data"
    shutil.copytree(pref_data, data)
    shards = sorted((data / "train").glob("shard.*.mds"))
    for shard in shards:  # the first step's reads find it, wherever the shuffle starts
        raw = bytearray(shard.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        shard.write_bytes(bytes(raw))
    run = tmp_path / "run"
    r = run_cli("train", *TINY_PREF, f"data.path={data}", f"run.dir={run}", f"model.pretrained={start_model}",
                "train.max_steps=4", "train.log_every=1")  # fmt: skip
    assert_clean_error(r, "does not match its xxh3_64 hash", "prepare the data again")
    rows = metrics(run) if (run / "metrics.jsonl").exists() else []
    assert not train_losses(rows)  # the step on the blank batch was not applied


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_reward_accuracy_rises_in_training_and_on_held_out_pairs(tmp_path, pref_data, start_model, objective):
    """The reward accuracy rises on the training pairs and on the held-out ones; validation is the held-out pairs'
    (reward accuracy and margin, the objective's loss, over every pair of the validation split), not a perplexity
    of chosen and rejected answers together, which the objective raises; the console says it, and the export's
    card headlines the objective and those figures."""
    from dist_clm.data.format import read_manifest
    from dist_clm.evaluation.export import export
    from tests.helpers import metrics

    run = tmp_path / objective
    # dpo from the SFT model its reference values were computed with; orpo (no reference) from scratch
    start = [f"model.pretrained={start_model}"] if objective == "dpo" else []
    r = run_cli("train", *TINY_PREF, f"data.path={pref_data}", f"run.dir={run}", *start,
                f"objective.kind={objective}", "train.max_steps=150", "optim.lr=1e-3", "train.log_every=1",
                "objective.dpo_beta=0.5", "train.eval_blocks=0")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [row for row in metrics(run) if "train/reward_accuracy" in row]
    first, last = rows[0]["train/reward_accuracy"], rows[-1]["train/reward_accuracy"]
    # up to above 90%: from a tie for dpo (its step 1: the policy is its reference, every reward 0), from what the
    # random initial weights give for orpo
    assert (first < 0.75 if objective == "dpo" else first < last) and last > 0.9, [
        row["train/reward_accuracy"] for row in rows
    ]
    assert rows[-1]["train/reward_margin"] > rows[0]["train/reward_margin"]

    held_out = read_manifest(pref_data)["splits"]["val"]["conversations"]  # (of pairs: the pairs)
    before, after = [row for row in metrics(run) if "val/loss" in row]
    assert (before["step"], after["step"]) == (0, 150) and "val/perplexity" not in before | after
    assert before["val/pairs"] == after["val/pairs"] == held_out
    if objective == "dpo":  # the policy is its reference: every reward 0
        assert before["val/reward_margin"] == pytest.approx(0, abs=1e-4)
        assert before["val/loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert after["val/reward_accuracy"] > 0.9 and after["val/reward_margin"] > before["val/reward_margin"] + 1
    assert after["val/loss"] < before["val/loss"]
    accuracy = f"reward accuracy {after['val/reward_accuracy']:.3f}"
    assert f"step 150: validation on {held_out} held-out pairs: {accuracy}, reward margin " in r.stdout + r.stderr

    card = (export(run, tmp_path / "hf") / "README.md").read_text()
    how = "DPO (beta 0.5) from `model`" if objective == "dpo" else "ORPO (lambda 0.1) from scratch"
    assert f"preference-tuned with {how} with dist_clm; exported from checkpoint `step_00000150`" in card
    assert (f"Held-out preference pairs at step 150 ({held_out} pairs of the data's validation split, in blocks of "
            f"{PREF_BLOCK} tokens): {accuracy}") in card  # fmt: skip
    assert f"reward margin {after['val/reward_margin']:.4g}" in card and "perplexity" not in card


def test_held_out_pairs_are_scored_whole_and_alike_on_any_number_of_ranks(pref_data, start_model):
    """DPO's validation on the held-out pairs, each rank scoring every world-th pair of blocks: with the model
    the reference values were computed with, every reward is 0 (each value met its own conversation); with
    values moved at random, the shares of 2 and 3 ranks (in micro batches of another size) add up to one rank's
    figures, every pair of the split counted once."""
    from dist_clm.config import ObjectiveConfig
    from dist_clm.data.format import read_manifest
    from dist_clm.data.reference_store import load_values
    from dist_clm.data.stream import TokenStream
    from dist_clm.evaluation.export import load_model
    from dist_clm.training import objectives, preference

    model = load_model(start_model)[0]
    manifest = read_manifest(pref_data)
    stream, units = TokenStream(pref_data, "val", manifest), manifest["splits"]["val"]["tokens"] // (2 * PREF_BLOCK)
    dpo = objectives.for_run(ObjectiveConfig(kind="dpo", dpo_beta=0.5), 0.0)
    offsets, values = load_values(pref_data, "val")
    n, chosen, rejected, right, unpaired, loss, nll, tokens = preference.held_out(
        model, dpo.measure, stream, (offsets, values), PREF_BLOCK, units, 2, "cpu"
    )
    assert n == manifest["splits"]["val"]["conversations"] and not unpaired and tokens > n and nll > 0
    assert chosen == pytest.approx(0, abs=1e-3) and rejected == pytest.approx(0, abs=1e-3)
    assert loss == pytest.approx(n * math.log(2), rel=1e-4)

    moved = (offsets, values + np.random.default_rng(0).normal(0, 1, len(values)))
    scored = (model, dpo.measure, stream, moved, PREF_BLOCK, units)
    one = preference.held_out(*scored, 2, "cpu")
    assert 0 < one[3] < n  # (some pairs ranked right, some wrong: a test that can tell)
    for world in (2, 3):
        shares = [preference.held_out(*scored, 1, "cpu", rank, world) for rank in range(world)]
        np.testing.assert_allclose(np.sum(shares, axis=0), one, rtol=1e-5)


def test_dpo_resumes_exactly_and_refuses_another_reference(tmp_path, pref_data, start_model):
    import shutil

    from tests.helpers import metrics, train_losses

    run = tmp_path / "run"
    settings = [*TINY_PREF, f"data.path={pref_data}", f"model.pretrained={start_model}", "train.log_every=1",
                "train.max_steps=8", "checkpoint.save_every=4", "checkpoint.keep_last=3"]  # fmt: skip
    r = run_cli("train", *settings, f"run.dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_config(run / "config.yaml").objective.kind == "dpo"  # chosen from the data
    whole = train_losses(metrics(run))
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000008")
    r = run_cli("train", *settings, f"run.dir={cut}")
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = train_losses(metrics(cut))
    assert [resumed[s] for s in range(5, 9)] == [whole[s] for s in range(5, 9)]  # bit for bit

    r = run_cli("train", *TINY_PREF, f"data.path={pref_data}", f"run.dir={tmp_path / 'other'}", "train.max_steps=3")
    assert_clean_error(r, "reference values of", "were computed with another model", "prepare-reference")
    r = run_cli("train", *TINY_PREF, f"data.path={pref_data}", f"run.dir={tmp_path / 'odd'}",
                f"model.pretrained={start_model}", "train.micro_batch_size=3", "train.max_steps=3")  # fmt: skip
    assert_clean_error(r, "train.micro_batch_size", "must be even")


@pytest.mark.slow
def test_reference_values_are_checked_and_survive_a_killed_or_concurrent_rerun(tmp_path, pref_data, start_model):
    """The stored values are checked when a run loads them (bit rot, a cut copy: one sentence); a second
    prepare-reference on the same data is refused while one runs; one killed (-9, its process group) at any
    moment while it replaces the values with another model's leaves a record naming whole arrays, the old
    model's or the new one's, never a mix."""
    import os
    import shutil
    import signal
    import subprocess
    import time

    from dist_clm.data import reference_store
    from dist_clm.data.audit import inspect, verify
    from dist_clm.errors import DataError
    from tests.helpers import BIN

    data = tmp_path / "data"
    shutil.copytree(pref_data, data)
    old = reference_store.read_record(data)
    assert set(old["splits"]) == {"train", "val"}
    array = data / "reference" / old["splits"]["train"]["file"]
    original = array.read_bytes()
    flipped = bytearray(original)
    flipped[-3] ^= 0x10
    for damaged in (bytes(flipped), original[:-8]):
        array.write_bytes(damaged)
        r = run_cli("train", *TINY_PREF, f"data.path={data}", f"model.pretrained={start_model}",
                    f"run.dir={tmp_path / 'damaged'}", "train.max_steps=3")  # fmt: skip
        assert_clean_error(r, f"'{data}/reference/{array.name}'", "do not match their size and hash", "again")
        with pytest.raises(DataError, match="do not match their size and hash"):
            verify(data)  # `data inspect --verify` finds it too
        shutil.rmtree(tmp_path / "damaged", ignore_errors=True)
    array.write_bytes(original)
    assert f"reference values of {old['splits']['train']['conversations']} conversations" in verify(data)[0]

    other = tmp_path / "other"  # another model: one ORPO step from scratch
    r = run_cli("train", *TINY_PREF, f"data.path={data}", f"run.dir={other}", "objective.kind=orpo",
                "train.max_steps=1", "optim.warmup_steps=0")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]

    holder = subprocess.Popen([str(BIN / "python"), "-c", "import fcntl, sys, time\nf = open(sys.argv[1], 'a')\n"
                               "fcntl.flock(f, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(600)",
                               str(data / "reference" / ".lock")], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run_cli("prepare-reference", str(data), "--model", str(other))
        assert_clean_error(r, "another prepare-reference is writing", "wait for it")
    finally:
        holder.kill()
        holder.wait(timeout=30)

    # the moment that matters, made certain: the new arrays are in place and the process dies before the record
    code = (
        "import os, sys, numpy as np\nfrom dist_clm.data import reference_store as rs\n"
        "rs.atomic_write_text = lambda *a: os._exit(9)\n"
        "with rs.claim(sys.argv[1]):\n"
        "    rs.write(sys.argv[1], {s: np.zeros((2, 3)) for s in ('train', 'val')}, {'model': 'x', 'weights': 'x'})"
    )
    assert subprocess.run([str(BIN / "python"), "-c", code, str(data)]).returncode == 9
    assert len(list((data / "reference").glob("*.npy"))) == 4  # the old train and val arrays, and the new
    assert reference_store.read_record(data) == old and reference_store.load_values(data, "train") is not None

    weights = {old["weights"]}
    for delay in (1.0, 2.5, 3.5, 4.0, 4.5, 6.0):  # (it loads in ~1.5 s, and is done in ~4.5 s)
        proc = subprocess.Popen([str(BIN / "dist-clm"), "prepare-reference", str(data), "--model", str(other)],
                                start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        record = reference_store.read_record(data)
        weights.add(record["weights"])
        for split in ("train", "val"):
            offsets, values = reference_store.load_values(data, split)  # whole: its size and hash check passes
            assert len(offsets) == len(values) == record["splits"][split]["conversations"]
    r = run_cli("prepare-reference", str(data), "--model", str(other))
    assert r.returncode == 0, r.stderr[-2000:]
    new = reference_store.read_record(data)
    assert new["weights"] != old["weights"] and weights <= {old["weights"], new["weights"]}
    kept = {p.name for p in (data / "reference").iterdir()}
    assert kept == {"reference.json", ".lock", *(s["file"] for s in new["splits"].values())}  # nothing else left
    shown = inspect(data, samples=0)  # `data inspect`
    assert f"reference values (dpo): of {other} (weights {new['weights']})" in shown and " pairs (0 truncated" in shown


@pytest.fixture(scope="module")
def hard_pairs(tmp_path_factory, chat_tokenizer):
    """(Pairs whose rejected answer is a refusal or the right answer about another sum, so the preference needs
    the question read; the SFT export they start from, whose reference values they carry): the scenario of a
    new user's DPO run, whose losses are noisy."""
    import random

    rng, root = random.Random(1), tmp_path_factory.mktemp("hard")
    assert run_cli("data", "synthetic", "--task", "chat", "--out", str(root / "chat.jsonl")).returncode == 0
    r = run_cli("prepare", str(root / "chat.jsonl"), "--tokenizer", str(chat_tokenizer), "--out", str(root / "sft"),
                "--format", "chat", "--block-size", str(PREF_BLOCK), "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("train", "model.preset=tiny", f"data.block_size={PREF_BLOCK}", f"data.path={root / 'sft'}",
                f"run.dir={root / 'sft_run'}", "train.max_steps=60", "train.eval_every=0", "train.eval_blocks=2",
                "run.progress_bar=false")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert run_cli("export", str(root / "sft_run"), "--out", str(root / "start")).returncode == 0
    records = []
    for i in range(600):
        a, b, c, d = (rng.randint(0, 99) for _ in range(4))
        rejected = "I do not know." if i % 2 else f"{c} plus {d} is {c + d}."
        records.append({"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                        "chosen": [{"role": "assistant", "content": f"{a} plus {b} is {a + b}."}],
                        "rejected": [{"role": "assistant", "content": rejected}]})  # fmt: skip
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    r = run_cli("prepare", str(root / "pairs.jsonl"), "--tokenizer", str(chat_tokenizer), "--out", str(root / "data"),
                "--format", "preference", "--block-size", str(PREF_BLOCK), "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert run_cli("prepare-reference", str(root / "data"), "--model", str(root / "start")).returncode == 0
    return root / "data", root / "start"


@pytest.mark.parametrize("micro_batch, lr", [(8, "5e-4"), (4, "1e-3")])
def test_noisy_dpo_runs_train_to_their_last_step(tmp_path, hard_pairs, micro_batch, lr):
    """A DPO run as a new user starts it (no checkpoint for its first 100 steps), and a noisier one (two pairs a
    step): their losses jump by factors of two and three from step to step, which pretraining's spike rule took
    for divergence (and, with no checkpoint yet, ended the run at once); the preference rule lets them train."""
    from dist_clm.training.objectives import MeanRise
    from tests.helpers import metrics, train_losses

    (data, start), run = hard_pairs, tmp_path / "run"
    r = run_cli("train", "model.preset=tiny", f"data.block_size={PREF_BLOCK}", f"data.path={data}",
                f"run.dir={run}", f"model.pretrained={start}", f"train.micro_batch_size={micro_batch}",
                f"optim.lr={lr}", "objective.dpo_beta=0.5", "train.max_steps=60", "train.log_every=1",
                "train.eval_every=0", "train.eval_blocks=2", "run.progress_bar=false")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    losses = list(train_losses(metrics(run)).values())
    assert len(losses) == 60 and "update not applied" not in r.stdout + r.stderr
    recent, old_rule = [], []  # what pretraining's rule (2 x the running mean of up to 50 good steps) said
    for step, loss in enumerate(losses, 1):
        if len(recent) >= 10 and MeanRise(2.0).verdict(loss, recent[-50:]):
            old_rule.append(step)
        else:
            recent.append(loss)
    assert old_rule, losses  # (the runs are the ones that rule stopped)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_a_real_divergence_of_a_preference_objective_is_caught(tmp_path, pref_data, start_model, objective):
    """A preference loss a thousand times its size is a spike: rolled back past its data with a checkpoint; skipped with
    none yet (the run goes on), its reason and its real gradient norm logged."""
    from tests.helpers import metrics

    common = [*TINY_PREF, f"data.path={pref_data}", f"model.pretrained={start_model}", f"objective.kind={objective}",
              "train.max_steps=18", "train.log_every=1", "stability.fault_injection=14:x1000"]  # fmt: skip
    r = run_cli("train", *common, f"run.dir={tmp_path / 'saved'}", "checkpoint.save_every=5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "robust spreads" in r.stdout + r.stderr and "rolled back to step 10" in r.stdout + r.stderr
    assert "OVERFLOW" not in r.stdout + r.stderr  # DeepSpeed's word for the skip our own line explains
    r = run_cli("train", *common, f"run.dir={tmp_path / 'unsaved'}", "checkpoint.save_every=0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no checkpoint to roll back to yet: training goes on" in r.stdout + r.stderr
    assert "OVERFLOW" not in r.stdout + r.stderr
    rows = metrics(tmp_path / "unsaved")
    [skip] = [row for row in rows if "train/skip_reason" in row]
    assert skip["step"] == 14 and "a spike" in skip["train/skip_reason"]
    norm = float(skip["train/skip_reason"].split("its gradient norm ")[1])
    logged = {row["step"]: row for row in rows if "train/grad_norm" in row}
    assert math.isfinite(norm) and logged[14]["train/grad_norm"] == pytest.approx(norm, rel=1e-3)  # not infinity
    assert max(row["step"] for row in rows if "train/loss" in row) == 18
