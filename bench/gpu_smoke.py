"""The correctness smoke of one device (bench/gpu_suite.sh runs it before the throughput table): dist_clm's own
commands, as a user runs them, on the `tiny` preset and the benchmark's prepared data.

    zero2 straight    `dist-clm train` bf16 ZeRO-2, 6 steps, a checkpoint at 3 (train.compile as by default:
                      on a GPU, compiled)
    zero2 resumed     a copy of it cut back to its checkpoint at 3 and resumed to 6: losses of steps 4-6 equal
                      the straight run's
    zero2 eager       the straight run with train.compile=false: losses equal the compiled run's
    zero3 resumed     the same two runs in ZeRO-3
    export            `dist-clm export` of the ZeRO-3 run: `dist-clm eval` of the export (transformers'
                      AutoModelForCausalLM.from_pretrained) equals that of the checkpoint, and transformers'
                      pipeline("text-generation") generates from it
    eval, generate    `dist-clm eval` and `dist-clm generate` of the ZeRO-3 checkpoint, run in this process
                      (dist_clm.cli.main), outside a launcher: they run on the GPU (its memory was used)
    zero3 + act. ckpt ZeRO-3, activation checkpointing and the default train.compile (configs/llama-1b.yaml's
                      combination): losses equal the same run eager
    moe, muon         (on a GPU; the CPU tests cover both) the tiny-moe preset resumed as zero3 resumed, and
                      train.optimizer=muon on ZeRO-2 resumed as zero2 resumed
    document masks    tiny GPT-2 and tiny Llama in bf16, a micro batch of 4 rows of packed documents (rows that
                      begin inside a document too): the logits of every attention path a run may pick
                      (flex_attention; flash_attention_2 where flash_attn is installed, fed the documents' bounds
                      as in training) equal SDPA's with the dense document mask (and flash attention without
                      the bounds does not: it would attend across documents)
    loss head         the fused loss head's forward + backward against the plain head's (logits, then
                      cross-entropy) at GPT-2 124M's size (32 x 1024 tokens, 768 wide, 50257 words, bf16): its time
                      is at most 1.5x the plain head's (its weight gradient runs on bf16 tensor cores)

"Equal" is to --rtol (relative, default 2e-2 on a GPU: bf16, and kernels whose reductions are not ordered the
same from run to run, such as the embedding's backward; on the CPU the resumed losses are bitwise equal and
the tolerance is 1e-6). Prints one line per check and a table; --json writes the results. Exit status 1 when
any check fails.

    python bench/gpu_smoke.py [--cpu [--quick]] [--data DIR] [--work DIR] [--json FILE] [--markdown] [--rtol R]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gpu_throughput import ROOT, TOKENIZER_VOCAB, child_env, prepared
from tables import render

STEPS, CUT = 6, 3


def dist_clm(work: Path, cpu: bool, *args: str) -> subprocess.CompletedProcess:
    env = child_env(work) | ({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})
    return subprocess.run([sys.executable, "-m", "dist_clm", *args], env=env, capture_output=True, text=True)


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def close(a: list[float], b: list[float], rtol: float) -> tuple[bool, float]:
    worst = max((abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True)), default=0.0)
    return len(a) == len(b) and worst <= rtol, worst


class Smoke:
    def __init__(self, args: argparse.Namespace, data: Path):
        self.args, self.data, self.results = args, data, []

    def train(self, name: str, zero: int, *extra: str) -> Path | None:
        run = Path(self.args.work) / "smoke" / name
        r = dist_clm(Path(self.args.work), self.args.cpu, "train", "model.preset=tiny", f"data.path={self.data}",
                     f"run.dir={run}", "data.block_size=128", "train.micro_batch_size=8", "train.precision=bf16",
                     f"distributed.zero_stage={zero}", f"train.max_steps={STEPS}", f"checkpoint.save_every={CUT}",
                     "checkpoint.keep_last=4", "optim.warmup_steps=2", "train.log_every=1", "train.eval_every=0",
                     "train.eval_blocks=2", "run.tensorboard=false", "run.progress_bar=false", *extra)  # fmt: skip
        if r.returncode != 0:
            self.check(f"{name} trains", False, (r.stderr.strip().splitlines() or ["no output"])[-1][:200])
            return None
        return run

    def check(self, name: str, ok: bool, detail: str) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", file=sys.stderr, flush=True)
        self.results.append({"check": name, "ok": ok, "detail": detail})

    def resume(self, zero: int, what: str = "", *extra: str) -> Path | None:
        """A straight run of one ZeRO stage (`extra` settings, named `what`), then a copy of it cut back to its
        checkpoint at step CUT and resumed from there (as after a preemption); the straight run's directory."""
        prefix = f"{what.strip().lower()}_" if what else ""
        straight = self.train(f"{prefix}zero{zero}_straight", zero, *extra)
        if straight is None:
            return None
        cut = straight.with_name(f"{prefix}zero{zero}_resumed")
        shutil.copytree(straight, cut)
        for late in (cut / "checkpoints").glob("step_*"):
            if int(late.name.split("_")[1]) > CUT:
                shutil.rmtree(late)
        (cut / "metrics.jsonl").write_text("")
        again = self.train(cut.name, zero, *extra)
        if again is None:
            return None
        a, b = losses(straight), losses(again)
        later = range(CUT + 1, STEPS + 1)
        ok, worst = close([b.get(s, float("nan")) for s in later], [a[s] for s in later], self.args.rtol)
        self.check(f"{what}ZeRO-{zero} bf16 resumed at step {CUT} continues as the straight run", ok and sorted(b) ==
                   list(later), f"steps {CUT + 1}-{STEPS}: max relative difference {worst:.2e}")  # fmt: skip
        return straight

    def compiled_equals_eager(self, compiled: Path) -> None:
        if self.args.cpu:  # (train.compile=auto compiles on GPUs only: here the default run is the eager run)
            self.check("default train.compile equals eager", True, "on the CPU the default does not compile: the "
                       "default run is the eager run, nothing to compare")  # fmt: skip
            return
        eager = self.train("zero2_eager", 2, "train.compile=false")
        if eager is None:
            return
        a, b = losses(compiled), losses(eager)
        ok, worst = close([a[s] for s in sorted(a)], [b[s] for s in sorted(a)], self.args.rtol)
        mode = "both eager on the CPU" if self.args.cpu else "compiled vs eager"
        self.check("default train.compile equals eager", ok, f"{len(a)} steps ({mode}): max relative difference "
                   f"{worst:.2e}")  # fmt: skip

    def export_loads(self, run: Path) -> None:
        work = Path(self.args.work)
        out = work / "smoke" / "export"
        shutil.rmtree(out, ignore_errors=True)
        r = dist_clm(work, self.args.cpu, "export", str(run), "--out", str(out))
        if r.returncode != 0:
            self.check("export", False, (r.stderr.strip().splitlines() or ["no output"])[-1][:200])
            return
        args = ("--data", str(self.data), "--max-blocks", "2", "--block-size", "128", "--json")
        evals = [dist_clm(work, self.args.cpu, "eval", str(x), *args)
                 for x in (run, out)]  # the checkpoint, and the export through AutoModelForCausalLM  # fmt: skip
        code = (
            "import sys\nfrom transformers import pipeline\n"
            "print(pipeline('text-generation', model=sys.argv[1])('def ', max_new_tokens=8)[0]['generated_text'])"
        )
        env = child_env(work) | ({"CUDA_VISIBLE_DEVICES": ""} if self.args.cpu else {})
        gen = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True)
        failed = [x for x in (*evals, gen) if x.returncode != 0]
        if failed:
            last = (failed[0].stderr.strip().splitlines() or ["no output"])[-1]
            self.check("export loads in transformers", False, last[:200])
            return
        ours, theirs = (json.loads(x.stdout.strip().splitlines()[-1])["loss"] for x in evals)
        ok, worst = close([theirs], [ours], self.args.rtol)
        self.check("export loads in transformers", ok, f"validation loss {theirs:.4f} (export) vs {ours:.4f} "
                   f"(checkpoint); pipeline generated {gen.stdout.strip()[:40]!r}")  # fmt: skip

    def inference_on_device(self, run: Path) -> None:
        """`dist-clm eval` and `dist-clm generate` in this process, as a user runs them outside a launcher."""
        import contextlib
        import io

        import torch

        from dist_clm.cli import main as cli

        checkpoint = str(sorted((run / "checkpoints").glob("step_*"))[-1])
        device = "cpu" if self.args.cpu else "cuda"
        commands = {
            "eval": ["eval", checkpoint, "--data", str(self.data), "--max-blocks", "2", "--json"],
            "generate": ["generate", checkpoint, "--prompt", "def ", "--max-new-tokens", "8"],
        }
        for name, args in commands.items():
            if not self.args.cpu:
                torch.cuda.reset_peak_memory_stats()
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = cli(args)
            used = self.args.cpu or torch.cuda.max_memory_allocated() > 0
            said = out.getvalue().strip()[-60:]
            where = "the CPU run" if self.args.cpu else "GPU memory used" if used else "no GPU memory used"
            self.check(f"{name} runs on the {device}", code == 0 and used, f"exit {code}; {where}; {said!r}")

    def checkpointing_compiled(self, zero3: Path | None) -> None:
        """ZeRO-3 + activation checkpointing + the default train.compile, against the same run eager (on the CPU,
        where the default is eager: against the ZeRO-3 run without activation checkpointing)."""
        if self.args.cpu:
            runs = [self.train("zero3_ckpt", 3, "train.activation_checkpointing=true"), zero3]
        else:
            named = (("zero3_ckpt", ()), ("zero3_ckpt_eager", ("train.compile=false",)))
            runs = [self.train(name, 3, "train.activation_checkpointing=true", *extra) for name, extra in named]
        if None in runs:
            return
        a, b = losses(runs[0]), losses(runs[1])
        ok, worst = close([a[s] for s in sorted(a)], [b[s] for s in sorted(a)], self.args.rtol)
        against = "the same run without it (eager: the CPU)" if self.args.cpu else "eager"
        self.check("ZeRO-3 + activation checkpointing + default compile equals eager", ok,
                   f"{len(a)} steps, against {against}: max relative difference {worst:.2e}")  # fmt: skip

    def document_masks(self) -> None:
        """The logits of each attention path a document-masked run may pick, micro batch 4, against SDPA's."""
        import importlib.util

        import torch

        from dist_clm.models.attention import FLASH, build_model_with, feed_documents

        class Vocabulary:
            bos_token_id, eos_token_id = 0, 1

            def __len__(self):
                return 512

        device = "cpu" if self.args.cpu else "cuda"
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
                model = model.to(device, torch.bfloat16).eval()
                with torch.no_grad():
                    if attn == FLASH:  # what flash attention does without the bounds: the defect, for contrast
                        out["flash, no bounds"] = model(input_ids=ids.to(device), position_ids=positions.to(device),
                                                        use_cache=False).logits.float()  # fmt: skip
                        feed_documents(model)
                    out[attn] = model(input_ids=ids.to(device), position_ids=positions.to(device),
                                      use_cache=False).logits.float()  # fmt: skip
            for attn in paths:
                if attn not in out:
                    continue
                worst = float((out[attn] - out["sdpa"]).abs().max())
                detail = f"max |logit difference| to SDPA with the dense mask {worst:.3g} (bf16)"
                if attn == FLASH:
                    detail += f"; without the bounds {float((out['flash, no bounds'] - out['sdpa']).abs().max()):.3g}"
                self.check(f"{preset} {attn} keeps documents apart (micro batch 4)", worst < 0.05, detail)

    def loss_head_time(self) -> None:
        """The fused loss head's forward + backward against the plain head's, at GPT-2 124M's size."""
        import torch

        from dist_clm.models.loss_head import causal_lm_loss

        if self.args.cpu:  # (the size is a GPU's; on the CPU a small one)
            tokens, width, vocab, device = 2 * 256, 128, 4096, "cpu"
        else:
            tokens, width, vocab, device = 32 * 1024, 768, 50257, "cuda"
        torch.manual_seed(0)
        hidden = torch.randn(1, tokens, width, device=device, dtype=torch.bfloat16, requires_grad=True)
        weight = (0.02 * torch.randn(vocab, width, device=device)).to(torch.bfloat16).requires_grad_()
        labels = torch.randint(0, vocab, (1, tokens), device=device)

        def plain():
            logits = hidden @ weight.T
            return torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:])

        def fused():
            return causal_lm_loss(hidden, weight, labels)

        times = {}
        for name, head in (("plain", plain), ("fused", fused)):
            for i in range(4):  # one warm-up, then the best of three
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                head().backward()
                if device == "cuda":
                    torch.cuda.synchronize()
                if i:
                    times[name] = min(times.get(name, 1e9), time.perf_counter() - t)
        ratio = times["fused"] / times["plain"]
        bound = " (the CPU: reported, the 1.5x bound is a GPU's)" if self.args.cpu else ""
        fused, plain = times["fused"] * 1e3, times["plain"] * 1e3
        detail = f"{fused:.1f} ms vs plain {plain:.1f} ms ({ratio:.2f}x), forward + backward, {tokens} tokens{bound}"
        self.check("fused loss head step time", ratio <= 1.5 or self.args.cpu, detail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="on the CPU (default without CUDA)")
    ap.add_argument("--work", default="/tmp/dist_clm_gpu_smoke")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--rtol", type=float, default=None)
    ap.add_argument("--data", default=None, help="a directory `dist-clm prepare` wrote, instead of the benchmark's "
                    "stdlib corpus (prepared once under --work)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="the CPU only: every kind of check once (ZeRO-2; export, "
                    "eval and generate of the ZeRO-2 run), without the ZeRO-3 runs")  # fmt: skip
    args = ap.parse_args()
    import torch

    args.cpu = args.cpu or not torch.cuda.is_available()
    if args.quick and not args.cpu:
        raise SystemExit("--quick is for the CPU (a GPU runs every check)")
    args.rtol = args.rtol if args.rtol is not None else (1e-6 if args.cpu else 2e-2)
    work = Path(args.work)
    shutil.rmtree(work / "smoke", ignore_errors=True)
    start = time.perf_counter()
    data = Path(args.data) if args.data else prepared(work, TOKENIZER_VOCAB["cpu" if args.cpu else "gpu"])
    smoke = Smoke(args, data)
    zero2 = smoke.resume(2)
    if zero2 is not None:
        smoke.compiled_equals_eager(zero2)
    zero3 = smoke.resume(3) if not args.quick else zero2
    if zero3 is not None:
        smoke.export_loads(zero3)
        smoke.inference_on_device(zero3)
    if not args.quick:
        smoke.checkpointing_compiled(zero3)
    if not args.cpu:
        smoke.resume(3, "MoE ", "model.preset=tiny-moe")
        smoke.resume(2, "Muon ", "train.optimizer=muon", "optim.grad_clip=0")
    smoke.document_masks()
    smoke.loss_head_time()
    rows = [[r["check"], "ok" if r["ok"] else "FAILED", r["detail"]] for r in smoke.results]
    print(render(["check", "result", "detail"], rows, args.markdown))
    print(f"\n{'CPU' if args.cpu else torch.cuda.get_device_name(0)}; {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(smoke.results, indent=2))
    sys.exit(0 if smoke.results and all(r["ok"] for r in smoke.results) else 1)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
