"""Perplexity, sampling and export, each checked against an independent computation with plain libraries."""

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dist_clm.checkpoint import export, load_model
from dist_clm.errors import UserError
from dist_clm.evaluate import evaluate_cli
from dist_clm.generate import generate
from tests.conftest import run_cli
from tests.test_prepare import read_split


def independent_model(tag_dir):
    """The checkpoint's weights via DeepSpeed's own consolidation, in a model built from its config.json."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):
        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(tag_dir)))
    model.load_state_dict(sd, strict=False)
    model.tie_weights()
    return model.eval()


def last_checkpoint(run):
    return sorted((run / "checkpoints").glob("step_*"))[-1]


def test_eval_perplexity_is_exp_of_mean_token_loss(trained_run, data_dir):
    model = independent_model(last_checkpoint(trained_run))
    stream = np.concatenate([c["tokens"] for c in read_split(data_dir / "val")]).astype(np.int64)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream), 64):  # non-overlapping blocks of the run's block size
            ids = torch.from_numpy(stream[start : start + 64])[None]
            if ids.shape[1] < 2:
                continue
            loss = model(input_ids=ids, labels=ids).loss.item()  # transformers' own mean shifted loss
            total += loss * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    want = math.exp(total / count)
    got = evaluate_cli(str(trained_run))
    assert got["tokens"] == count
    assert got["perplexity"] == pytest.approx(want, rel=1e-4)
    assert got["perplexity"] < 512  # it learnt something: below a uniform guess over the vocabulary


def test_eval_cli_and_text_files(trained_run, corpus_dir):
    r = run_cli("eval", str(trained_run), "--text", str(sorted(corpus_dir.iterdir())[0]), "--block-size", "32")
    assert r.returncode == 0, r.stderr[-2000:]
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("tokens evaluated:") and "perplexity:" in line
    assert float(line.split("perplexity:")[1]) > 1


def test_generate_is_reproducible_with_a_seed(trained_run):
    model, tok, _ = load_model(trained_run)
    kw = dict(max_new_tokens=24, temperature=1.0, top_p=0.95, top_k=50)
    a = generate(model, tok, "def ", seed=1, **kw)
    assert a == generate(model, tok, "def ", seed=1, **kw)
    others = {generate(model, tok, "def ", seed=s, **kw) for s in range(2, 6)}
    assert len(others | {a}) > 1  # sampling really samples
    greedy = generate(model, tok, "def ", max_new_tokens=24, temperature=0)
    assert greedy == generate(model, tok, "def ", max_new_tokens=24, temperature=1.0, top_k=1, seed=9)
    ids = tok(a, add_special_tokens=False).input_ids
    assert 0 < len(ids) <= 24 + 2


def test_generate_cli(trained_run):
    r = run_cli("generate", str(trained_run), "--prompt", "import ", "--max-new-tokens", "16", "--seed", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("import ")
    again = run_cli("generate", str(trained_run), "--prompt", "import ", "--max-new-tokens", "16", "--seed", "3")
    assert again.stdout == r.stdout


def test_export_loads_in_transformers_with_the_checkpoints_logits(trained_run, data_dir, tmp_path):
    out = tmp_path / "hf"
    r = run_cli("export", str(trained_run), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "generation_config.json").is_file() and (out / "dist_clm_config.yaml").is_file()
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token_id == hf.generation_config.eos_token_id
    ref = independent_model(last_checkpoint(trained_run))
    ids = torch.tensor([tok("def main():\n    return 1\n").input_ids])
    with torch.no_grad():
        diff = (hf(ids).logits - ref(ids).logits).abs().max().item()
    assert diff <= 1e-5
    # an exported directory is accepted wherever a checkpoint is read
    assert evaluate_cli(str(out), data=str(data_dir), block_size=64) == evaluate_cli(str(trained_run))


def test_export_refuses_a_non_empty_target(trained_run, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(UserError, match="already exists and is not empty"):
        export(trained_run, tmp_path / "busy")
