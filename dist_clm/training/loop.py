"""The training loop, read top to bottom: set up -> resume -> validate -> loop -> finish.

train() brings up the process group and turns a failed collective (a rank died, stalled past
distributed.collective_timeout_s, or lost its network) into one sentence naming who stopped, on every surviving
rank, with exit 75 (rerun / requeue resumes from the last checkpoint); the story itself is in _train().

setup(cfg, env) -> Run              sources, tokenizer, model, the parts resumed, DeepSpeed engine (setup.py)
Checkpointer                        choose / save / load the parts and the engine (checkpointing/checkpointer.py)
train_step(...) -> StepResult       micro batches, the one agreement, the guard, backward, update (step.py)
LogWindow                           the logged training scalars of a window of steps (observability/metrics.py)
Validation                          perplexity on every source's validation split; held-out pairs (below)
rollback(...)                       back to the last checkpoint, past the data that diverged (below)
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_clm import console
from dist_clm.config import Config
from dist_clm.data.loader import TrainLoader
from dist_clm.data.reference_store import load_values
from dist_clm.data.stream import TokenStream
from dist_clm.errors import PeerLost, UserError, agreed
from dist_clm.evaluation.downstream import InLoop
from dist_clm.evaluation.perplexity import perplexity, windows
from dist_clm.observability.memory import MemoryRecorder, out_of_memory
from dist_clm.observability.metrics import LogWindow, Metrics, loss_text
from dist_clm.observability.timing import Phases, StepProfiler, stall_note
from dist_clm.parallel import collectives, process_group
from dist_clm.parallel.engine import learning_rates
from dist_clm.parallel.heartbeat import Heartbeat
from dist_clm.training import incidents, preference, status
from dist_clm.training.objectives import Preference
from dist_clm.training.preemption import SIGNALS, StopRequest, watch_launcher
from dist_clm.training.preflight import preflight
from dist_clm.training.setup import Progress, Run, setup
from dist_clm.training.stability import LossInjector, Trouble
from dist_clm.training.step import StepResult, train_step


@dataclass
class TrainResult:
    step: int  # the last step taken
    tokens_seen: int
    val_before: dict  # validation loss, perplexity and tokens before the first step of this process
    val_after: dict | None  # the same after the last step (None when preempted)
    preempted: str | None  # the stop signal's name when a signal ended the run early


def train(
    cfg: Config,
    stop_signals: tuple[signal.Signals, ...] = SIGNALS,
    on_step: Callable[[Progress, StepResult], None] | None = None,
) -> TrainResult:
    """Train per `cfg`, resuming from the run directory's latest complete checkpoint. Any of `stop_signals`
    on any rank: every rank saves a checkpoint at the next step boundary and returns. `on_step` is called on
    every rank after every step (the throughput benchmark times the loop with it)."""
    preflight(cfg, *process_group.launched_world())  # (mistakes first, before the process group and the model)
    env = process_group.init(cfg.run.dir)  # (on GPUs with NCCL's flight recorder writing into RUN/collectives/)
    console.bind(env.rank, env.world_size, env.node, cfg.run.dir)
    heartbeat = Heartbeat(env)
    attempt: dict = {}  # {"run": Run} once set up: this process holds the run directory (rank 0: its lock)
    try:
        result = _train(cfg, env, stop_signals, on_step, attempt)
    except torch.OutOfMemoryError:  # (a RuntimeError: before the collective failures)
        if "run" not in attempt:
            raise
        run = attempt["run"]
        error = out_of_memory(Path(cfg.run.dir), env.rank, run.progress.step + 1, env.device, run.engine.module,
                              run.engine.optimizer)  # fmt: skip
        ended(attempt, env, "stopped", str(error))
        raise error from None
    except RuntimeError as e:
        if env.world_size == 1 or not collectives.is_collective_failure(e):
            raise
        who = heartbeat.laggards()
        on_gpu = env.device.startswith("cuda")  # (NCCL dumps its recorder itself; gloo's: this rank dumps it)
        waiting = "" if on_gpu else collectives.dump_collectives(cfg.run.dir, env.rank)
        lost = PeerLost(
            f"rank {env.rank} (node {env.node}) lost the other ranks in a collective "
            f"({collectives.failure_reason(e, cfg.distributed.collective_timeout_s)})"
            + (f": {who}" if who else "")
            + collectives.traces_note(cfg.run.dir, on_gpu, waiting)
            + "; every rank stops; rerun the same command (a SLURM job requeues itself) to resume from the last "
            "complete checkpoint."
        )
        ended(attempt, env, "stopped", str(lost))
        raise lost from None
    except UserError as e:
        ended(attempt, env, "stopped", str(e))
        raise
    finally:
        heartbeat.stop()
        for recorder in attempt.get("recorders", ()):  # (one still recording when an error ended the run: its
            recorder.close(attempt["run"].progress.step)  # file written, and no profiler left running at exit)
    return result


def ended(attempt: dict, env: process_group.DistEnv, outcome: str, sentence: str) -> None:
    """Rank 0 of an attempt that held the run directory records how it ended (RUN/end.json, `dist-clm status`); an
    attempt refused before that (another run holds the directory) writes nothing there."""
    if env.is_main and "run" in attempt:
        run = attempt["run"]
        status.record_end(run.cfg.run.dir, outcome, run.progress.step, sentence)


def _train(cfg: Config, env: process_group.DistEnv, stop_signals, on_step, attempt: dict) -> TrainResult:
    """The story: set up and resume, validate, then step / log / roll back / validate / save until the end or a
    stop signal, and validate once more."""
    stop = StopRequest(stop_signals)  # e.g. SIGTERM: checkpoint at the next step boundary, then stop
    watch_launcher(stop)
    inject = LossInjector(env.rank, cfg.stability.fault_injection)
    world = process_group.world_table(env)  # every rank's node and local rank, checked
    run = attempt["run"] = setup(cfg, env, world)  # (rank 0 now holds the run directory's lock; the parts continue
    # a checkpoint)
    cfg = run.cfg  # (settled from the data)
    t, faults, save_every = cfg.train, cfg.stability.fault_injection, cfg.checkpoint.save_every
    timeout = cfg.distributed.collective_timeout_s
    progress, checkpointer, guard = run.progress, run.checkpointer, run.guard
    if run.resumed_from:
        console.info(f"resumed from {run.resumed_from} at step {progress.step}")
    metrics = Metrics(Path(cfg.run.dir), env.is_main, settings=cfg.run, config=cfg.to_dict())
    if faults:
        console.warning(f"fault injection is on (stability.fault_injection={faults!r}): losses will be altered on "
                        "purpose", every_rank=False)  # fmt: skip
        metrics.log(progress.step, {"faults/planned": len(faults.split(","))})
    validate = Validation(run, metrics)
    downstream = InLoop(run, metrics)
    announce_compiling(run)
    started = time.perf_counter()  # (the first validation and step compile the model under torch.compile)
    before = validate(progress.step)

    phases = Phases(env.device)  # where each rank's steps spend their time (the log window's time/ scalars)
    profiler = StepProfiler(t.profile_steps, t.profile_ranks, env.rank, Path(cfg.run.dir), phases)
    memory = MemoryRecorder(t.memory_snapshot_steps, t.profile_ranks, env.rank, Path(cfg.run.dir), env.device)
    attempt["recorders"] = (profiler, memory)
    if t.memory_snapshot_steps and not env.device.startswith("cuda"):
        console.warning("train.memory_snapshot_steps records the CUDA allocator: on the CPU there is none to "
                        "record; the run goes on without snapshots.", every_rank=False)  # fmt: skip
    window = LogWindow(run.source_names, run.tokens_per_step, run.flops_per_token, env.world_size, env.device,
                       run.precision, t.tf32, run.objective, run.router, phases, env.rank)  # fmt: skip
    loader = run.loader()
    batches = iter(loader)
    bar = progress_bar(t.max_steps, progress.step, env.is_main and cfg.run.progress_bar)
    rollbacks, preempted, first_step, stage = 0, None, progress.step + 1, None
    while progress.step < t.max_steps:
        stage = announce_stage(loader, metrics, progress.step + 1, stage)
        tokens = run.tokens_per_step  # (this step's: its stage's block size)
        profiler.before(progress.step + 1)
        memory.before(progress.step + 1)
        result = train_step(run, batches, progress.step + 1, stop, guard, inject, phases)
        loader.step_done()  # (the data position moves on)
        progress.advance(tokens)
        if progress.step == first_step:  # compiled and warmed up: from now on a stalled rank is not waited for long
            collectives.set_collective_timeout(timeout)
            report_first_step(run, metrics, progress.step, time.perf_counter() - started)
        window.add(result.loss, result.good, result.data_wait_s, result.blocks_per_source, result.arrivals,
                   result.token_sum, result.stats, tokens)  # fmt: skip
        if progress.step == first_step:
            console.rate_from_now(bar, done=1)  # the time left from steady steps, not from the first one's compile
        else:
            bar.update(1)
        if on_step:
            on_step(progress, result)
        if result.injected:
            metrics.log(progress.step, {"faults/injected": result.injected})
        if result.skipped:
            report_skip(result, metrics, progress.step)
        if result.skipped or result.trouble:  # (before a rollback: the weights the step ran with)
            with collectives.long_collectives(timeout):  # (rank 0 writes the file while the others wait)
                found = incidents.record(run, loader.blocks, progress.step, result.skipped or result.trouble.reason)
            if found:
                console.info(f"step {progress.step}: its documents and their losses under its weights are in {found}")
        if progress.step % t.log_every == 0 or progress.step == t.max_steps or result.trouble:
            scalars = window.emit(
                **learning_rates(run.scheduler),
                grad_norm=result.grad_norm if result.skipped else float(run.engine.get_global_grad_norm() or 0.0),
                tokens_seen=progress.tokens_seen,
                skipped_steps=guard.skipped,
            )
            metrics.log(progress.step, scalars)
            bar.set_postfix(loss=loss_text(scalars.get("train/loss", math.nan)), **stall_note(scalars))
            if window.persistent_straggler is not None:
                report_straggler(window.persistent_straggler, scalars, world, progress.step)
        if result.trouble:
            loader.close()  # the old loader's workers stop (a new one starts where the position then stands)
            with collectives.long_collectives(timeout):  # a load may be slow on one rank
                rollbacks += rollback(run, result.trouble, rollbacks + 1)
            metrics.log(progress.step, {"train/rollbacks": rollbacks})
            loader = run.loader()
            batches = iter(loader)
            bar.reset(total=t.max_steps)
            console.rate_from_now(bar, done=progress.step)  # (back at the checkpoint's step: not a rate)
            continue
        if t.eval_every and progress.step % t.eval_every == 0 and progress.step < t.max_steps:
            with phases.range("validation"):
                validate(progress.step)
        if downstream.due(progress.step) and progress.step < t.max_steps:
            with phases.range("downstream_tasks"):
                downstream(progress.step)
        preempted = result.stop_signal
        last = progress.step == t.max_steps or preempted  # (a save that ends the run waits for its files)
        if (save_every and progress.step % save_every == 0) or last:
            with collectives.long_collectives(timeout), phases.range("checkpoint"):  # a save may be slow on one rank
                checkpointer.save(run.engine, progress.step, run.parts, run.random, run.engine.module.config,
                                  wait=last)  # fmt: skip
        for report in checkpointer.poll():  # a background save completes at the first step boundary after
            metrics.log(progress.step, report)  # its files are durable
        profiler.after(progress.step)
        memory.after(progress.step)
        if preempted:
            console.info(f"stopping at step {progress.step} on signal {signal.Signals(preempted).name}; "
                "checkpoint saved")  # fmt: skip
            break

    profiler.close(progress.step)  # (a profile still recording: the run ended before its last step)
    memory.close(progress.step)
    bar.close()
    loader.close()
    stop.restore()
    after = None if preempted else validate(progress.step)
    if not preempted:
        downstream(progress.step)
    metrics.close()
    name = signal.Signals(preempted).name if preempted else None
    ended(attempt, env, "preempted" if preempted else "finished", name or "")  # (while it holds the directory)
    run.owner.release()
    return TrainResult(progress.step, progress.tokens_seen, before, after, name)


def announce_stage(loader: TrainLoader, metrics: Metrics, step: int, current: int | None) -> int:
    """With data.stages: when step `step` trains in another stage than the step before, say so with the stage's
    exact share of blocks per source, and log data/stage and data/stage_share/NAME at that step."""
    j = loader.stage(loader.position.blocks_consumed)
    if j != current and len(loader.stages) > 1:
        console.info(f"step {step}: {loader.describe_stage(j)}")
        metrics.log(step, {"data/stage": j + 1} | {f"data/stage_share/{n}": s for n, s in loader.stage_shares(j)})
    return j


def compiling(run: Run) -> tuple[str, list[str]]:
    """(when, what) torch.compile compiles before training runs at its pace: the model (train.compile) and
    FlexAttention's kernel in the first validation and step, DeepSpeed's Muon update in the first step."""
    attention = getattr(getattr(run.engine.module, "config", None), "_attn_implementation", "")
    whole = ["the model"] * run.compiled + ["FlexAttention's kernel"] * (attention == "flex_attention")
    what = whole + ["Muon's update"] * (run.cfg.train.optimizer == "muon")
    return ("the first validation and step compile" if whole else "the first step compiles"), what


def announce_compiling(run: Run) -> None:
    """Once, before they start: what the first validation and step compile (tens of seconds on a CPU, minutes
    for a large model), and that the time left counts from the steps after them."""
    when, what = compiling(run)
    if what:
        console.info(f"{when} {' and '.join(what)} with torch.compile, which takes a while; the time left counts "
                     "from the steps after")  # fmt: skip


def report_first_step(run: Run, metrics: Metrics, step: int, seconds: float) -> None:
    """Once: the seconds of this process's first validation and step (train/first_step_s); where they compile
    (announce_compiling), said too."""
    metrics.log(step, {"train/first_step_s": seconds})
    if compiling(run)[1]:
        console.info(f"the first validation and step took {seconds:.1f} s, torch.compile's compilation "
            "included")  # fmt: skip


def report_straggler(rank: int, scalars: dict, world: list[dict], step: int) -> None:
    """Say which rank has been the slowest by STRAGGLER_LAG x the median rank, two log windows in a row."""
    lag = scalars["train/straggler_lag"]
    console.info(f"step {step}: rank {rank} (node {world[rank]['node']}) is a straggler: it reaches each step's "
        f"agreement {lag:.2f}x later than the median rank (two log windows in a row)")  # fmt: skip


def report_skip(result: StepResult, metrics: Metrics, step: int) -> None:
    """A step whose update was not applied: why, and its real gradient norm (console, and train/skip_reason)."""
    norm = f"; its gradient norm {result.grad_norm:.4g}" if result.grad_norm is not None else ""
    console.info(f"step {step}: update not applied ({result.skipped}{norm})")
    metrics.note(step, "train/skip_reason", result.skipped + norm)


def rollback(run: Run, trouble: Trouble, rollbacks: int) -> int:
    """Collective: back to the last complete checkpoint in the live engine and parts, with the data position
    moved past the window [checkpoint's position, now) that led to the trouble; the window is recorded in
    RUN/skips.json so that a resume from that checkpoint skips it too. The step count is the checkpoint's again.
    A spike with no checkpoint yet: the run goes on where it is (the spike's update was not applied), unless it
    is one of stability.max_bad_steps bad steps in a row. Returns the rollbacks made (1 or 0)."""
    t, guard, progress, position = run.cfg.stability, run.guard, run.progress, run.position
    reason, step, now = trouble.reason, progress.step, position.blocks_consumed
    tag_dir = run.checkpointer.choose() if rollbacks <= t.max_rollbacks else None
    if tag_dir is None and rollbacks <= t.max_rollbacks and trouble.spike:
        if not t.max_bad_steps or guard.bad_in_a_row < t.max_bad_steps:
            console.info(f"step {step}: {reason}; no checkpoint to roll back to yet: training goes on "
                "without that step's update")  # fmt: skip
            return 0
        reason = f"{guard.bad_in_a_row} bad steps in a row, the last: {reason}"
    if tag_dir is None:
        raise agreed(UserError(
            f"training diverged at step {step} ({reason}) and "
            + ("there is no checkpoint to roll back to" if rollbacks <= t.max_rollbacks else
               f"{t.max_rollbacks} rollbacks did not help")
            + "; lower optim.lr, raise optim.warmup_steps or check the data, then rerun."
        ))  # fmt: skip
    run.checkpointer.load_parts(tag_dir, run.parts)  # (the same training: no part refuses)
    run.checkpointer.load_engine(run.engine, tag_dir, run.random)
    guard.reset()
    skip_from, skip_to = position.skip_to(now, step, reason)
    console.info(
        f"step {step}: {reason}; rolled back to step {progress.step} and skipped training blocks "
        f"[{skip_from}, {skip_to}) (recorded in {position.skips})",
    )
    return 1


class Validation:
    """Every source's validation split, the same first `train.eval_blocks` blocks each time; the preference
    objectives validate on held-out pairs instead (HeldOutPairs), and on any other (evaluation-only) source as
    below, per source. Perplexity: val/loss is over all the sources, token-weighted, in blocks of the length the
    run trains at now (val/tokens, val/block_size say what it was computed on). When data.stages change the block
    size, every length is evaluated too (val/at_LENGTH/loss, /perplexity). Collective; whole blocks on every rank
    (sequence parallelism splits the training passes only: a forward pass without gradients holds no
    activations)."""

    def __init__(self, run: Run, metrics: Metrics):
        self.run, self.metrics, self.lengths = run, metrics, run.position.block_sizes
        paired = [s for s in run.sources if s.manifest.get("fine_tuning", {}).get("pairs")]
        self.pairs = HeldOutPairs(run, paired[0]) if isinstance(run.objective, Preference) and paired else None
        self.splits = {s.name: TokenStream(s.path, "val", s.manifest) for s in run.sources
                       if self.pairs is None or s is not paired[0]}  # fmt: skip
        self.windows = {(n, length): windows(v.tokens, length, 0, run.cfg.train.eval_blocks)
                        for n, v in self.splits.items() for length in self.lengths}  # fmt: skip

    def at(self, length: int) -> dict[str, dict]:
        rank, world, counts = self.run.eval_share
        return {
            name: perplexity(
                self.run.engine.module,
                split.reader(),
                self.windows[name, length],
                self.run.cfg.train.micro_batch_size,
                self.run.env.device,
                rank,
                world,
                counts=counts,
            )  # fmt: skip
            for name, split in self.splits.items()
        }

    def __call__(self, step: int) -> dict:
        if self.pairs is not None:
            return self.held_out(step)
        now = self.run.position.block_size_at()
        totals, scalars, line = {}, {}, ""
        for length in sorted(self.lengths, key=lambda n: n != now):  # (the length trained now first)
            results = self.at(length)
            nll = sum(r["loss"] * r["tokens"] for r in results.values())
            count = sum(r["tokens"] for r in results.values())
            total = totals[length] = {"loss": nll / count, "perplexity": math.exp(nll / count), "tokens": count}
            prefix = "val" if length == now else f"val/at_{length}"
            scalars |= {f"{prefix}/loss": total["loss"], f"{prefix}/perplexity": total["perplexity"]}
            if len(self.lengths) > 1:
                scalars |= {f"val/at_{length}/loss": total["loss"], f"val/at_{length}/perplexity": total["perplexity"]}
            if len(results) > 1 and length == now:
                for name, res in results.items():
                    scalars |= {f"val/{name}/loss": res["loss"], f"val/{name}/perplexity": res["perplexity"]}
            if length == now:
                scalars |= {"val/tokens": count, "val/block_size": length}
                line = (f"validation loss {loss_text(total['loss'])}, perplexity {total['perplexity']:.2f} ({count} "
                        f"tokens in blocks of {length})"
                        + "".join(f"; {name} {res['perplexity']:.2f}" for name, res in results.items()
                                  if len(results) > 1))  # fmt: skip
            if len(self.lengths) > 1:
                line += f"; in blocks of {length}: perplexity {total['perplexity']:.2f}"
        self.metrics.log(step, scalars)
        console.info(f"step {step}: {line}")
        return totals[now]

    def held_out(self, step: int) -> dict:
        """The preference objectives' validation: the held-out pairs, and any other source's perplexity."""
        scalars, line, totals = self.pairs()
        for name, res in self.at(self.run.position.block_size_at()).items():
            scalars |= {f"val/{name}/loss": res["loss"], f"val/{name}/perplexity": res["perplexity"],
                        f"val/{name}/tokens": res["tokens"]}  # fmt: skip
            line += f"; {name}: perplexity {res['perplexity']:.2f} ({res['tokens']} tokens)"
        self.metrics.log(step, scalars)
        console.info(f"step {step}: {line}")
        return totals


class HeldOutPairs:
    """DPO's and ORPO's validation, on the first `train.eval_blocks` blocks (whole pairs of blocks; 0: all) of the
    validation split of the source of pairs, with DPO's reference values for it: the pairs' objective
    (val/loss), how often and by how much the chosen answer's reward beats the rejected one's
    (val/reward_accuracy, val/reward_margin, val/rewards_chosen, val/rewards_rejected; ORPO: of log odds), over
    val/pairs pairs, and the perplexity of the chosen answers (val/chosen_perplexity, over val/chosen_tokens).
    Not the split's perplexity: that of the rejected answers is what the objective raises. The same figures on any
    number of ranks: the sums of whole pairs, each pair of blocks scored by one rank."""

    def __init__(self, run: Run, source):
        self.run, self.block = run, source.manifest["fine_tuning"]["block_size"]
        self.stream = TokenStream(source.path, "val", source.manifest)
        units, blocks = self.stream.tokens // (2 * self.block), run.cfg.train.eval_blocks
        self.units = min(units, (blocks + 1) // 2) if blocks else units
        self.reference = load_values(source.path, "val") if run.objective.name == "dpo" else None

    def __call__(self) -> tuple[dict, str, dict]:
        """(the scalars, the console's line, the figures train() returns)."""
        run, env = self.run, self.run.env
        sums = preference.held_out(run.engine.module, run.objective.measure, self.stream, self.reference, self.block,
                                   self.units, run.cfg.train.micro_batch_size // 2, env.device,
                                   *run.eval_share)  # fmt: skip
        stats, (loss, nll, tokens) = sums[: len(preference.STATS)], sums[len(preference.STATS) :]
        if (error := run.objective.flaw_error(stats)) is not None:
            raise agreed(error)  # (the same sums on every rank)
        pairs = int(stats[0])
        scalars = run.objective.scalars(stats, "val") | {"val/loss": loss / pairs, "val/pairs": pairs,
            "val/chosen_perplexity": math.exp(nll / tokens), "val/chosen_tokens": int(tokens),
            "val/block_size": self.block}  # fmt: skip
        totals = {"loss": scalars["val/loss"], "reward_accuracy": scalars["val/reward_accuracy"],
                  "reward_margin": scalars["val/reward_margin"], "pairs": pairs}  # fmt: skip
        line = (f"validation on {pairs} held-out pairs: reward accuracy {totals['reward_accuracy']:.3f}, reward "
                f"margin {totals['reward_margin']:.4g}, loss {loss_text(totals['loss'])}; perplexity of the chosen "
                f"answers {scalars['val/chosen_perplexity']:.2f} ({int(tokens)} tokens)")  # fmt: skip
        return scalars, line, totals


def progress_bar(total: int, done: int, enabled: bool):
    return console.progress(total=total, initial=done, unit="step", desc="train", enabled=enabled)
