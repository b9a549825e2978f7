"""The correctness checks of one device, run in the GPU suite's process (bench/gpu_suite.py orders them, times
them and writes their results): dist_clm's own train, export, eval and generate on the `tiny` preset and the
suite's prepared data, called as the commands call them.

    zero2 resumed     train() bf16 ZeRO-2, 6 steps, a checkpoint at 3 (train.compile as by default: on a GPU,
                      compiled); a copy cut back to its checkpoint at 3 and resumed to 6: losses of steps 4-6
                      equal the straight run's
    compile = eager   the straight run against the same run the other way: train.compile=false on a GPU (where
                      the default compiles), train.compile=true on the CPU (where it does not): losses equal
    zero3 resumed     the same two runs in ZeRO-3
    export            `dist-clm export` of the ZeRO-3 run: `dist-clm eval` of the export (transformers'
                      AutoModelForCausalLM.from_pretrained) equals that of the checkpoint, and transformers'
                      pipeline("text-generation") generates from it
    eval, generate    `dist-clm eval` and `dist-clm generate` of the ZeRO-2 checkpoint (dist_clm.cli.main, as a user
                      runs them outside a launcher): they run on the GPU (its memory was used)
    zero3 + act. ckpt ZeRO-3, activation checkpointing, compiled (configs/llama-1b.yaml's combination): losses equal
                      the same run eager
    moe, muon         the tiny-moe preset resumed as zero3 resumed, and train.optimizer=muon on ZeRO-2 resumed as
                      zero2 resumed
    document masks    tiny GPT-2 and tiny Llama in bf16, a micro batch of 4 rows of packed documents (rows that
                      begin inside a document too): the logits of every attention path a run may pick
                      (flex_attention; flash_attention_2 where flash_attn is installed, fed the documents' bounds
                      as in training) equal SDPA's with the dense document mask (and flash attention without
                      the bounds does not: it would attend across documents)
    loss head         the fused loss head's forward + backward against the plain head's (logits, then
                      cross-entropy) at GPT-2 124M's size (32 x 1024 tokens, 768 wide, 50257 words, bf16): its time
                      is at most 1.5x the plain head's (its weight gradient runs on bf16 tensor cores)

"Equal" is to `rtol` (relative; 2e-2 on a GPU: bf16, and kernels whose reductions are not ordered the same from
run to run, such as the embedding's backward; on the CPU a resume is bitwise exact and the resume tolerance is
1e-6, while compiled against eager keeps 2e-2: compiled kernels fuse and round differently).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

STEPS, CUT = 6, 3
COMPILED_RTOL = 2e-2  # compiled against eager, on either device (bf16 kernels fused and rounded differently)


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def close(a: list[float], b: list[float], rtol: float) -> tuple[bool, float]:
    worst = max((abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True)), default=0.0)
    return len(a) == len(b) and worst <= rtol, worst


def last_line(text: str) -> str:
    return (text.strip().splitlines() or ["no output"])[-1]


class Smoke:
    """The checks, each a method; `record` receives each check's result the moment it is known."""

    def __init__(self, cpu: bool, data: Path, work: Path, rtol: float | None, record: Callable[[dict], None]):
        self.cpu, self.data, self.work, self.record = cpu, data, work / "smoke", record
        self.rtol = rtol if rtol is not None else (1e-6 if cpu else 2e-2)
        self.compiled_rtol = rtol if rtol is not None else COMPILED_RTOL
        self.device = "cpu" if cpu else "cuda"
        self.runs: dict[str, Path] = {}
        shutil.rmtree(self.work, ignore_errors=True)

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.record({"check": name, "ok": ok, "detail": detail})

    def train(self, name: str, zero: int, *extra: str) -> Path:
        """dist_clm's train() in this process: `tiny`, bf16, 6 steps with a checkpoint at 3; its run directory."""
        from dist_clm.config import load_config
        from dist_clm.training.loop import train

        run = self.work / name
        train(load_config(None, [
            "model.preset=tiny", f"data.path={self.data}", f"run.dir={run}", "data.block_size=128",
            "train.micro_batch_size=8", "train.precision=bf16", f"distributed.zero_stage={zero}",
            f"train.max_steps={STEPS}", f"checkpoint.save_every={CUT}", "checkpoint.keep_last=4",
            "optim.warmup_steps=2", "train.log_every=1", "train.eval_every=0", "train.eval_blocks=2",
            "run.tensorboard=false", "run.progress_bar=false", *extra]))  # fmt: skip
        return run

    def straight(self, zero: int, what: str = "", *extra: str) -> Path:
        """The straight run of one ZeRO stage (`extra` settings, named `what`), trained once per suite."""
        name = f"{what.strip().lower()}_" * bool(what) + f"zero{zero}_straight"
        if name not in self.runs:
            self.runs[name] = self.train(name, zero, *extra)
        return self.runs[name]

    def resume(self, zero: int, what: str = "", *extra: str) -> None:
        """The straight run, then a copy of it cut back to its checkpoint at step CUT and resumed from there (as
        after a preemption): the losses of the steps after CUT equal."""
        straight = self.straight(zero, what, *extra)
        cut = straight.with_name(straight.name.replace("_straight", "_resumed"))
        shutil.rmtree(cut, ignore_errors=True)
        shutil.copytree(straight, cut)
        for late in (cut / "checkpoints").glob("step_*"):
            if int(late.name.split("_")[1]) > CUT:
                shutil.rmtree(late)
        (cut / "metrics.jsonl").write_text("")
        a, b = losses(straight), losses(self.train(cut.name, zero, *extra))
        later = range(CUT + 1, STEPS + 1)
        ok, worst = close([b.get(s, float("nan")) for s in later], [a[s] for s in later], self.rtol)
        self.check(f"{what}ZeRO-{zero} bf16 resumed at step {CUT} continues as the straight run", ok and sorted(b) ==
                   list(later), f"steps {CUT + 1}-{STEPS}: max relative difference {worst:.2e}")  # fmt: skip

    def compiled_against_eager(self, name: str, default: Path, zero: int, *extra: str) -> None:
        """A run with the default train.compile (compiled on a GPU, eager on the CPU) against the same run the
        other way round, so that one of the two compiles on either device: their losses equal."""
        other = self.train(f"{default.name}_other", zero, *extra, f"train.compile={'true' if self.cpu else 'false'}")
        compiled, eager = (other, default) if self.cpu else (default, other)
        a, b = losses(compiled), losses(eager)
        ok, worst = close([a[s] for s in sorted(a)], [b[s] for s in sorted(a)], self.compiled_rtol)
        self.check(name, ok and len(a) == STEPS, f"{len(a)} steps, train.compile=true against false: max relative "
                   f"difference {worst:.2e}")  # fmt: skip

    def compiled_equals_eager(self) -> None:
        self.compiled_against_eager("ZeRO-2 compiled equals eager", self.straight(2), 2)

    def checkpointing_compiled(self) -> None:
        """ZeRO-3 + activation checkpointing compiled, against the same run eager."""
        ckpt = "train.activation_checkpointing=true"
        default = self.straight(3, "ckpt", ckpt)
        self.compiled_against_eager("ZeRO-3 + activation checkpointing compiled equals eager", default, 3, ckpt)

    def cli(self, *args: str) -> tuple[int, str]:
        """A `dist-clm` command in this process (dist_clm.cli.main): its exit code and its standard output."""
        from dist_clm.cli import main as cli

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli(list(args))
        return code, out.getvalue()

    def export_loads(self) -> None:
        """`dist-clm export` of the ZeRO-3 run in the precision it trained in (bf16; eval loads a checkpoint in it);
        eval of the export (through AutoModelForCausalLM) equals that of the checkpoint, and transformers' own
        pipeline generates from it."""
        from transformers import pipeline

        run, out = self.straight(3), self.work / "export"
        shutil.rmtree(out, ignore_errors=True)
        code, said = self.cli("export", str(run), "--out", str(out), "--dtype", "bfloat16")
        if code != 0:
            self.check("export loads in transformers", False, f"dist-clm export: exit {code}; {last_line(said)}")
            return
        args = ("--data", str(self.data), "--max-blocks", "2", "--block-size", "128", "--json")
        evals = [self.cli("eval", str(x), *args) for x in (run, out)]
        if any(code for code, _ in evals):
            self.check("export loads in transformers", False, f"dist-clm eval: exit codes {[c for c, _ in evals]}")
            return
        ours, theirs = (json.loads(last_line(said))["loss"] for _, said in evals)
        generated = pipeline("text-generation", model=str(out), device=self.device)("def ", max_new_tokens=8)
        ok, worst = close([theirs], [ours], self.rtol)
        self.check("export loads in transformers", ok, f"validation loss {theirs:.4f} (export) vs {ours:.4f} "
                   f"(checkpoint); pipeline generated {generated[0]['generated_text'][:40]!r}")  # fmt: skip

    def inference_on_device(self) -> None:
        """`dist-clm eval` and `dist-clm generate` of the ZeRO-2 checkpoint, as a user runs them outside a launcher:
        on the GPU (its memory used)."""
        import torch

        checkpoint = str(sorted((self.straight(2) / "checkpoints").glob("step_*"))[-1])
        commands = {
            "eval": ["eval", checkpoint, "--data", str(self.data), "--max-blocks", "2", "--json"],
            "generate": ["generate", checkpoint, "--prompt", "def ", "--max-new-tokens", "8"],
        }
        for name, args in commands.items():
            if not self.cpu:
                torch.cuda.reset_peak_memory_stats()
            code, said = self.cli(*args)
            used = self.cpu or torch.cuda.max_memory_allocated() > 0
            where = "the CPU run" if self.cpu else "GPU memory used" if used else "no GPU memory used"
            self.check(f"{name} runs on the {self.device}", code == 0 and used,
                       f"exit {code}; {where}; {said.strip()[-60:]!r}")  # fmt: skip

    def document_masks(self) -> None:
        """The logits of each attention path a document-masked run may pick, micro batch 4, against SDPA's."""
        import importlib.util

        import torch

        from dist_clm.models.attention import FLASH, build_model_with, feed_documents

        class Vocabulary:
            bos_token_id, eos_token_id = 0, 1

            def __len__(self):
                return 512

        lengths = [[100, 300, 112], [37, 400, 75], [512], [256, 256]]
        positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
        positions[1, :37] += 60  # (a row that begins inside a document)
        ids = torch.randint(2, 512, positions.shape)
        paths = ["flex_attention"] + ([FLASH] if importlib.util.find_spec("flash_attn") else [])
        for preset in ("tiny", "tiny-llama"):
            out = {}
            for attn in ["sdpa", *paths]:
                torch.manual_seed(0)
                try:
                    model = build_model_with([attn], preset, "", {}, Vocabulary(), document_mask=True)
                except Exception as e:  # noqa: BLE001 (reported as the check's failure)
                    self.check(f"{preset} {attn} keeps documents apart", False, str(e).splitlines()[0][:160])
                    continue
                model = model.to(self.device, torch.bfloat16).eval()
                inputs = dict(input_ids=ids.to(self.device), position_ids=positions.to(self.device), use_cache=False)
                with torch.no_grad():
                    if attn == FLASH:  # what flash attention does without the bounds: the defect, for contrast
                        out["flash, no bounds"] = model(**inputs).logits.float()
                        feed_documents(model)
                    out[attn] = model(**inputs).logits.float()
            for attn in paths:
                if attn not in out:
                    continue
                worst = float((out[attn] - out["sdpa"]).abs().max())
                detail = f"max |logit difference| to SDPA with the dense mask {worst:.3g} (bf16)"
                if attn == FLASH:
                    detail += f"; without the bounds {float((out['flash, no bounds'] - out['sdpa']).abs().max()):.3g}"
                self.check(f"{preset} {attn} keeps documents apart (micro batch 4)", worst < 0.05, detail)

    def watching(self) -> None:
        """What watching a run records on this device: the time split of every window, the profile of steps 2-3
        with the loop's named ranges, and on a GPU the allocator's snapshot of the same steps (memory_viz's pickle),
        the flight recorder's folder and variables, and the out-of-memory sentence after a real out-of-memory
        error (a tensor larger than the GPU)."""
        import os
        import pickle

        import torch

        from dist_clm.observability.memory import out_of_memory

        run = self.train("watching", 2, "train.profile_steps=[2, 3]", "train.memory_snapshot_steps=[2, 3]")
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        split = [r for r in rows if "time/forward_backward" in r]
        self.check("time-split", bool(split) and all(r["time/forward_backward"] > 0 for r in split),
                   f"{len(split)} windows; the last: " + ", ".join(f"{k[5:]} {v:.0%}" for k, v in split[-1].items()
                                                                   if k.startswith("time/")))  # fmt: skip
        trace = run / "profile" / "rank0.steps_2-3.pt.trace.json"
        names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]} if trace.is_file() else set()
        wanted = {"dist_clm/forward", "dist_clm/backward", "dist_clm/optimizer_step", "dist_clm/step_2"}
        self.check("profile", wanted <= names, f"{trace.name}: {sorted(wanted - names) or 'every range'}")
        if self.cpu:
            return
        snapshot = run / "memory" / "rank0.steps_2-3.pickle"
        traces = pickle.loads(snapshot.read_bytes()).get("device_traces", []) if snapshot.is_file() else []
        self.check("memory-snapshot", bool(traces and traces[0]), f"{snapshot.name}: {len(traces[0]) if traces else 0} "
                   "allocator events")  # fmt: skip
        folder = run / "collectives"
        self.check(
            "flight-recorder",
            folder.is_dir() and os.environ.get("TORCH_NCCL_DUMP_ON_TIMEOUT") == "1",
            f"{folder}, TORCH_NCCL_TRACE_BUFFER_SIZE={os.environ.get('TORCH_NCCL_TRACE_BUFFER_SIZE')}",
        )
        try:
            torch.empty(torch.cuda.get_device_properties(0).total_memory * 2, dtype=torch.uint8, device="cuda")
            self.check("out-of-memory", False, "a tensor twice the GPU's memory was allocated")
        except torch.OutOfMemoryError:
            sentence = str(out_of_memory(run, 0, 1, "cuda:0"))
            ok = (run / "memory" / "rank0.oom-step-1.pickle").is_file() and "ran out of GPU memory" in sentence
            self.check("out-of-memory", ok, sentence[:300])

    def loss_head_time(self) -> None:
        """The fused loss head's forward + backward against the plain head's, at GPT-2 124M's size."""
        import torch

        from dist_clm.models.loss_head import causal_lm_loss

        if self.cpu:  # (the size is a GPU's; on the CPU a small one)
            tokens, width, vocab = 2 * 256, 128, 4096
        else:
            tokens, width, vocab = 32 * 1024, 768, 50257
        torch.manual_seed(0)
        hidden = torch.randn(1, tokens, width, device=self.device, dtype=torch.bfloat16, requires_grad=True)
        weight = (0.02 * torch.randn(vocab, width, device=self.device)).to(torch.bfloat16).requires_grad_()
        labels = torch.randint(0, vocab, (1, tokens), device=self.device)

        def plain():
            logits = hidden @ weight.T
            return torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:])

        def fused():
            return causal_lm_loss(hidden, weight, labels)

        times = {}
        for name, head in (("plain", plain), ("fused", fused)):
            for i in range(4):  # one warm-up, then the best of three
                if not self.cpu:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                head().backward()
                if not self.cpu:
                    torch.cuda.synchronize()
                if i:
                    times[name] = min(times.get(name, 1e9), time.perf_counter() - t)
        ratio = times["fused"] / times["plain"]
        bound = " (the CPU: reported, the 1.5x bound is a GPU's)" if self.cpu else ""
        fused, plain = times["fused"] * 1e3, times["plain"] * 1e3
        detail = f"{fused:.1f} ms vs plain {plain:.1f} ms ({ratio:.2f}x), forward + backward, {tokens} tokens{bound}"
        self.check("fused loss head step time", ratio <= 1.5 or self.cpu, detail)
