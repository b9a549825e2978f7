"""What the train, optim and distributed sections mean for DeepSpeed (parallel/engine.py): the schedules, the generated
config and a user's JSON over it, offload and Muon settings."""

import json
import math
import re

import pytest

from dist_clm.config import DistributedConfig, OptimConfig, TrainConfig, load_config
from dist_clm.errors import UserError
from dist_clm.parallel.engine import deepspeed_config, lr_factor


def t(*overrides):
    return load_config(None, ["train.max_steps=100", "optim.warmup_steps=10", *overrides]).optim


def ds_config(cfg, **kwargs):
    return deepspeed_config(cfg.train, cfg.optim, cfg.distributed, **kwargs)


def test_warmup_then_cosine_linear_and_wsd():
    for schedule in ("cosine", "linear", "wsd"):
        tr = t(f"optim.schedule={schedule}", "optim.min_lr_ratio=0.1")
        assert [lr_factor(s, tr, 100) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
        assert lr_factor(100, tr, 100) == pytest.approx(0.1)  # every shape ends at min_lr_ratio
    cos, lin = t("optim.schedule=cosine"), t("optim.schedule=linear")
    assert lr_factor(55, cos, 100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(55, lin, 100) == pytest.approx(1 - 0.9 * 0.5)
    wsd = t("optim.schedule=wsd", "optim.decay_fraction=0.2")
    assert all(lr_factor(s, wsd, 100) == 1.0 for s in range(10, 81))  # stable until the last 20 steps
    assert lr_factor(90, wsd, 100) == pytest.approx(1 - 0.9 * 0.5)  # then linear down
    share = t("optim.warmup_steps=0.25", "optim.schedule=linear", "optim.min_lr_ratio=0")  # a quarter of the run
    assert [lr_factor(s, share, 20) for s in range(7)] == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5, 1, 1, 1 - 1 / 15])


def test_generated_config_and_precedence_of_a_users_json(tmp_path):
    cfg = load_config(None, ["train.precision=fp16", "distributed.zero_stage=3", "distributed.offload_optimizer=true",
                             "distributed.offload_params=true"])  # fmt: skip
    ds = ds_config(cfg, on_gpu=True, grad_accum=4)
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16} and not ds["bf16"]["enabled"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["gradient_accumulation_steps"] == 4
    assert "fused" not in ds["optimizer"]["params"]  # offloaded: DeepSpeed's CPU Adam steps
    gpu = ds_config(load_config(None, ["train.precision=bf16"]), on_gpu=True)
    assert gpu["optimizer"]["params"]["fused"] is True and gpu["bf16"]["enabled"]  # torch's fused AdamW
    assert "fused" not in ds_config(load_config(None, []), on_gpu=False)["optimizer"]["params"]

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"gradient_clipping": 0.5, "zero_optimization": {"reduce_bucket_size": 1000}}))
    merged = ds_config(load_config(None, [f"distributed.deepspeed_config={user}"]), on_gpu=False)
    assert merged["gradient_clipping"] == 0.5  # the file wins over train.*
    assert merged["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}  # merged key by key
    for bad, fragment in [
        ({"train_micro_batch_size_per_gpu": 3}, "batch sizes come from train.*"),
        ({"scheduler": {"type": "WarmupLR"}}, "choose it with optim.schedule"),
        (
            {"sequence_parallel_size": 2},
            "sets sequence_parallel_size=2; set distributed.sequence_parallel_size instead",
        ),
        (
            {"tensor_parallel": {"autotp_size": 4}},
            "sets tensor_parallel.autotp_size=4; set distributed.tensor_parallel_size instead",
        ),
    ]:
        user.write_text(json.dumps(bad))
        with pytest.raises(UserError, match=fragment):
            ds_config(load_config(None, [f"distributed.deepspeed_config={user}"]), on_gpu=False)
    user.write_text(json.dumps({"compile": {"deepcompile": True}}))  # (its reduction is not DeepSpeed's usual)
    assert ds_config(load_config(None, [f"distributed.deepspeed_config={user}"]), on_gpu=False)["compile"]
    with pytest.raises(UserError, match="sets compile.deepcompile, which reduces gradients its own way"):
        ds_config(load_config(None, [f"distributed.deepspeed_config={user}", "distributed.sequence_parallel_size=2"]),
                  on_gpu=False)  # fmt: skip
    user.write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        ds_config(load_config(None, [f"distributed.deepspeed_config={user}"]), on_gpu=False)


def test_offload_settings_are_checked():
    for override, fragment in [
        ("distributed.offload_params=true", "needs distributed.zero_stage=3"),
        ("optim.decay_fraction=0", "must be in (0, 1]"),
    ]:
        with pytest.raises(UserError, match=re.escape(fragment)):
            load_config(None, [override])


def test_the_deepspeed_config_of_a_muon_run():
    muon = TrainConfig(optimizer="muon")
    o = OptimConfig(grad_clip=0.0, muon_lr=0.03, muon_momentum=0.9)
    ds = deepspeed_config(muon, o, DistributedConfig(zero_stage=3), on_gpu=False)
    assert ds["optimizer"]["type"] == "Muon"
    params = ds["optimizer"]["params"]
    assert (params["muon_lr"], params["momentum"], params["adam_lr"]) == (0.03, 0.9, o.lr)
    assert params["betas"] == [o.beta1, o.beta2] and params["weight_decay"] == o.weight_decay
    assert ds["zero_optimization"]["reduce_scatter"] is False  # (DeepSpeed's ZeRO-3 Muon refuses it)
    zero2 = deepspeed_config(muon, o, DistributedConfig(zero_stage=2), on_gpu=False)["zero_optimization"]
    assert "reduce_scatter" not in zero2
    with pytest.raises(UserError, match="with train.optimizer=muon DeepSpeed clips the orthogonalized update"):
        deepspeed_config(muon, OptimConfig(grad_clip=1.0), DistributedConfig(), on_gpu=False)  # set, so refused
    # unset, the clip follows the optimizer: off for Muon (the one key is enough), 1 for AdamW
    assert deepspeed_config(muon, OptimConfig(), DistributedConfig(), on_gpu=False)["gradient_clipping"] == 0
    assert deepspeed_config(TrainConfig(), OptimConfig(), DistributedConfig(), False)["gradient_clipping"] == 1
    with pytest.raises(UserError, match="runs with ZeRO stages 1-3"):
        deepspeed_config(muon, o, DistributedConfig(zero_stage=0), on_gpu=False)
    assert deepspeed_config(TrainConfig(), OptimConfig(), DistributedConfig(), False)["optimizer"]["type"] == "AdamW"
