"""Bad input through the real command: one sentence on stderr, a non-zero exit, no traceback, nothing left."""

import pytest

from tests.helpers import TINY, assert_clean_error, run_cli, without_eos


def test_an_error_on_any_rank_is_seen(tmp_path):
    """Under a launcher only rank 0 prints errors every rank shares; a rank's own error is printed by that rank,
    saying which rank it is (before, rank 1 exited 2 in silence while rank 0 waited for it)."""
    for rank, prefix in (("0", "dist-clm: error: '"), ("1", "dist-clm: error: rank 1: '")):
        r = run_cli("eval", str(tmp_path / "nope"), env={"RANK": rank, "WORLD_SIZE": "2"})
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.startswith(prefix), r.stderr[-500:]


def test_missing_corpus_path(tmp_path, tokenizer_dir):
    r = run_cli("prepare", str(tmp_path / "nope"), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "o"))
    assert_clean_error(r, "input path", "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_empty_corpus(tmp_path, tokenizer_dir):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("")
    r = run_cli("prepare", str(tmp_path / "in"), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "o"))
    assert_clean_error(r, "no non-empty document")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_tokenizer_without_eos(tmp_path, tokenizer_dir, corpus_dir):
    bad = without_eos(tokenizer_dir, tmp_path / "noeos")
    r = run_cli("prepare", str(corpus_dir), "--tokenizer", str(bad), "--out", str(tmp_path / "o"))
    assert_clean_error(r, "no end-of-text token")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("data.block_size=256", ["'data.block_size' is 256, more than the model's 128 positions"]),
        ("distributed.zero_stage=5", ["'distributed.zero_stage' must be 0, 1, 2 or 3, got 5"]),
        ("train.global_batch_size=6", ["'train.global_batch_size' is 6, which is not a multiple of", "4 x 1 = 4"]),
        ("train.precision=fp16", ["'train.precision' is fp16, which DeepSpeed supports on GPUs only"]),
        ("stability.spike_factor=0.5", ["'stability.spike_factor' must be 0 (off) or more than 1, got 0.5"]),
        (
            "model.attention=flex_attention",
            ["'model.attention' is 'flex_attention', which has no backward pass on CPU"],
        ),
        ("model.overrides.vocab_size=300", ["hold token ids up to", "the model embeds only 300"]),
        (("data.path=", "data.mix=[{weight: 1}]"), ["'data.mix[0].path' is required"]),
        (("data.path=", "data.mix=[{path: x, weight: -1}]"), ["'data.mix' weights must be 0 or more"]),
    ],
)
def test_bad_training_settings(tmp_path, data_dir, override, fragments):
    run = tmp_path / "run"
    more = override if isinstance(override, tuple) else (override,)
    r = run_cli("train", *TINY, f"data.path={data_dir}", f"run.dir={run}", *more)
    assert_clean_error(r, *fragments)
    assert not run.exists()  # nothing written before the settings were checked


def test_shards_from_another_tokenizer_are_refused(tmp_path, data_dir, data_dir_b, corpus_dir):
    from dist_clm.data import sources
    from dist_clm.data.prepare import prepare
    from dist_clm.data.tokenizer import train_bpe

    other_tok = train_bpe(sources.iter_documents(sources.resolve_inputs([str(corpus_dir)])), tmp_path / "t", 400)
    other = tmp_path / "other"
    prepare(other_tok, other, [str(corpus_dir)], val_fraction=0.2, progress=False)
    mix = f"data.mix=[{{path: {data_dir}}}, {{path: {other}, weight: 0.5}}]"
    r = run_cli("train", *TINY, mix, f"run.dir={tmp_path / 'run'}")
    assert_clean_error(r, f"the shards in '{other}' were made with tokenizer", "prepare", "again with")
    assert not (tmp_path / "run").exists()


def test_missing_data_dir(tmp_path):
    r = run_cli("train", *TINY, f"data.path={tmp_path / 'nodata'}", f"run.dir={tmp_path / 'run'}")
    assert_clean_error(r, "data directory", "does not exist")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [["eval"], ["generate"], ["export", "--out", "OUT"]])
def test_checkpoint_dir_that_does_not_exist(tmp_path, command):
    args = [a.replace("OUT", str(tmp_path / "out")) for a in command]
    r = run_cli(args[0], str(tmp_path / "no-such-run"), *args[1:])
    assert_clean_error(r, "does not exist")
    assert not (tmp_path / "out").exists()


def test_run_dir_without_checkpoints(tmp_path):
    (tmp_path / "run").mkdir()
    r = run_cli("eval", str(tmp_path / "run"))
    assert_clean_error(r, "holds no complete checkpoint")


def test_data_inspect_shows_figures_and_documents(data_dir):
    r = run_cli("data", "inspect", str(data_dir), "--samples", "2", "--tokens", "20")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "train:" in r.stdout and "val:" in r.stdout and "fingerprint" in r.stdout
    assert r.stdout.count("--- train document") == 2


def test_tokenizer_train_from_a_dataset_with_sample_docs(tmp_path):
    import json

    repo = tmp_path / "ds"
    (repo / "data").mkdir(parents=True)
    rows = [{"body": f"document number {i} " * 20} for i in range(50)]
    (repo / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli(
        "tokenizer",
        "train",
        "--dataset",
        str(repo),
        "--text-column",
        "body",
        "--sample-docs",
        "10",
        "--vocab-size",
        "300",
        "--out",
        str(tmp_path / "tok"),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(tok) <= 300 and tok.eos_token == "<|endoftext|>"
    bad = run_cli(
        "prepare", "--dataset", str(repo), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "o"), "--quiet"
    )
    assert_clean_error(bad, "has no column 'text' (columns: body)")
    assert not (tmp_path / "o").exists()
