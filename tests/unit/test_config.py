from pathlib import Path

import pytest

from dist_clm.config import Config, ConfigError, load_config
from dist_clm.models.build import PRESETS

REPO = Path(__file__).resolve().parents[2]


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
    f.write_text("train:\n  max_steps: 10\noptim:\n  lr: 1.0e-3\n  warmup_steps: 2\n")
    cfg = load_config(f, ["optim.lr=3e-4", "data.block_size=64", "model.overrides.n_layer=3", "run.tensorboard=false"])
    assert cfg.optim.lr == pytest.approx(3e-4)  # YAML reads "3e-4" as a string: it must become the number
    assert cfg.train.max_steps == 10
    assert cfg.data.block_size == 64
    assert cfg.model.overrides == {"n_layer": 3}
    assert cfg.run.tensorboard is False


def test_warmup_is_steps_or_a_fraction_of_the_run():
    optim = lambda *o: load_config(None, list(o)).optim  # noqa: E731
    assert optim().warmup(300) == 30 and optim().warmup(20) == 2  # the default: a tenth of the run
    assert optim("optim.warmup_steps=0.05").warmup(1000) == 50 and optim("optim.warmup_steps=7").warmup(1000) == 7
    assert optim("optim.warmup_steps=0").warmup(1000) == 0


@pytest.mark.parametrize("max_steps", [20, 50])
def test_the_shipped_small_settings_take_a_short_run(max_steps):
    """configs/tiny-cpu.yaml and the quick start's settings with fewer steps, as their own help suggests."""
    from dist_clm.quickstart import TRAIN_SETTINGS

    for cfg in (load_config(REPO / "configs/tiny-cpu.yaml", [f"train.max_steps={max_steps}"]),
                load_config(None, [*TRAIN_SETTINGS, f"train.max_steps={max_steps}"])):  # fmt: skip
        assert 0 < cfg.optim.warmup(max_steps) < max_steps


def test_int_accepted_where_float_expected():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=1"], "config key 'train.lrr' is unknown; valid keys here are: max_steps"),
        (["bogus.x=1"], "config key 'bogus' is unknown"),
        (["train.max_steps=ten"], "config key 'train.max_steps' must be an integer, got 'ten'."),
        (["train.max_steps=1.5"], "config key 'train.max_steps' must be an integer, got 1.5."),
        (["optim.lr=fast"], "config key 'optim.lr' must be a number, got 'fast'."),
        (["run.tensorboard=maybe"], "config key 'run.tensorboard' must be true or false, got 'maybe'."),
        (
            ["train.precision=fp8"],
            "config key 'train.precision' must be 'auto' or 'bf16' or 'fp16' or 'fp32', got 'fp8'.",
        ),
        (["distributed.zero_stage=4"], "config key 'distributed.zero_stage' must be 0, 1, 2 or 3, got 4."),
        (["optim.warmup_steps=500", "train.max_steps=100"], "'optim.warmup_steps' must be below train.max_steps (100)"),
        (["optim.warmup_steps=2.5"], "'optim.warmup_steps' must be a whole number of steps or a fraction of"),
        (["optim.warmup_steps=5", "train.max_steps=5"], "or give it as a fraction of the steps (e.g. optim.warmup"),
        (["data.block_size=1"], "config key 'data.block_size' must be at least 2, got 1."),
        (["optim.lr=-1"], "config key 'optim.lr' must be positive, got -1.0."),
        (["trainlr"], "override 'trainlr' is not of the form section.key=value"),
        (["optim.lr.x=1"], "config key 'optim.lr' must be a number, got {'x': 1}."),
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
    cfg = load_config(None, ["optim.lr=5e-4", "model.preset=tiny-llama"])
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_stages_load_with_typed_weights():
    cfg = load_config(None, [MIX, "data.stages=[{until: 80, weights: {a: 3, b: 1}}, {weights: {b: 1}}]"])
    assert [(s.until, s.weights) for s in cfg.data.stages] == [(80, {"a": 3.0, "b": 1.0}), (0, {"b": 1.0})]


@pytest.mark.parametrize(
    "old, new",
    [("train.lr=1e-3", "optim.lr"), ("train.save_every=5", "checkpoint.save_every"),
     ("train.spike_factor=3", "stability.spike_factor"), ("train.zero_stage=3", "distributed.zero_stage"),
     ("train.objective=sft", "objective.kind"), ("train.dpo_beta=0.2", "objective.dpo_beta")],
)  # fmt: skip
def test_a_key_that_moved_to_its_section_is_refused_naming_where_it_is_now(tmp_path, old, new):
    key, value = old.split("=")
    with pytest.raises(ConfigError) as e:
        load_config(None, [old])
    assert f"config key '{key}' is now '{new}'" in str(e.value) and "\n" not in str(e.value)
    f = tmp_path / "old.yaml"
    f.write_text(f"train:\n  {key.split('.')[1]}: {value}\n")
    with pytest.raises(ConfigError, match=f"is now '{new}'"):
        load_config(f)
    assert load_config(None, [f"{new}={value}"])  # where it is now, it loads


def test_every_section_checks_itself_and_the_config_is_frozen():
    import dataclasses

    cfg = load_config(None, [])
    for name in ("run", "data", "model", "train", "optim", "objective", "checkpoint", "stability", "distributed"):
        section = getattr(cfg, name)
        assert dataclasses.is_dataclass(section)
        assert all(ok for ok, _, _ in getattr(section, "checks", list)())  # the defaults pass
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0
    settled = cfg.replace(objective={"kind": "sft"}, data={"document_mask": True})
    assert (settled.objective.kind, settled.data.document_mask) == ("sft", True)
    assert (cfg.objective.kind, cfg.data.document_mask) == ("auto", None)  # the loaded one is untouched
    with pytest.raises(ConfigError, match="config key 'stability.spike_factor' must be 0 \\(off\\) or more than 1"):
        load_config(None, ["stability.spike_factor=0.5"])
    with pytest.raises(ConfigError, match="config key 'objective.dpo_beta' must be positive"):
        load_config(None, ["objective.dpo_beta=0"])


def test_the_block_size_of_a_step_follows_the_stages():
    stages = "data.stages=[{until: 10}, {until: 20, block_size: 256}, {block_size: 1024}]"
    data = load_config(None, ["data.block_size=64", "data.mix=[{path: a, name: a}]", stages]).data
    assert [data.block_size_at(s) for s in (1, 10, 11, 20, 21, 500)] == [64, 64, 256, 256, 1024, 1024]
    assert load_config(None, ["data.block_size=128"]).data.block_size_at(7) == 128
