"""Perplexity, bits per byte, sampling and export, each checked against an independent computation with plain
libraries (transformers' own loss, DeepSpeed's own consolidation, pipeline())."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from dist_clm.errors import UserError
from dist_clm.evaluation.export import export, load_model
from dist_clm.evaluation.generate import Sampling, generate
from dist_clm.evaluation.perplexity import evaluate_cli
from dist_clm.parallel.process_group import free_port
from tests.helpers import (
    BIN,
    TINY,
    assert_clean_error,
    check_export,
    independent_model,
    last_checkpoint,
    metrics,
    read_split,
    run_cli,
)


def val_stream(data_dir) -> np.ndarray:
    return np.concatenate([c["tokens"] for c in read_split(data_dir / "val")]).astype(np.int64)


def hf_nll(model, stream, block, stride) -> tuple[float, int]:
    """Token NLL sum and count the way transformers' perplexity guide does it: model(ids, labels) with the
    context-only positions of each sliding window masked to -100."""
    total, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(stream), stride):
            end = min(begin + block, len(stream))
            ids = torch.from_numpy(stream[begin:end])[None]
            labels = ids.clone()
            labels[:, : -(end - prev_end)] = -100
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n  # its own mean over the scored tokens
            count += n
            prev_end = end
            if end == len(stream):
                break
    return total, count


def test_perplexity_equals_transformers_own_blocks_and_sliding(trained_run, data_dir):
    model = independent_model(last_checkpoint(trained_run))
    stream = val_stream(data_dir)
    for stride in (64, 24):  # 64: the run's block size, i.e. non-overlapping blocks
        total, count = hf_nll(model, stream, 64, stride)
        got = evaluate_cli(str(trained_run), stride=stride if stride != 64 else 0)
        assert got["tokens"] == count
        assert got["loss"] == pytest.approx(total / count, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    # bits per byte: the same NLL over the UTF-8 bytes of the scored text (here every token after the first)
    tok = AutoTokenizer.from_pretrained(str(trained_run / "tokenizer"))
    text_bytes = len(tok.decode(stream[1:].tolist(), skip_special_tokens=True).encode("utf-8"))
    assert got["bytes"] == text_bytes
    assert got["bits_per_byte"] == pytest.approx(total / math.log(2) / text_bytes, rel=1e-5)
    blocks, sliding = evaluate_cli(str(trained_run)), evaluate_cli(str(trained_run), stride=24)
    assert sliding["tokens"] == len(stream) - 1 > blocks["tokens"]
    assert max(sliding["perplexity"], blocks["perplexity"]) < 512  # below a uniform guess: it learnt something


def test_eval_says_one_line_as_a_user_starts_it(trained_run):
    """Started as a user starts it (the real command, no DS_ACCELERATOR, output to a file, not a terminal): the
    result and nothing else; no accelerator guess, no progress-bar frames, no CUDA notice."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    r = subprocess.run([str(BIN / "dist-clm"), "eval", str(trained_run), "--max-blocks", "4"], capture_output=True,
                       text=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr == "" and len(r.stdout.splitlines()) == 1 and r.stdout.startswith("tokens evaluated:"), r


def test_bits_per_byte_on_text_files(trained_run, corpus_dir, tokenizer_dir):
    f = sorted(corpus_dir.iterdir())[0]
    r = run_cli("eval", str(trained_run), "--text", str(f), "--block-size", "32", "--stride", "16", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    line, js = r.stdout.strip().splitlines()[-2:]
    assert line.startswith("tokens evaluated:") and "perplexity:" in line and "bits per byte:" in line
    assert line.endswith("(blocks of 32 tokens, stride 16; 1 text file(s))")
    res = json.loads(js)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text = f.read_text()
    first = tok(text, add_special_tokens=False).input_ids[0]
    # every token but the first is scored (the document's end-of-text counts 0 bytes)
    assert res["bytes"] == len(text.encode()) - len(tok.decode([first]).encode())
    assert res["bits_per_byte"] == pytest.approx(res["loss"] * res["tokens"] / math.log(2) / res["bytes"])


@pytest.mark.slow
def test_eval_gives_the_same_answer_on_one_and_two_ranks(trained_run):
    args = ["eval", str(trained_run), "--stride", "40", "--batch-size", "3", "--json"]
    a = evaluate_cli(str(trained_run), stride=40, batch_size=3)  # one rank, in this process
    two = subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "dist_clm", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    b = json.loads(two.stdout.splitlines()[-1])
    assert two.stdout.count("tokens evaluated") == 1  # printed by rank 0 only
    assert len(two.stdout.splitlines()) == 2  # the result and its JSON, nothing else from either rank
    assert all("torch/distributed/run.py" in line for line in two.stderr.splitlines()), two.stderr  # torchrun's own
    assert a["tokens"] == b["tokens"] and a["bytes"] == b["bytes"]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)


def test_sampling_parameters_do_what_they_say(trained_run):
    model, tok, _ = load_model(trained_run)
    prompt = ["def "]
    a = generate(model, tok, prompt, Sampling(max_new_tokens=24, temperature=1.0, seed=1))[0][0]
    assert a == generate(model, tok, prompt, Sampling(max_new_tokens=24, temperature=1.0, seed=1))[0][0]
    others = {generate(model, tok, prompt, Sampling(max_new_tokens=24, temperature=1.0, seed=s))[0][0] for s in (2, 3)}
    assert len(others | {a}) > 1  # sampling really samples
    greedy = generate(model, tok, prompt, Sampling(max_new_tokens=24, greedy=True))[0][0]
    assert greedy == generate(model, tok, prompt, Sampling(max_new_tokens=24, temperature=1.0, top_k=1, seed=9))[0][0]
    assert greedy == generate(model, tok, prompt, Sampling(max_new_tokens=24, temperature=0))[0][0]
    assert 0 < len(tok(greedy, add_special_tokens=False).input_ids) <= 24 + 2

    def repeats(text):
        ids = tok(text, add_special_tokens=False).input_ids
        return len(ids) - len(set(ids))

    long = Sampling(max_new_tokens=48, greedy=True)
    penalized = generate(model, tok, prompt, Sampling(max_new_tokens=48, greedy=True, repetition_penalty=2.0))[0][0]
    assert repeats(penalized) < repeats(generate(model, tok, prompt, long)[0][0])

    three = generate(model, tok, prompt, Sampling(max_new_tokens=16, num_return_sequences=3, seed=4))[0]
    assert len(three) == 3 and len(set(three)) > 1
    with pytest.raises(UserError, match="needs sampling"):
        generate(model, tok, prompt, Sampling(greedy=True, num_return_sequences=2))


def test_batched_prompts_give_what_each_gives_alone(trained_run):
    model, tok, _ = load_model(trained_run)
    prompts = ["import os\n", "class Foo(object):\n    def ", ""]  # different lengths: left padding
    s = Sampling(max_new_tokens=20, greedy=True)
    batched = generate(model, tok, prompts, s)
    assert [b[0] for b in batched] == [generate(model, tok, [p], s)[0][0] for p in prompts]


def test_generate_cli_streams_one_prompt_and_batches_a_file(trained_run, tmp_path):
    r = run_cli("generate", str(trained_run), "--prompt", "import ", "--max-new-tokens", "16", "--greedy")
    assert r.returncode == 0, r.stderr[-2000:]
    model, tok, _ = load_model(trained_run)
    want = generate(model, tok, ["import "], Sampling(max_new_tokens=16, greedy=True))[0][0]
    assert r.stdout == "import " + want + "\n"  # streamed token by token, the same text
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def \n\nclass \n")
    r = run_cli("generate", str(trained_run), "--prompt-file", str(prompts), "--num-return-sequences", "2",
                "--max-new-tokens", "8", "--seed", "5")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("=== prompt") == 4 and "=== prompt 2, sequence 2 ===\nclass " in r.stdout
    bad = run_cli("generate", str(trained_run), "--greedy", "--num-return-sequences", "2")
    assert_clean_error(bad, "--num-return-sequences above 1 needs sampling")
    assert_clean_error(run_cli("generate", str(trained_run), "--top-p", "0"), "--top-p must be in (0, 1]")


@pytest.fixture(scope="module")
def wide_zero3_run(tmp_path_factory, data_dir):
    """ZeRO-3 with a wider model (~25 M parameters, 100 MB in fp32), so that export memory is measurable.
    (2-rank ZeRO-2 and ZeRO-3 exports are checked in tests/integration/training/test_train.py, on its launcher runs.)"""
    run = tmp_path_factory.mktemp("zero3") / "run"
    r = run_cli("train", *TINY, f"data.path={data_dir}", f"run.dir={run}", "distributed.zero_stage=3",
                "model.overrides.n_embd=512", "model.overrides.n_layer=8", "train.max_steps=3",
                "train.log_every=1", "train.eval_every=0", "train.eval_blocks=2")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.mark.slow
def test_a_sharded_export_with_its_card_and_provenance(wide_zero3_run, tmp_path):
    out = tmp_path / "hf"
    r = run_cli("export", str(wide_zero3_run), "--out", str(out), "--max-shard-size", "30MB")
    assert r.returncode == 0, r.stderr[-2000:]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3  # sharded: one shard in memory at a time
    for name in ("config.json", "generation_config.json", "dist_clm_config.yaml", "data_provenance.json", "README.md"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "## Training data" in card and "step 3" in card
    prov = json.loads((out / "data_provenance.json").read_text())
    assert prov["step"] == 3 and prov["sources"][0]["manifest"]["tokenizer"]["fingerprint"] in card
    check_export(out, last_checkpoint(wide_zero3_run))
    # generate reads the ZeRO-3 checkpoint itself as well as its export, with the same result
    s = Sampling(max_new_tokens=6, greedy=True)
    from_checkpoint = generate(*load_model(wide_zero3_run)[:2], ["def "], s)
    assert from_checkpoint == generate(*load_model(out)[:2], ["def "], s)


EXPORT_MEMORY = """
import sys, threading, time, torch
import deepspeed.utils.zero_to_fp32, huggingface_hub, safetensors.torch, transformers  # imported before the baseline
import transformers.generation.utils  # (with scikit-learn installed it imports it: tens of MB of modules, not data)
from transformers import AutoConfig, GenerationConfig
from dist_clm.evaluation.export import export
from dist_clm.data.tokenizer import load_tokenizer
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
peak, done = [anon()], []
def watch():
    while not done:
        peak.append(anon()); time.sleep(0.005)
import accelerate  # (load_model's placement)
from dist_clm.evaluation.export import load_model
base = anon(); t = threading.Thread(target=watch); t.start()
model = export(sys.argv[1], sys.argv[2]) if sys.argv[3] == "export" else load_model(sys.argv[1])
done.append(1); t.join()
print(max(peak) - base)
"""


@pytest.mark.slow
def test_export_and_loading_for_inference_hold_at_most_one_copy_of_the_model(wide_zero3_run, tmp_path):
    peaks = {}
    for what in ("export", "load"):
        r = subprocess.run([sys.executable, "-c", EXPORT_MEMORY, str(wide_zero3_run), str(tmp_path / "hf"), what],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        peaks[what] = int(r.stdout.split()[-1])
    model_bytes = (tmp_path / "hf" / "model.safetensors").stat().st_size
    assert model_bytes > 90e6
    # one copy of the weights plus a fixed allowance (tokenizer, lazily imported modules); loading the
    # checkpoint into a model the usual way (a consolidated state dict, then the model) holds two copies or more
    assert peaks["export"] < model_bytes + 64e6 and peaks["load"] < model_bytes + 64e6, (peaks, model_bytes)


def test_an_export_continues_pretraining_where_the_checkpoint_was(trained_run, exported, data_dir, tmp_path):
    out = exported
    run = tmp_path / "continued"
    r = run_cli("train", *TINY, f"data.path={data_dir}", f"run.dir={run}", f"model.pretrained={out}",
                "train.max_steps=3", "train.eval_every=0")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first_val = next(row for row in rows if "val/loss" in row)
    assert first_val["step"] == 0
    # the new run starts from exactly the exported weights: its step-0 validation equals eval of the export
    same_windows = evaluate_cli(str(out), data=str(data_dir), block_size=64, max_blocks=8)
    assert first_val["val/loss"] == pytest.approx(same_windows["loss"], rel=1e-5)
    # with no --block-size, an export is evaluated in the blocks its run trained on (recorded in the export), as
    # its checkpoint is, not in blocks of the model's whole context
    assert evaluate_cli(str(out), data=str(data_dir)) == evaluate_cli(str(trained_run))
    card = (export(run, tmp_path / "again") / "README.md").read_text()  # the model it continued, by its name
    assert f"pretraining continued from `{out.name}` with dist_clm; exported" in card


def test_an_export_names_no_local_path_and_everyone_can_read_it(trained_run, exported, data_dir, tmp_path):
    """A public export (the default): no file names a local path (the session's temp root holds the corpus, the
    tokenizer, the data and the run), the data and tokenizer go by their fingerprints, and every file, the weights
    too, has the mode the umask gives a new file (0644 under 022). --provenance full keeps the local paths."""
    root = os.environ["TMPDIR"]
    files = [p for p in exported.rglob("*") if p.is_file()]
    for path in files:
        if path.suffix != ".safetensors":
            assert root not in path.read_text() and str(Path.home()) + "/" not in path.read_text(), path.name
    mask = os.umask(0)
    os.umask(mask)
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o666 & ~mask for p in files}
    prov = json.loads((exported / "data_provenance.json").read_text())
    [source] = prov["sources"]
    assert prov["checkpoint"].startswith("step_") and "path" not in source and len(source["fingerprint"]) == 16
    assert source["manifest"]["sources"]["inputs"] == "1 given" and "source" not in source["manifest"]["tokenizer"]
    card = (exported / "README.md").read_text()
    assert "pretrained from scratch with dist_clm; exported from checkpoint `step_" in card
    # its own figures, saying what they were computed on
    val = [row for row in metrics(trained_run) if "val/perplexity" in row][-1]
    figures = f"perplexity {val['val/perplexity']:.2f} (loss {val['val/loss']:.4g})"
    on = f"{val['val/tokens']:,} tokens of the data's validation split, in blocks of 64 tokens"
    assert f"Validation at step 12: {figures} on {on}." in card
    assert source["fingerprint"] in card and source["manifest"]["tokenizer"]["fingerprint"] in card
    assert "run:\n  dir: <local, not exported>" in (exported / "dist_clm_config.yaml").read_text()

    full = export(trained_run, tmp_path / "full", provenance="full")
    assert json.loads((full / "data_provenance.json").read_text())["sources"][0]["path"] == str(data_dir)
    assert str(data_dir) in (full / "README.md").read_text()
    assert f"dir: {trained_run}" in (full / "dist_clm_config.yaml").read_text()


def test_export_refuses_a_non_empty_target_and_a_mismatched_tokenizer(trained_run, exported, tmp_path, corpus_dir):
    import shutil

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(UserError, match="already exists and is not empty"):
        export(trained_run, tmp_path / "busy")
    out = Path(shutil.copytree(exported, tmp_path / "hf"))
    from dist_clm.data import sources
    from dist_clm.data.tokenizer import train_bpe

    bigger = train_bpe(sources.iter_documents(sources.resolve_inputs([str(corpus_dir)])), tmp_path / "t", 700)
    for f in bigger.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    r = run_cli("eval", str(out), "--text", str(sorted(corpus_dir.iterdir())[0]))
    assert_clean_error(r, "has 700 tokens but the model embeds only 512", "use the tokenizer the model was trained")
