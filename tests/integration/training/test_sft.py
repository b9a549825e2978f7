"""Supervised fine-tuning on the pretraining machinery: chat and prompt-completion data prepared once with a
loss mask and packed whole into blocks; only the answers learned; the step's loss the mean over its learned
tokens; exact resume; evaluation on learned tokens; chat generation and an export transformers chats with."""

import json
import shutil

import numpy as np
import pytest
import torch

from dist_clm.config import load_config
from tests.helpers import TINY, assert_clean_error, metrics, run_cli, train_losses

BLOCK = 128


SFT = [*TINY, "data.block_size=128", "model.overrides.n_positions=256", "train.micro_batch_size=2",
       "train.eval_every=0", "train.log_every=1"]  # fmt: skip


@pytest.fixture(scope="module")
def chat_records(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    assert run_cli("data", "synthetic", "--task", "chat", "--out", str(path), "--records", "300").returncode == 0
    return path


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, chat_tokenizer, chat_records):
    out = tmp_path_factory.mktemp("sft") / "data"
    r = run_cli("prepare", str(chat_records), "--tokenizer", str(chat_tokenizer), "--out", str(out), "--format", "chat",
                "--block-size", str(BLOCK), "--val-fraction", "0.1", "--chunk-tokens", "512", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def learned_stream(data, split="train"):
    from dist_clm.data.format import read_manifest
    from dist_clm.data.stream import TokenStream

    stream = TokenStream(data, split, read_manifest(data))
    return stream.read_learned(0, stream.tokens)


def test_chat_data_learns_the_assistant_turns_only(sft_data, chat_records):
    from dist_clm.data.tokenizer import load_tokenizer

    manifest = json.loads((sft_data / "manifest.json").read_text())
    assert manifest["fine_tuning"]["format"] == "chat" and manifest["fine_tuning"]["block_size"] == BLOCK
    splits = manifest["splits"]
    assert splits["train"]["conversations"] + splits["val"]["conversations"] == 300
    assert splits["train"]["truncated"] == splits["train"]["dropped"] == 0
    assert splits["train"]["tokens"] % BLOCK == 0  # whole blocks, padded
    tok = load_tokenizer(sft_data / "tokenizer")
    assert tok.chat_template  # the template the data was rendered with travels with it

    ids, learned, positions = learned_stream(sft_data)
    assert int(learned.sum()) == splits["train"]["learned_tokens"]
    text = tok.decode(ids[learned == 1])
    answers = [m["content"] + "<|im_end|>\n" for line in chat_records.read_text().splitlines()
               for m in json.loads(line)["messages"] if m["role"] == "assistant"]  # fmt: skip
    assert "What is" not in text and "You add" not in text and "doubled" not in text  # no system or user text
    pieces = text.split("<|im_end|>\n")  # each learned stretch: an assistant turn, with its end of turn
    assert pieces[-1] == "" and len(pieces) > 100
    assert set(pieces[:-1]) <= {a[: -len("<|im_end|>\n")] for a in answers}
    starts = np.flatnonzero(positions == 0)
    assert set(range(0, len(ids), BLOCK)) <= set(starts.tolist())  # every block starts a conversation ...
    assert all(s // BLOCK == (e - 1) // BLOCK for s, e in zip(starts, [*starts[1:], len(ids)], strict=True))  # whole


def test_long_conversations_are_truncated_or_dropped_and_counted(tmp_path, chat_tokenizer, chat_records):
    out = tmp_path / "short"
    r = run_cli("prepare", str(chat_records), "--tokenizer", str(chat_tokenizer), "--out", str(out), "--format",
                "chat", "--block-size", "49", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    train = json.loads((out / "manifest.json").read_text())["splits"]["train"]
    # (the system and user turns take ~47-49 tokens of this tokenizer: some keep a learned token, some none)
    assert train["truncated"] > 0 and train["dropped"] > 0 and train["conversations"] > 0
    assert "truncated" in r.stdout and "dropped" in r.stdout


def test_prompt_completion_learns_the_completion_and_its_end(tmp_path, chat_tokenizer):
    from dist_clm.data.tokenizer import load_tokenizer

    records = tmp_path / "pc.jsonl"
    assert run_cli("data", "synthetic", "--task", "prompt-completion", "--out", str(records), "--records",
                   "60").returncode == 0  # fmt: skip
    out = tmp_path / "pc"
    r = run_cli("prepare", str(records), "--tokenizer", str(chat_tokenizer), "--out", str(out), "--format",
                "prompt-completion", "--block-size", "64", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    tok = load_tokenizer(out / "tokenizer")
    ids, learned, _ = learned_stream(out)
    text = tok.decode(ids[learned == 1])
    assert "Q:" not in text and "A:" not in text and text.count("<|endoftext|>") > 40
    assert all(piece.strip().split(" plus ")[0].isdigit() for piece in text.split("<|endoftext|>") if piece)


@pytest.mark.parametrize(
    "records, extra, fragments",
    [
        ([{"messages": [{"role": "user", "content": "hi"}]}], [], ["line 1 of", "has no assistant turn"]),
        ([{"text": "hi"}], [], ["line 1 of", "has no column 'messages'", "this --format reads messages"]),
        ([{"messages": [{"role": "robot", "content": "hi"}]}], [], ["message 1 of 'messages' must have a role"]),
        ([{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}], ["--format", "prompt-completion"],
         ["both be strings or both be lists"]),
        ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
         ["--tokenizer-without-template"], ["has no chat template", "--chat-template chatml"]),
    ],
)  # fmt: skip
def test_bad_fine_tuning_input_is_one_sentence_and_writes_nothing(tmp_path, chat_tokenizer, tokenizer_dir, records,
                                                                    extra, fragments):  # fmt: skip
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = tokenizer_dir if "--tokenizer-without-template" in extra else chat_tokenizer
    fmt = extra if "--format" in extra else ["--format", "chat"]
    out = tmp_path / "out"
    r = run_cli("prepare", str(path), "--tokenizer", str(tok), "--out", str(out), *fmt, "--block-size", "64", "--quiet")
    assert_clean_error(r, *fragments)
    assert not out.exists()  # nothing written, not even a partial directory
    assert not list(tmp_path.glob(".out*"))


def test_packed_loss_equals_the_conversations_one_at_a_time_and_prompts_get_no_gradient(sft_data):
    """One packed block through the model as training feeds it (restarting positions, masked labels) gives the
    loss of its conversations run alone; the loss's gradient reaches the logits of learned targets only."""
    from dist_clm.data.batches import MixedBlocks
    from dist_clm.data.format import read_manifest
    from dist_clm.data.order import Source
    from dist_clm.data.tokenizer import load_tokenizer
    from dist_clm.models.build import build_model

    manifest = read_manifest(sft_data)
    blocks = MixedBlocks([Source("sft", str(sft_data), manifest)], BLOCK, False, 0, document_mask=True)
    batch = {k: torch.as_tensor(v) for k, v in blocks.__getitems__([0, 1]).items()}
    torch.manual_seed(0)
    model = build_model("tiny-llama", "", {}, load_tokenizer(sft_data / "tokenizer")).eval()
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    logits.retain_grad()
    targets = batch["labels"][:, 1:]
    total = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum")
    total.backward()
    learned = targets != -100
    assert learned.any() and (~learned).any()
    grad = logits.grad[:, :-1].abs().sum(-1)
    assert torch.all(grad[~learned] == 0) and torch.all(grad[learned] > 0)  # prompts and padding: no gradient

    alone = 0.0
    with torch.no_grad():
        for row in range(2):
            starts = torch.nonzero(batch["position_ids"][row] == 0).flatten().tolist()
            for s, e in zip(starts, [*starts[1:], BLOCK], strict=True):
                ids, labels = batch["input_ids"][row, s:e], batch["labels"][row, s:e]
                if (labels[1:] != -100).any():
                    out = model(input_ids=ids[None], use_cache=False).logits[0, :-1]
                    alone += float(torch.nn.functional.cross_entropy(out, labels[1:], reduction="sum"))
    assert total.item() == pytest.approx(alone, rel=1e-5)


@pytest.mark.parametrize("world", [1, 2])
def test_the_step_loss_is_the_mean_over_all_its_learned_tokens(tmp_path, sft_data, world):
    """Micro batches (on one rank, or two under torchrun) holding different numbers of learned tokens: the logged
    loss of step 1 (before any update) is their NLL summed over every learned token of the step, over the count,
    as computed here with the plain model from each rank's share of the blocks; not a mean of micro batches'
    means."""
    from dist_clm.config import load_config
    from dist_clm.data.loader import TrainLoader
    from dist_clm.data.run_data import run_tokenizer, training_sources
    from dist_clm.models.attention import build_model_with
    from dist_clm.parallel.partitioned import initialize
    from dist_clm.parallel.process_group import free_port
    from dist_clm.training.preflight import settle
    from tests.helpers import BIN, launch

    run = tmp_path / "run"
    settings = [*SFT, f"data.path={sft_data}", f"run.dir={run}", "train.micro_batch_size=2", "train.grad_accum=2",
                "train.max_steps=1", "optim.warmup_steps=0", "train.eval_blocks=1"]  # fmt: skip
    if world == 1:
        r = run_cli("train", *settings)
        assert r.returncode == 0, r.stderr[-3000:]
    else:
        launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())], *settings)
    logged = train_losses(metrics(run))[1]

    cfg = load_config(None, settings)
    sources = training_sources(cfg.data)
    cfg = settle(cfg, sources)
    torch.manual_seed(cfg.train.seed)  # the initial weights train() starts from
    model = build_model_with(["sdpa"], cfg.model.preset, "", cfg.model.overrides, run_tokenizer(sources)).eval()
    initialize(model, cfg.train.seed)
    sums, counts = [], []
    with torch.no_grad():
        for rank in range(world):
            loader = iter(TrainLoader.from_config(cfg.data, cfg.train, sources, rank=rank, world=world, grad_accum=2))
            for _ in range(2):
                b = next(loader)
                logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
                y = b["labels"][:, 1:]
                sums.append(float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), y.flatten(),
                                                                    reduction="sum")))  # fmt: skip
                counts.append(int((y != -100).sum()))
    assert len(set(counts)) > 1  # (else the means would agree and the test could not tell them apart)
    right = sum(sums) / sum(counts)
    mean_of_means = sum(x / n for x, n in zip(sums, counts, strict=True)) / len(counts)
    assert logged == pytest.approx(right, rel=1e-6)
    # at initialisation every token's loss is near log(vocabulary), so the two differ little (~1e-4): still
    # 100x the agreement above
    assert abs(logged - mean_of_means) > 1e-5 * logged


@pytest.mark.slow
def test_validation_after_sequence_parallel_steps_is_the_unsharded_models(tmp_path, sft_data):
    """A Llama-style model with one key/value head for its 4 query heads at distributed.sequence_parallel_size=2:
    DeepSpeed's wrapper replicates the head over the group in the training passes, setting each attention's
    num_key_value_groups to the group's local ratio (2, not 4). Validation after the step runs whole rows through
    the model's own attention, where the conversations' restarting positions make a dense mask and sdpa repeats
    the key/value heads by that number: its loss is the unsharded model's on the checkpoint's weights."""
    from dist_clm.data.format import read_manifest
    from dist_clm.data.stream import TokenStream
    from dist_clm.evaluation.perplexity import perplexity, windows
    from dist_clm.parallel.process_group import free_port
    from tests.helpers import BIN, checkpoint_dir, independent_model, launch

    run = tmp_path / "run"
    llama = ["model.preset=tiny-llama", "model.overrides.hidden_size=64", "model.overrides.intermediate_size=172",
             "model.overrides.num_key_value_heads=1"]  # fmt: skip
    launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())],
           *(a for a in SFT if not a.startswith("model.")), *llama, f"data.path={sft_data}", f"run.dir={run}",
           "distributed.sequence_parallel_size=2", "train.max_steps=1", "checkpoint.save_every=1",
           "train.eval_blocks=3", "optim.warmup_steps=0")  # fmt: skip
    validations = {r["step"]: r["val/loss"] for r in metrics(run) if "val/loss" in r}
    assert list(validations) == [0, 1]  # before the step and after it
    split = TokenStream(sft_data, "val", read_manifest(sft_data))
    unsharded = perplexity(independent_model(checkpoint_dir(run, 1)), split.reader(), windows(split.tokens, BLOCK,
                           max_windows=3), 2, "cpu")  # fmt: skip
    assert validations[1] == pytest.approx(unsharded["loss"], abs=1e-5)


def test_sft_resumes_exactly_evaluates_learned_tokens_and_chats(tmp_path, sft_data):
    run = tmp_path / "run"
    settings = [*SFT, f"data.path={sft_data}", f"run.dir={run}", "train.max_steps=8", "checkpoint.save_every=4",
                "checkpoint.keep_last=3"]  # fmt: skip
    r = run_cli("train", *settings)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = load_config(run / "config.yaml")
    assert cfg.objective.kind == "sft" and cfg.data.document_mask is True  # chosen from the data
    whole = train_losses(metrics(run))

    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000008")
    r = run_cli("train", *SFT, f"data.path={sft_data}", f"run.dir={cut}", "train.max_steps=8",
                "checkpoint.save_every=4", "checkpoint.keep_last=3")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = train_losses(metrics(cut))
    assert [resumed[s] for s in range(5, 9)] == [whole[s] for s in range(5, 9)]  # bit for bit

    r = run_cli("eval", str(run), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    val = json.loads((sft_data / "manifest.json").read_text())["splits"]["val"]
    assert json.loads(r.stdout.strip().splitlines()[-1])["tokens"] == val["learned_tokens"]  # learned tokens only

    r = run_cli("generate", str(run), "--chat", "--prompt", "What is 3 plus 4?", "--greedy", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "user: What is 3 plus 4?\nassistant:" in r.stdout and "<|im_start|>" not in r.stdout
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 1 plus 2?"},
                                             {"role": "assistant", "content": "1 plus 2 is 3."},
                                             {"role": "user", "content": "And doubled?"}]}) + "\n")  # fmt: skip
    r = run_cli("generate", str(run), "--chat-file", str(chat), "--greedy", "--max-new-tokens", "8")
    assert r.returncode == 0 and "user: And doubled?\nassistant:" in r.stdout, r.stderr[-2000:]

    out = tmp_path / "export"
    assert run_cli("export", str(run), "--out", str(out)).returncode == 0
    from transformers import pipeline

    reply = pipeline("text-generation", model=str(out))([{"role": "user", "content": "What is 3 plus 4?"}],
                                                         max_new_tokens=12, do_sample=False)  # fmt: skip
    messages = reply[0]["generated_text"]
    assert [m["role"] for m in messages] == ["user", "assistant"]  # the export carries its chat template


def test_fine_tuning_data_mixes_with_pretraining_data(tmp_path, sft_data, chat_tokenizer, corpus_dir):
    """Pretraining text prepared with the same (chat) tokenizer trains beside the conversations: every token of
    the text is learned, only the answers of the conversations; both are sampled by weight."""
    text = tmp_path / "text"
    r = run_cli("prepare", str(corpus_dir), "--tokenizer", str(chat_tokenizer), "--out", str(text), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "run"
    mix = f"data.mix=[{{path: {sft_data}, weight: 3, name: chat}}, {{path: {text}, weight: 1, name: text}}]"
    r = run_cli("train", *SFT, mix, f"run.dir={run}", "train.max_steps=4", "train.eval_blocks=2")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(run)
    assert len(train_losses(rows)) == 4
    assert sum(row["data/mix/chat"] for row in rows if "data/mix/chat" in row) / 4 == pytest.approx(0.75)
    assert {"val/chat/loss", "val/text/loss"} <= set().union(*rows)


def test_the_block_size_of_fine_tuning_data_comes_from_the_data(tmp_path, sft_data):
    """SFT data packs whole conversations at prepare time, so data.block_size follows it (said once), where a
    config's other value was a refusal asking for the number again; a stage that changes it is still refused."""
    r = run_cli("train", *SFT, "data.block_size=32", f"data.path={sft_data}", f"run.dir={tmp_path / 'run'}",
                "train.max_steps=1", "train.eval_blocks=1", "optim.warmup_steps=0")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    said = f"data.block_size is {BLOCK}, the size the fine-tuning data packs its conversations into (not 32)"
    assert said in r.stdout + r.stderr
    assert f"block_size: {BLOCK}" in (tmp_path / "run" / "config.yaml").read_text()
    r = run_cli("train", *SFT, f"data.path={sft_data}", f"run.dir={tmp_path / 'run2'}",
                "data.stages=[{until: 1}, {block_size: 256}]", "train.max_steps=2", "optim.warmup_steps=0")  # fmt: skip
    assert_clean_error(r, "so data.stages cannot change data.block_size")


@pytest.mark.parametrize("kind", ["parquet", "save_to_disk", "dataset"])
def test_chat_records_from_parquet_and_datasets_prepare_as_from_jsonl(tmp_path, chat_tokenizer, chat_records, kind):
    """The same conversations from a parquet file, a save_to_disk directory and a dataset by name (load_dataset
    with a local dataset repository: the call a user with network makes with a hub name) prepare alike."""
    import datasets

    rows = [json.loads(line) for line in chat_records.read_text().splitlines()[:60]]
    jsonl = tmp_path / "first.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        ds.to_parquet(str(tmp_path / "chat.parquet"))
        source = [str(tmp_path / "chat.parquet")]
    elif kind == "save_to_disk":
        ds.save_to_disk(str(tmp_path / "chat_ds"))
        source = [str(tmp_path / "chat_ds")]
    else:
        (tmp_path / "repo" / "data").mkdir(parents=True)
        shutil.copy(jsonl, tmp_path / "repo" / "data" / "train.jsonl")
        source = ["--dataset", str(tmp_path / "repo")]
    shards = {}
    for name, args in (("jsonl", [str(jsonl)]), (kind, source)):
        out = tmp_path / f"data_{name}"
        r = run_cli("prepare", *args, "--tokenizer", str(chat_tokenizer), "--out", str(out), "--format", "chat",
                    "--block-size", "128", "--quiet")  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        shards[name] = learned_stream(out)
    for a, b in zip(shards["jsonl"], shards[kind], strict=True):
        assert np.array_equal(a, b)


@pytest.mark.slow
def test_sft_rolls_back_under_the_deepspeed_launcher_and_resumes_on_one_rank(tmp_path, sft_data):
    """Two ranks under the deepspeed launcher: a loss spike at step 5 rolls the run back to step 4 and skips
    that window; the run is then moved to one rank from its step-6 checkpoint (the same global batch, twice the
    accumulation) and its steps 7 and 8 see the same blocks, with the same loss over their learned tokens."""
    from dist_clm.data.order import SKIPS
    from dist_clm.parallel.process_group import free_port
    from tests.helpers import BIN, launch, resume_moved, train_state

    common = [*SFT, f"data.path={sft_data}", "train.global_batch_size=8", "train.max_steps=8",
              "checkpoint.save_every=2", "checkpoint.keep_last=10", "stability.spike_window=3",
              "stability.fault_injection=5:x10"]  # fmt: skip
    full = tmp_path / "full"
    deepspeed = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    r = launch(deepspeed, *common, f"run.dir={full}")
    out = r.stdout + r.stderr
    assert "is more than 2 x the running mean" in out and "rolled back to step 4" in out
    skips = json.loads((full / SKIPS).read_text())
    assert [(s["from_block"], s["to_block"], s["diverged_at_step"]) for s in skips] == [(32, 40, 5)]
    reference = train_losses(metrics(full))
    assert sorted(reference) == list(range(1, 9))

    resumed, _ = resume_moved(full, tmp_path / "moved", [str(BIN / "python")], *common, last=8)
    assert list(resumed) == [7, 8]
    for step in (7, 8):
        assert resumed[step] == pytest.approx(reference[step], rel=2e-4), (step, resumed[step], reference[step])
    assert (
        train_state(tmp_path / "moved", 8)["data"]["blocks_consumed"] == (8 + 1) * 8
    )  # 8 steps and the skipped window
