from pathlib import Path

import pytest

from dist_clm.config import Config, ConfigError, load_config
from dist_clm.model import PRESETS

REPO = Path(__file__).resolve().parents[1]
MIX = "data.mix=[{path: x/a}, {path: y/b}, {path: y/c, weight: 0}]"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.model.preset in PRESETS


def test_configs_dir_is_not_empty():
    assert len(list((REPO / "configs").glob("*.yaml"))) >= 3


def test_overrides_apply_on_top_of_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1.0e-3\n  max_steps: 10\n  warmup_steps: 2\n")
    cfg = load_config(f, ["train.lr=3e-4", "data.block_size=64", "model.overrides.n_layer=3", "run.tensorboard=false"])
    assert cfg.train.lr == pytest.approx(3e-4)  # YAML reads "3e-4" as a string: it must become the number
    assert cfg.train.max_steps == 10
    assert cfg.data.block_size == 64
    assert cfg.model.overrides == {"n_layer": 3}
    assert cfg.run.tensorboard is False


def test_int_accepted_where_float_expected():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=1"], "config key 'train.lrr' is unknown; valid keys here are: max_steps"),
        (["bogus.x=1"], "config key 'bogus' is unknown"),
        (["train.max_steps=ten"], "config key 'train.max_steps' must be an integer, got 'ten'."),
        (["train.max_steps=1.5"], "config key 'train.max_steps' must be an integer, got 1.5."),
        (["train.lr=fast"], "config key 'train.lr' must be a number, got 'fast'."),
        (["run.tensorboard=maybe"], "config key 'run.tensorboard' must be true or false, got 'maybe'."),
        (
            ["train.precision=fp8"],
            "config key 'train.precision' must be 'auto' or 'bf16' or 'fp16' or 'fp32', got 'fp8'.",
        ),
        (["train.zero_stage=4"], "config key 'train.zero_stage' must be 0, 1, 2 or 3, got 4."),
        (["train.warmup_steps=500", "train.max_steps=100"], "config key 'train.warmup_steps' must be at least 0"),
        (["data.block_size=1"], "config key 'data.block_size' must be at least 2, got 1."),
        (["train.lr=-1"], "config key 'train.lr' must be positive, got -1.0."),
        (["trainlr"], "override 'trainlr' is not of the form section.key=value"),
        (["train.lr.x=1"], "config key 'train.lr' must be a number, got {'x': 1}."),
        (["data.stages=[{weights: {a: 1}}]"], "config key 'data.stages' weighs the sources of data.mix"),
        ([MIX, "data.stages=[{weights: {a: 1, c: 2}}]"], "names c, not a data.mix source with a weight above 0"),
        ([MIX, "data.stages=[{weights: {a: 0}}]"], "has a stage without a positive weight"),
        ([MIX, "data.stages=[{weights: {a: x}}]"], "config key 'data.stages[0].weights.a' must be a number"),
        (
            [MIX, "data.stages=[{until: 50, weights: {a: 1}}, {until: 20, weights: {b: 1}}]"],
            "'until' steps must rise from stage to stage (got [50, 20]; the last may be 0)",
        ),
        ([MIX, "data.stages=[{until: 5, weights: {a: 1}, extra: 1}]"], "config key 'data.stages[0].extra' is unknown"),
    ],
)
def test_bad_config_gives_one_sentence_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    text = str(e.value)
    assert message in text
    assert "\n" not in text and text.endswith(".")


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)
    section = tmp_path / "section.yaml"
    section.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(section)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.lr=5e-4", "model.preset=tiny-llama"])
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_stages_load_with_typed_weights():
    cfg = load_config(None, [MIX, "data.stages=[{until: 80, weights: {a: 3, b: 1}}, {weights: {b: 1}}]"])
    assert [(s.until, s.weights) for s in cfg.data.stages] == [(80, {"a": 3.0, "b": 1.0}), (0, {"b": 1.0})]
