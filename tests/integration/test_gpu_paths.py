"""The GPU paths that need a real run, wired on the CPU: a training run's every pass gives the flash attention stand-in
(tests/flash_standin.py) the documents; eval and generate go where inference_device() says."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, TINY, metrics


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory, corpus_dir, tokenizer_dir):
    """Pretraining data of short documents (a few dozen tokens: several in each block), from the corpus' lines."""
    from dist_clm.data.prepare import prepare

    lines = [x.strip() for f in sorted(corpus_dir.iterdir())[:20] for x in f.read_text().splitlines() if len(x) > 30]
    text = tmp_path_factory.mktemp("short") / "short.jsonl"
    text.write_text("".join(json.dumps({"text": " ".join(lines[i : i + 3])}) + "\n" for i in range(0, 1200, 3)))
    out = text.parent / "prepared"
    prepare(tokenizer_dir, out, [str(text)], val_fraction=0.1, chunk_tokens=1000, shard_bytes=1 << 14, progress=False)
    return out


def test_the_training_step_gives_flash_attention_the_documents(tmp_path, short_documents):
    """A real run, document-masked, micro batch 4, bf16, with flash attention's stand-in: every training forward
    pass cuts the micro batch at its documents, and the losses are SDPA's (bf16)."""
    common = [*TINY, f"data.path={short_documents}", "data.document_mask=true", "train.precision=bf16",
              "train.max_steps=3", "train.log_every=1", "train.eval_every=0", "train.eval_blocks=1",
              "run.tensorboard=false"]  # fmt: skip
    runs, record = {}, tmp_path / "calls.json"
    for attn in ("flash_attention_2", "sdpa"):
        runs[attn] = tmp_path / attn
        env = {**os.environ, "FLASH_STANDIN_RECORD": str(record), "PYTHONPATH": str(REPO)}
        r = subprocess.run([sys.executable, "-m", "tests.flash_standin", "train", *common, f"model.attention={attn}",
                            f"run.dir={runs[attn]}"], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        if attn == "flash_attention_2":
            calls = json.loads(record.read_text())
            assert "attention flash_attention_2" in r.stdout + r.stderr
    varlen = [c for c in calls if c != "dense"]  # (validation of pretraining data runs unmasked, as with sdpa)
    assert len(varlen) == 2 * 3 * 4 // 4  # 2 layers x 3 steps x 1 micro batch of 4 rows
    for cuts in varlen:
        assert cuts[-1] == 4 * 64 and set(range(0, 4 * 64, 64)) <= set(cuts)  # every row starts a sequence
    assert all(len(cuts) > 8 for cuts in varlen)  # and the documents inside them
    flash, sdpa = ([r["train/loss"] for r in metrics(runs[a]) if "train/loss" in r] for a in runs)
    assert flash == pytest.approx(sdpa, rel=2e-2)


def test_eval_and_generate_run_on_the_gpu_when_there_is_one(monkeypatch, trained_run, data_dir, capsys):
    """Outside a launcher, eval, generate and prepare-reference run where inference_device() says (the first
    visible GPU, else the CPU); the commands ask it, and the model is there when it runs."""
    import dist_clm.parallel.process_group as process_group
    from dist_clm.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert process_group.inference_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert process_group.inference_device() == "cpu"
    asked, moved = [], []
    monkeypatch.setattr(process_group, "inference_device", lambda: asked.append(1) or "cpu")
    real_to = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a) or real_to(self, *a, **k))
    checkpoint = str(sorted((trained_run / "checkpoints").glob("step_*"))[-1])
    assert main(["eval", checkpoint, "--data", str(data_dir), "--max-blocks", "1"]) == 0
    assert asked and ("cpu",) in moved
    asked.clear(), moved.clear()
    assert main(["generate", checkpoint, "--prompt", "def", "--max-new-tokens", "2", "--greedy"]) == 0
    assert asked and ("cpu",) in moved
    assert "def" in capsys.readouterr().out


def test_a_job_given_gpus_that_torch_cannot_use_stops_in_one_sentence(monkeypatch, tmp_path, data_dir, trained_run):
    """SLURM gave the job GPUs, torch cannot use them (here: none at all): `train` and `eval` say so in one
    sentence and exit 2 instead of running on the CPU without a word (which both did before)."""
    from tests.helpers import assert_clean_error, run_cli

    monkeypatch.delenv("DS_ACCELERATOR")
    env = {"SLURM_GPUS_ON_NODE": "2"}
    r = run_cli("train", *TINY, f"data.path={data_dir}", f"run.dir={tmp_path / 'run'}", "train.max_steps=3", env=env)
    assert_clean_error(r, "was given GPUs (SLURM_GPUS_ON_NODE=2) but torch cannot use them", "DS_ACCELERATOR=cpu")
    assert not list((tmp_path / "run").glob("checkpoints/step_*"))
    r = run_cli("eval", str(trained_run), "--max-blocks", "1", env=env)
    assert_clean_error(r, "was given GPUs (SLURM_GPUS_ON_NODE=2)")
