import re

import pytest

from tests.helpers import run_cli


@pytest.mark.slow
def test_quickstart_runs_the_whole_path_on_the_embedded_corpus(tmp_path):
    """The README's first command, shortened: every stage runs and validation perplexity falls."""
    d = tmp_path / "qs"
    r = run_cli(
        "quickstart",
        "--dir",
        str(d),
        "train.max_steps=60",
        "optim.warmup_steps=5",
        "train.eval_every=30",
        "checkpoint.save_every=30",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    for stage in ("1/6 tokenizer", "2/6 prepare", "3/6 train", "4/6 eval", "5/6 generate", "6/6 export"):
        assert stage in out
    before, after = map(float, re.search(r"validation perplexity: ([\d.]+) before training -> ([\d.]+)", out).groups())
    assert after < before / 4
    assert "def __init__(self" in out.split("5/6 generate")[1]
    assert (d / "export" / "model.safetensors").is_file()
    # a rerun replaces its own directory
    again = run_cli("quickstart", "--dir", str(d), "train.max_steps=10", "optim.warmup_steps=2")
    assert again.returncode == 0, again.stderr[-2000:]


def test_quickstart_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    r = run_cli("quickstart", "--dir", str(tmp_path))
    assert r.returncode == 2 and "was not made by quickstart" in r.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep me"
