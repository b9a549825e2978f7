"""train.optimizer=muon: DeepSpeed's Muon for the hidden matrices and AdamW for the rest (embedding tables and the
output head found by module, not by name), on ZeRO 1-3; a skipped step leaves its state alone; its state resumes
bit for bit; what DeepSpeed cannot do with it is refused in one sentence."""

import os
import shutil
import subprocess
import sys

import pytest

from dist_clm.parallel.process_group import free_port
from tests.helpers import BIN, TINY, assert_clean_error, launch, metrics, run_cli, train_losses

MUON_STEPS = """
import torch, deepspeed
from transformers import GPT2Config, GPT2LMHeadModel
from deepspeed.utils import safe_get_full_fp32_param
from dist_clm.parallel.engine import deepspeed_config, muon_flags, param_groups
from dist_clm.config import DistributedConfig, OptimConfig, TrainConfig
from dist_clm.training.stability import drop_update

deepspeed.init_distributed("gloo", verbose=False)
ids = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(3)]
for stage in (2, 3):  # (ZeRO-1 runs ZeRO-2's optimizer)
    finals = []
    for dropped in (False, True):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
        config = deepspeed_config(TrainConfig(optimizer="muon", micro_batch_size=2), OptimConfig(grad_clip=0.0),
                                  DistributedConfig(zero_stage=stage), on_gpu=False)
        with muon_flags(model, "muon"):
            engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=config)
        if not dropped:
            matrices = [(n, p) for n, p in model.named_parameters() if len(getattr(p, "ds_shape", p.shape)) >= 2]
            print("adamw", stage, *sorted(n for n, p in matrices if not p.use_muon))
        for i, batch in enumerate(ids):
            engine.backward(engine(input_ids=batch, labels=batch).loss)
            if dropped and i == 1:  # the loss guard's skip: the same gradient, and no update
                before = [safe_get_full_fp32_param(p).clone() for p in model.parameters()]
                drop_update(engine)
                engine.step()
                same = all(torch.equal(a, safe_get_full_fp32_param(p)) for a, p in zip(before, model.parameters()))
                print("dropped", stage, same and not engine.was_step_applied())
                continue
            engine.step()
        finals.append([safe_get_full_fp32_param(p).clone() for p in model.parameters()])
    # with a step dropped, the later step starts from the state the run had before it: the momentum too
    print("moved", stage, not all(torch.equal(a, b) for a, b in zip(*finals)))

# bf16 on ZeRO-3: the fp32 momentum keeps fp32 precision (DeepSpeed gathers it in the communication dtype);
# Muon's update uncompiled (a bf16 compile would cost minutes on 2 cores; precision does not depend on it)
torch._dynamo.config.disable = True
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
config = deepspeed_config(TrainConfig(optimizer="muon", micro_batch_size=2, precision="bf16"),
                          OptimConfig(grad_clip=0.0), DistributedConfig(zero_stage=3), on_gpu=False)
with muon_flags(model, "muon"):
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=config)
for batch in ids:
    engine.backward(engine(input_ids=batch, labels=batch).loss)
    engine.step()
momenta = [s["momentum_buffer"] for s in engine.optimizer.optimizer.state.values() if "momentum_buffer" in s]
m = torch.cat([b.float().flatten() for b in momenta])
m = m[m != 0]
print("momentum", m.dtype, len(m) > 0 and (m.bfloat16().float() == m).float().mean().item())
"""


@pytest.mark.slow
def test_muon_trains_hidden_matrices_on_zero_2_and_3_and_a_dropped_step_leaves_it_alone():
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu"}  # fmt: skip
    r = subprocess.run([sys.executable, "-c", MUON_STEPS], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line.split() for line in r.stdout.splitlines() if line.split()[:1] in (["adamw"], ["dropped"], ["moved"])]
    for stage in ("2", "3"):
        # GPT-2's token and position tables (and so its tied head): AdamW, though DeepSpeed's name rule misses them
        assert ["adamw", stage, "transformer.wpe.weight", "transformer.wte.weight"] in lines, r.stdout
        assert ["dropped", stage, "True"] in lines
        assert ["moved", stage, "True"] in lines
    # momentum that only bf16 values fill (every entry exactly a bf16 number) lost fp32's mantissa: not here
    momentum = next(line for line in r.stdout.splitlines() if line.startswith("momentum"))
    assert momentum.split()[1] == "torch.float32" and float(momentum.split()[2]) < 0.1, momentum


@pytest.mark.slow
def test_a_muon_run_resumes_bit_for_bit_and_refuses_another_rank_count(tmp_path, data_dir):
    settings = [*TINY, f"data.path={data_dir}", "train.optimizer=muon", "train.max_steps=6",
                "checkpoint.save_every=3", "train.log_every=1", "train.eval_every=0",
                "train.global_batch_size=8"]  # fmt: skip
    two = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    run = tmp_path / "run"
    r = launch(two, *settings, "distributed.zero_stage=3", f"run.dir={run}")
    # the first step's compile is announced before it, once; inductor's and ZeRO's FutureWarnings are not said
    assert r.stdout.count("the first step compiles Muon's update with torch.compile") == 1, r.stdout
    assert "FutureWarning" not in r.stderr, r.stderr[-2000:]
    whole = train_losses(metrics(run))
    # built partitioned under ZeRO-3, Muon still moves the hidden matrices as it does for one ZeRO-2 rank (were
    # they left to AdamW, the losses would part from the second step on)
    one = tmp_path / "one"
    r = run_cli("train", *settings, "distributed.zero_stage=2", "train.max_steps=3", "checkpoint.save_every=0",
                f"run.dir={one}")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert train_losses(metrics(one)) == pytest.approx({s: whole[s] for s in (1, 2, 3)}, rel=1e-5)
    rows = [r for r in metrics(run) if "train/muon_lr" in r]
    for row in rows:  # optim.muon_lr (0.02) and optim.lr (3e-3 here), each scaled by the one schedule
        assert row["train/muon_lr"] / row["train/lr"] == pytest.approx(0.02 / 3e-3)

    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000006")
    skip = len(metrics(cut))
    launch(two, *settings, "distributed.zero_stage=3", f"run.dir={cut}")
    resumed = train_losses(metrics(cut, skip))
    assert list(resumed) == [4, 5, 6] and all(resumed[s] == whole[s] for s in resumed)  # Muon's momentum restored

    shutil.rmtree(cut / "checkpoints" / "step_00000006")
    r = subprocess.run([str(BIN / "python"), "-m", "dist_clm", "train", *settings, "distributed.zero_stage=3",
                        f"run.dir={cut}"],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert_clean_error(r, "a Muon run resumes only there", "resume it on that world size and stage")
