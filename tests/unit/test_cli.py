"""The command line's own surface (dist_clm/cli.py): what --help says, and what it refuses before loading a model."""

import argparse

import pytest

from dist_clm.cli import build_parser, main


def commands(parser: argparse.ArgumentParser, name: str = "dist-clm"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield f"{name} {sub}", child
                yield from commands(child, f"{name} {sub}")


def test_every_help_shows_the_defaults_that_matter():
    texts = dict(commands(build_parser()))
    assert "tokens to add to each prompt (default: 64)" in " ".join(texts["dist-clm generate"].format_help().split())
    assert "(default: 8192)" in texts["dist-clm tokenizer train"].format_help()
    for name, parser in texts.items():
        text = parser.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, name


@pytest.mark.parametrize("extra", [["--temperature", "0.8"], ["--top-k", "5", "--top-p", "0.5"]])
def test_greedy_with_sampling_settings_is_refused_before_the_model_loads(extra, capsys):
    assert main(["generate", "no-such-run", "--greedy", *extra]) == 2  # (the missing run would be the next sentence)
    said = capsys.readouterr().err
    assert said.startswith("dist-clm: error: --greedy always takes the most likely token, so --") and "drop" in said


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_missing_model_names_every_kind_of_model_the_command_reads(command, tmp_path, capsys):
    assert main([command, str(tmp_path / "exported")]) == 2
    said = capsys.readouterr().err
    assert "does not exist; give a run directory, one of its checkpoints/step_* directories, or an exported" in said


def test_plan_prints_every_term_and_what_would_make_it_fit(capsys):
    """`dist-clm plan` for llama-1b's config on one 16 GB GPU: each term per rank, the host per node, the checkpoint,
    the time at the MFU given, and (it does not fit) the overrides that would; on 8 H100s it fits. Its bad sizes
    are one sentence."""
    args = ["plan", "--config", "configs/llama-1b.yaml", "--vocab", "32000", "distributed.zero_stage=2"]
    assert main([*args, "--gpus", "1", "--gpu", "a100", "--gpu-memory", "16GB", "--mfu", "0.5"]) == 0
    out = capsys.readouterr().out
    for term in ("1.04 B parameters", "parameters", "gradients", "optimizer state", "activations", "loss head",
                 "DeepSpeed buffers", "DOES NOT FIT", "host memory per node: building", "checkpoint on disk",
                 "at 50% MFU (312 TFLOP/s", "  distributed.offload_optimizer=true\n",
                 "  distributed.zero_stage=3 --gpus 4 --nodes 1"):  # fmt: skip
        assert term in out, (term, out)
    assert main([*args, "--gpus", "8"]) == 0
    assert "-> fits" in capsys.readouterr().out
    assert main([*args, "--gpus", "8", "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory 'lots' is not a size" in capsys.readouterr().err
