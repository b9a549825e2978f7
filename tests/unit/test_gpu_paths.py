"""The paths only a GPU runs, wired on the CPU: what is decided for a GPU is tested as a decision, and what a
GPU kernel computes is computed by a stand-in on the CPU (tests/flash_standin.py for flash attention), so that
everything around the kernel runs as it does on a GPU."""

import importlib.util
import os

import pytest
import torch

from dist_clm.errors import UserError
from tests import flash_standin
from tests.helpers import TINY

# three rows of 64 tokens: documents cut anywhere, a row that begins inside a document (positions not at 0),
# a row that is one document
POSITIONS = torch.stack([
    torch.cat([torch.arange(20), torch.arange(30), torch.arange(14)]),
    torch.cat([torch.arange(7, 17), torch.arange(50), torch.arange(4)]),
    torch.arange(64),
])  # fmt: skip


CUTS = [0, 20, 50, 64, 74, 124, 128, 192]  # every document, and every row's start, in the B x L tokens


def tiny(preset: str, attn: str, vocab: int = 96):
    from dist_clm.models.attention import build_model_with

    class Vocabulary:  # what build_model reads of a tokenizer
        bos_token_id, eos_token_id = 0, 1

        def __len__(self):
            return vocab

    torch.manual_seed(0)
    return build_model_with([attn], preset, "", {}, Vocabulary()).to(torch.bfloat16).eval()


@pytest.fixture
def standin():
    """flash attention's kernels replaced by the stand-ins for this test (transformers' flash path runs)."""
    import transformers.modeling_flash_attention_utils as fa

    import dist_clm.models.attention as attention

    saved = fa.lazy_import_flash_attention, attention.build_model
    flash_standin.install()
    flash_standin.CALLS.clear()
    yield flash_standin.CALLS
    fa.lazy_import_flash_attention, attention.build_model = saved


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("head", ["fused", "plain"])
def test_flash_attention_keeps_documents_apart_in_a_micro_batch_of_several_rows(standin, preset, head):
    """transformers' flash path detects packed documents only in a batch of one row (and its GPT-2 never passes
    the positions on): without dist_clm's bounds, flash runs each row whole. With them, each document (and each
    row's start) is its own sequence: logits and losses equal SDPA's with the dense document mask."""
    from dist_clm.models import loss_head
    from dist_clm.models.attention import feed_documents

    sdpa, flash = tiny(preset, "sdpa"), tiny(preset, "flash_attention_2")
    assert flash.config._attn_implementation == "flash_attention_2"
    layers = flash.config.num_hidden_layers
    ids = torch.randint(2, 96, POSITIONS.shape)
    labels = torch.where(POSITIONS == 0, -100, ids)
    with torch.no_grad():
        want = sdpa(input_ids=ids, position_ids=POSITIONS, use_cache=False).logits.float()
        want_loss = sdpa(input_ids=ids, position_ids=POSITIONS, labels=labels, use_cache=False).loss.float()
        across = flash(input_ids=ids, position_ids=POSITIONS, use_cache=False).logits.float()
        assert standin == ["dense"] * layers  # the defect: one causal run per row, across its documents
        assert (across - want).abs().max() > 0.1
        standin.clear()

        if head == "fused":
            assert loss_head.install(flash)
        feed_documents(flash)
        got = flash(input_ids=ids, position_ids=POSITIONS, use_cache=False).logits.float()
        assert standin == [CUTS] * layers
        torch.testing.assert_close(got, want, rtol=0, atol=2e-2)  # (bf16: another kernel's rounding)
        standin.clear()
        loss = flash(input_ids=ids, position_ids=POSITIONS, labels=labels, use_cache=False).loss.float()
        assert standin == [CUTS] * layers
        assert float(loss) == pytest.approx(float(want_loss), rel=1e-2)
        # bounds the caller computed (the training step, on the host) are used as they are
        from dist_clm.models.attention import document_bounds

        standin.clear()
        flash(input_ids=ids, position_ids=POSITIONS, use_cache=False, **document_bounds(POSITIONS))
        assert standin == [CUTS] * layers
        # generation (a KV cache) is left to transformers
        standin.clear()
        flash(input_ids=ids[:1, :8])
        assert standin == ["dense"] * layers


def test_the_attention_choice_follows_the_precision(monkeypatch):
    """flash attention's kernels take bf16 and fp16 only: auto never picks it for fp32 weights (Llama would fail
    at the first forward pass, GPT-2 with a StopIteration inside transformers), and asking for it is refused."""
    from dist_clm.models.attention import attention_for

    real = importlib.util.find_spec
    installed = lambda name, *a: object() if name == "flash_attn" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", installed)
    assert attention_for("auto", True, on_gpu=True, precision="bf16") == ["flash_attention_2", "flex_attention", "sdpa"]
    assert attention_for("auto", True, on_gpu=True, precision="fp16")[0] == "flash_attention_2"
    assert attention_for("auto", True, on_gpu=True, precision="fp32") == ["flex_attention", "sdpa"]
    assert attention_for("flash_attention_2", True, on_gpu=True, precision="bf16") == ["flash_attention_2"]
    with pytest.raises(UserError, match="'flash_attention_2', whose kernels take bf16 or fp16 only, but the run"):
        attention_for("flash_attention_2", True, on_gpu=True, precision="fp32")


class Products(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the dtype of every matrix product run inside it."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.default,
                    torch.ops.aten.bmm.default):  # fmt: skip
            self.dtypes.append(args[-1].dtype)
        return func(*args, **(kwargs or {}))


def test_the_fused_loss_head_multiplies_in_the_weights_dtype():
    """Every product of the fused head (logits, their recomputation in the backward, and the gradients of the
    hidden states and of the weight) runs in the weights' dtype, as the plain head's do: bf16 on tensor cores, not
    the weight's gradient in full fp32 (2.5 TFLOP per micro batch for GPT-2 124M at 32 x 1024); its gradients equal
    the plain head's (bf16)."""
    from dist_clm.models.loss_head import fused_linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(300, 32, dtype=torch.bfloat16, requires_grad=True)
    weight = (0.2 * torch.randn(500, 32)).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 500, (300,))
    labels[::7] = -100
    with Products() as products:
        total, count = fused_linear_cross_entropy(hidden, weight, labels, chunk=128)
    assert products.dtypes == [torch.bfloat16] * 4  # the logits of 4 chunks of the vocabulary
    with Products() as products:
        (total / count).backward()
    assert products.dtypes == [torch.bfloat16] * 3 * 4  # per chunk: its logits again, then the two gradients
    h, w = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    torch.nn.functional.cross_entropy(h @ w.T, labels).backward()
    torch.testing.assert_close(weight.grad.float(), w.grad, rtol=0, atol=2e-3)
    torch.testing.assert_close(hidden.grad.float(), h.grad, rtol=0, atol=2e-3)


def test_tf32_is_set_on_gpus_only():
    from dist_clm.config import TrainConfig
    from dist_clm.parallel.engine import use_tf32

    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = [f.allow_tf32 for f in flags]
    try:
        use_tf32(False, on_gpu=True)
        assert not flags[0].allow_tf32 and not flags[1].allow_tf32
        use_tf32(True, on_gpu=False)
        assert not flags[0].allow_tf32 and not flags[1].allow_tf32
        use_tf32(TrainConfig().tf32, on_gpu=True)  # (the default)
        assert flags[0].allow_tf32 and flags[1].allow_tf32
    finally:
        for f, value in zip(flags, saved, strict=True):
            f.allow_tf32 = value


def test_a_task_bound_to_one_gpu_drives_it_and_deepspeed_agrees(monkeypatch):
    """SLURM's --gpus-per-task=1 / --gpu-bind=single show each task its own GPU as device 0: local rank 1 must
    not ask for device 1, and DeepSpeed (which takes its device from LOCAL_RANK) must use device 0 too."""
    from dist_clm.parallel.process_group import bind_gpu, gpu_index, table_problem

    assert gpu_index(1, visible=1) == 0 and gpu_index(3, visible=8) == 3 and gpu_index(0, visible=4) == 0
    with pytest.raises(UserError, match="local rank 2 sees only 2 GPUs"):
        gpu_index(2, visible=2)
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert bind_gpu(1) == 0 and chosen == [0] and os.environ["LOCAL_RANK"] == "0"
    # two ranks that end up on one GPU (a launcher that shows every task the same one) are one sentence
    rows = [{"rank": r, "node": "n1", "local_rank": r, "local_world_size": 2, "device": "cuda:0", "gpu": "GPU-a"}
            for r in range(2)]  # fmt: skip
    assert "ranks 0 and 1 on node n1 drive the same GPU (cuda:0, GPU-a)" in table_problem(rows)
    rows[1]["gpu"] = "GPU-b"
    assert table_problem(rows) is None
    assert table_problem([{**r, "device": "cpu", "gpu": ""} for r in rows]) is None  # (CPU ranks share the CPU)


def test_precision_auto_takes_real_bf16_only_and_mfu_knows_the_card(monkeypatch):
    """precision=auto on a GPU whose bf16 is emulated (V100, T4: torch.cuda.is_bf16_supported() counts
    emulation) trains in fp16, not slow emulated bf16; MFU's peak is the card's own (H100 PCIe and NVL are not
    the SXM) in the run's precision (fp32 runs against TF32 or fp32)."""
    from dist_clm.observability.metrics import peak_for
    from dist_clm.parallel.engine import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    assert resolve_precision("auto", on_gpu=True) == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (6, 1))
    assert resolve_precision("auto", on_gpu=True) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", on_gpu=True) == "bf16"
    assert resolve_precision("auto", on_gpu=False) == "fp32"
    assert peak_for("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_for("NVIDIA H100 PCIe", "bf16") == 756e12 and peak_for("NVIDIA H100 NVL", "fp16") == 835e12
    assert peak_for("NVIDIA H200", "fp32") == 495e12 and peak_for("NVIDIA H200", "fp32", tf32=False) == 67e12
    assert peak_for("NVIDIA A100-SXM4-80GB", "bf16") == 312e12 and peak_for("NVIDIA A10G", "bf16") is None
    assert peak_for("NVIDIA L4", "bf16") == 121e12 and peak_for("NVIDIA L40S", "bf16") == 362e12
    assert peak_for("Tesla V100-SXM2-32GB", "bf16") is None and peak_for("Tesla T4", "fp16") == 65e12


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operations that make a GPU's host wait for it: a value read back (item, float, bool, tolist),
    and the ops whose output size depends on the data (nonzero, boolean indexing, masked_select, unique)."""

    OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "equal", "is_nonzero")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.OPS or (name == "index" and any(getattr(i, "dtype", None) == torch.bool for i in args[1])):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_the_preference_loss_of_a_micro_batch_reads_nothing_back_from_the_device(objective):
    """A DPO or ORPO micro batch's loss and statistics stay on the device (they were about ten host reads per
    micro batch: the documents' count, nonzero, boolean indexing, float()); the statistics are read once per log
    window, with its reduction."""
    from types import SimpleNamespace

    from dist_clm.config import ObjectiveConfig
    from dist_clm.training.objectives import for_run
    from dist_clm.training.preference import STATS

    model = tiny("tiny", "sdpa").float()
    positions = torch.cat([torch.arange(20), torch.arange(30), torch.arange(14)]).expand(4, -1).clone()
    positions[1] = torch.cat([torch.arange(22), torch.arange(33), torch.arange(9)])  # rejected answers: other lengths
    positions[3] = positions[1]
    ids = torch.randint(2, 96, positions.shape)
    labels = torch.where((positions >= 5) & (torch.arange(64) < 50), ids, -100)  # two learned conversations a row
    reference = torch.full((4, 32), float("nan"))
    reference[:, :2] = -20.0
    from dist_clm.parallel.sequence_parallel import SequenceParallel

    settings = ObjectiveConfig(kind=objective)
    run = SimpleNamespace(engine=model, sp=SequenceParallel())
    inputs = {"input_ids": ids, "labels": labels, "position_ids": positions, "reference": reference}
    with HostReads() as reads:
        loss, stats = for_run(settings, 2.0).loss(run, inputs, {"num_items_in_batch": torch.tensor(4.0)})
        loss.backward()
    assert reads.seen == []
    assert len(stats) == len(STATS) and stats.tolist()[0] == 4 and stats.tolist()[-1] == 0  # 4 pairs, all whole
    assert torch.isfinite(loss)


def test_the_zero0_fp32_skip_check_reads_one_value_back():
    """ZeRO-0 in fp32 decides whether to skip a step from every gradient: one host read (the agreed flag, read
    with the reduction), not one per parameter."""
    from types import SimpleNamespace

    from dist_clm.training.stability import step_zero0_fp32

    module = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(5)))
    module(torch.randn(2, 4)).sum().backward()
    stepped = []
    optimizer = SimpleNamespace(overflow=None, state_dict=dict, load_state_dict=lambda s: None)
    engine = SimpleNamespace(module=module, optimizer=optimizer, step=lambda: stepped.append(1))
    with HostReads() as reads:
        step_zero0_fp32(engine, False, "cpu")
    assert reads.seen == [] and stepped == [1] and optimizer.overflow is False  # (the agreed flag: one tolist)
    next(module.parameters()).grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in module.parameters()]
    step_zero0_fp32(engine, False, "cpu")
    assert optimizer.overflow is True and all(map(torch.equal, before, module.parameters()))


def test_batches_are_pinned_for_a_gpu_and_copied_without_waiting(monkeypatch, data_dir):
    """On a GPU the loader's batches are page-locked and the step copies them with non_blocking=True, so the
    host does not wait for each copy."""
    from types import SimpleNamespace

    from dist_clm.config import load_config
    from dist_clm.data.order import DataPosition
    from dist_clm.data.run_data import training_sources
    from dist_clm.training.setup import Run
    from dist_clm.training.step import model_inputs

    cfg = load_config(None, [*TINY, f"data.path={data_dir}"])
    sources = training_sources(cfg.data)
    env = SimpleNamespace(rank=0, world_size=1, device="cuda:0")
    module = torch.nn.Linear(1, 1)
    module.config = SimpleNamespace(_attn_implementation="sdpa")  # (the step reads which attention it is)
    run = Run(cfg, env, sources, SimpleNamespace(module=module), None, 1, "bf16", 0, 0.0, None, None,
              {"data": DataPosition.from_config(cfg.data, cfg.run.dir, sources, 4)}, None, None, None)  # fmt: skip
    assert run.loader().pin_memory
    env.device = "cpu"
    assert not run.loader().pin_memory
    calls = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append(k) or self)
    model_inputs(run, {"input_ids": torch.zeros(2, 3), "labels": torch.zeros(2, 3)})
    assert calls == [{"non_blocking": True}] * 2


def test_under_nccl_a_timed_out_collective_raises_in_the_main_thread(monkeypatch, capsys):
    """torch's NCCL watchdog ends a process whose collective timed out with SIGABRT (its default, and torchrun's
    setting), so the rank that stopped was never named and the job never requeued: on a GPU, dist_clm has it
    abort the communicator only (the wait ends; the next collective raises in the main thread), whatever the
    launcher set; and a value read back from such a collective is never used: its error is raised instead, as
    the collective failure train() turns into exit 75."""
    import torch.distributed as dist

    from dist_clm.parallel import collectives, process_group

    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # (what torchrun exports)
    monkeypatch.setenv("RANK", "0")
    process_group.nccl_errors_raise()
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2" and "becomes 2" in capsys.readouterr().err

    class TimedOut:  # what a NCCL work whose collective the watchdog aborted reports
        def wait(self):
            return True

        def exception(self):
            return "Watchdog caught collective operation timeout: WorkNCCL(OpType=ALLREDUCE) timed out"

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: TimedOut())
    with pytest.raises(RuntimeError) as raised:
        collectives.reduce_to_host(torch.zeros(3))
    assert collectives.is_collective_failure(raised.value)
    assert collectives.failure_reason(raised.value, 300) == "no answer within the collective timeout of 300 s"


def test_what_says_a_process_was_given_gpus(tmp_path):
    """SLURM's allocation, a GPU UUID in CUDA_VISIBLE_DEVICES, or the driver listing GPUs say so; the deepspeed
    launcher's CUDA_VISIBLE_DEVICES=0,1 (set on CPU-only machines too) and SLURM's zeros do not."""
    from dist_clm.parallel.process_group import driver_version, gpus_given

    none = tmp_path / "absent"
    assert gpus_given({}, none) == ""
    assert gpus_given({"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_GPUS_ON_NODE": "0"}, none) == ""
    assert gpus_given({"SLURM_GPUS_ON_NODE": "8"}, none) == "SLURM_GPUS_ON_NODE=8"
    assert gpus_given({"SLURM_JOB_GPUS": "0,1"}, none) == "SLURM_JOB_GPUS=0,1"
    assert gpus_given({"CUDA_VISIBLE_DEVICES": "GPU-5d1c"}, none) == "CUDA_VISIBLE_DEVICES=GPU-5d1c"
    driver = tmp_path / "gpus"
    (driver / "0000:17:00.0").mkdir(parents=True)
    (driver / "0000:65:00.0").mkdir()
    assert gpus_given({}, driver) == "the NVIDIA driver lists 2 GPUs"
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n")
    assert driver_version(version) == "535.104.05"


def test_gpus_torch_cannot_use_are_one_sentence_not_a_cpu_run(monkeypatch):
    """Given GPUs while torch.cuda.is_available() is False (a wheel built for a newer CUDA than the driver): one
    sentence naming what gave them, torch's CUDA and the driver, and the ways out; DS_ACCELERATOR=cpu means the
    CPU on purpose; nothing given, the CPU as before."""
    import dist_clm.parallel.process_group as pg

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(pg, "driver_version", lambda: "535.104.05")
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    with pytest.raises(UserError) as e:
        pg.use_cpu_accelerator_if_no_gpu()
    assert "was given GPUs (SLURM_GPUS_ON_NODE=4)" in str(e.value)
    assert f"torch {torch.__version__} is built for CUDA" in str(e.value)
    assert "the NVIDIA driver is 535.104.05" in str(e.value) and "DS_ACCELERATOR=cpu" in str(e.value)
    assert "DS_ACCELERATOR" not in os.environ
    with pytest.raises(UserError):
        pg.inference_device()
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert pg.inference_device() == "cpu"
    monkeypatch.delenv("DS_ACCELERATOR")
    monkeypatch.delenv("SLURM_GPUS_ON_NODE")
    monkeypatch.setattr(pg, "NVIDIA_GPUS", pg.Path("/nonexistent"))
    pg.use_cpu_accelerator_if_no_gpu()
    assert os.environ["DS_ACCELERATOR"] == "cpu"
