"""The training loop: one function, read top to bottom.

setup (data, tokenizer, model, DeepSpeed engine) -> resume from the latest complete checkpoint ->
validate -> loop { micro batches -> engine.step -> log -> validate -> checkpoint } -> validate.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import torch

from dist_clm import checkpoint, distributed
from dist_clm.config import Config
from dist_clm.data.loader import TokenStream, TrainLoader
from dist_clm.data.provenance import check_sources, run_tokenizer, training_sources
from dist_clm.engine import (
    deepspeed_config,
    memory_scalars,
    param_groups,
    peak_flops,
    resolve_grad_accum,
    resolve_precision,
    scheduler_factory,
)
from dist_clm.errors import UserError
from dist_clm.evaluate import perplexity, windows
from dist_clm.metrics import Metrics, say
from dist_clm.model import build_model, count_params, flops_per_token, max_positions
from dist_clm.preemption import SIGNALS, StopRequest
from dist_clm.stability import LossGuard, LossInjector, agree, poison, step_zero0_fp32


def train(cfg: Config, stop_signals: tuple[signal.Signals, ...] = SIGNALS) -> dict:
    """Train per `cfg`; returns validation loss/perplexity before and after, the final step and tokens seen.
    Any of `stop_signals` on any rank: checkpoint at the next step, return with "preempted" set."""
    import deepspeed

    env = distributed.init()
    t, run_dir = cfg.train, Path(cfg.run.dir)

    # --- data, tokenizer, model: all checked before anything is written ---
    sources = training_sources(cfg)
    tok = run_tokenizer(sources)
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = build_model(cfg.model.preset, cfg.model.pretrained, cfg.model.overrides, tok)
    limit = max_positions(model.config)
    if limit is not None and cfg.data.block_size > limit:
        raise UserError(
            f"config key 'data.block_size' is {cfg.data.block_size}, more than the model's {limit} "
            "positions; lower data.block_size or raise the model's positions."
        )
    check_sources(sources, tok, model.config.vocab_size, cfg.model.pretrained)
    grad_accum = resolve_grad_accum(t, env.world_size)
    ds_config = deepspeed_config(cfg, on_gpu=env.device != "cpu", grad_accum=grad_accum)
    if t.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    precision = resolve_precision(t.precision, env.device != "cpu")
    n_params = count_params(model)
    flops = flops_per_token(model.config, n_params, cfg.data.block_size)
    say(
        env.is_main,
        f"model: {model.config.model_type}, {n_params / 1e6:.2f} M parameters, "
        f"{flops / 1e6:.1f} MFLOPs per token; "
        f"world size {env.world_size} on {env.device}, {precision}, "
        f"ZeRO-{t.zero_stage}",
    )
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
        if not (run_dir / "tokenizer").is_dir():
            tok.save_pretrained(str(run_dir / "tokenizer"))
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))

    # --- resume: engine, optimizer, schedule, step, tokens and the loader's position ---
    done = checkpoint.complete_checkpoints(run_dir) if t.resume else []
    if done and checkpoint.needs_universal(done[-1], env.world_size, t.zero_stage):
        ds_config["checkpoint"] = {"load_universal": True}  # another world size or stage (see restore below)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, t.weight_decay),
        config=ds_config,
        lr_scheduler=scheduler_factory(t),
    )
    if t.compile:
        engine.compile()

    def restore(tag_dir: Path) -> tuple[int, int, dict]:
        """Load a complete checkpoint into the engine; (step, tokens seen, loader state past skipped windows)."""
        elastic = checkpoint.needs_universal(tag_dir, env.world_size, t.zero_stage)
        # DeepSpeed reads this flag at every load_checkpoint; it has no public setter
        engine._config.load_universal_checkpoint = elastic
        where = checkpoint.universal(tag_dir, env.is_main) if elastic else tag_dir
        _, client = engine.load_checkpoint(str(where.parent), tag=where.name)
        if elastic and t.zero_stage == 3:
            say(
                env.is_main,
                "warning: DeepSpeed's universal checkpoint restores ZeRO-3 weights exactly, but the optimizer "
                "state is approximate (losses drift ~5e-4 relative from an uninterrupted run); data and step "
                "count continue exactly",
            )
        state = client["loader"]
        state["blocks_consumed"] = checkpoint.past_skipped(run_dir, state["blocks_consumed"])
        return client["step"], client["tokens_seen"], state

    def make_loader(state: dict | None) -> TrainLoader:
        return TrainLoader(
            sources,
            cfg.data.block_size,
            t.micro_batch_size,
            grad_accum,
            env.rank,
            env.world_size,
            cfg.data.shuffle,
            t.seed,
            cfg.data.num_workers,
            state,
            cfg.data.document_mask,
        )

    step, tokens_seen, loader_state = 0, 0, None
    if done:
        step, tokens_seen, loader_state = restore(done[-1])
        say(env.is_main, f"resumed from {done[-1]} at step {step}")
    loader = make_loader(loader_state)
    val_sets = {s.name: TokenStream(s.path, "val", s.manifest) for s in sources}
    val_windows = {name: windows(v.tokens, cfg.data.block_size, 0, t.eval_blocks) for name, v in val_sets.items()}
    metrics = Metrics(run_dir, env.is_main, cfg.run.tensorboard)

    def validate() -> dict:
        """Perplexity on each source's validation split; val/loss is over all of them, token-weighted."""
        results, nll, count = {}, 0.0, 0
        for name, v in val_sets.items():
            res = perplexity(
                engine.module, v.read, val_windows[name], t.micro_batch_size, env.device, env.rank, env.world_size
            )
            results[name] = res
            nll, count = nll + res["loss"] * res["tokens"], count + res["tokens"]
        total = {"loss": nll / count, "perplexity": math.exp(nll / count), "tokens": count}
        scalars = {"val/loss": total["loss"], "val/perplexity": total["perplexity"]}
        if len(results) > 1:
            for name, res in results.items():
                scalars |= {f"val/{name}/loss": res["loss"], f"val/{name}/perplexity": res["perplexity"]}
        metrics.log(step, scalars)
        say(
            env.is_main,
            f"step {step}: validation loss {total['loss']:.4f}, perplexity {total['perplexity']:.2f} "
            f"({count} tokens)"
            + "".join(f"; {name} {res['perplexity']:.2f}" for name, res in results.items() if len(results) > 1),
        )
        return total

    def save() -> None:
        client = {"step": step, "tokens_seen": tokens_seen, "loader": loader.state_dict()}
        checkpoint.save(engine, run_dir, step, client, model.config, t.keep_last, env.is_main)

    before = validate()
    tokens_per_step = loader.global_blocks_per_step * cfg.data.block_size
    batches = iter(loader)  # (draws a seed from torch's generator: before the restore below, as in the first run)
    if done and not checkpoint.needs_universal(done[-1], env.world_size, t.zero_stage):
        checkpoint.restore_rng(done[-1], env.rank)  # each rank continues its own random streams (dropout)
    from tqdm.auto import tqdm

    stop = StopRequest(stop_signals)  # e.g. SIGTERM: checkpoint at the next step boundary, then stop
    guard = LossGuard(t.max_bad_steps, t.spike_factor, t.spike_window)
    inject = LossInjector(env.rank)
    own_overflow_check = t.zero_stage == 0 and precision == "fp32"  # DeepSpeed has no overflow path there
    preempted, rollbacks = None, 0
    bar = tqdm(total=t.max_steps, initial=step, unit="step", disable=not (env.is_main and cfg.run.progress_bar))
    window_start, window_losses, window_steps = time.perf_counter(), [], 0
    window_wait, window_mix = 0.0, torch.zeros(len(loader.mix), dtype=torch.float64)
    while step < t.max_steps:
        losses = []
        for micro in range(grad_accum):  # engine.step() applies the update at the accumulation boundary
            waited = time.perf_counter()
            batch = next(batches)
            window_wait += time.perf_counter() - waited
            window_mix += torch.bincount(batch.pop("source"), minlength=len(loader.mix))
            inputs = {k: v.to(env.device) for k, v in batch.items()}  # input_ids, labels (, position_ids)
            loss = inject(step + 1, engine(**inputs, use_cache=False).loss)
            losses.append(loss)
            if micro == grad_accum - 1:  # the step's one collective: stop signals, non-finite losses, loss sum
                agreed = agree(stop.signals, stop.received, losses, env.world_size, env.device)
                spike = guard.is_spike(agreed.mean_loss)
                if agreed.nonfinite or spike:
                    loss = poison(loss)  # on every rank: DeepSpeed's overflow path drops this update
            engine.backward(loss)
            if micro == grad_accum - 1 and own_overflow_check:
                step_zero0_fp32(engine, bool(agreed.nonfinite or spike), env.device)
            else:
                engine.step()
        # fp16's loss scaler skips overflowing steps by design while it finds its scale: not a bad step
        healthy = engine.was_step_applied() or (precision == "fp16" and not agreed.nonfinite)
        step += 1
        window_steps += 1
        tokens_seen += tokens_per_step
        loader.step_done()
        bar.update(1)
        rollback = guard.after_step(healthy, agreed.mean_loss, spike)
        if healthy and not spike:
            window_losses.append(agreed.mean_loss)

        if step % t.log_every == 0 or step == t.max_steps or rollback:
            elapsed = time.perf_counter() - window_start
            wait_sum, *mix = distributed.all_reduce_sum([window_wait, *window_mix.tolist()], env.device)
            scalars = {"train/loss": sum(window_losses) / len(window_losses)} if window_losses else {}
            scalars |= {  # (no train/loss when every step of the window was skipped)
                "train/lr": scheduler.get_last_lr()[0],
                "train/grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "train/tokens_per_s": window_steps * tokens_per_step / elapsed,
                "train/tokens_seen": tokens_seen,
                "train/data_wait_frac": wait_sum / (env.world_size * elapsed),  # of step time, mean over ranks
                "train/skipped_steps": guard.skipped,
            }
            peak = peak_flops(env.device)
            if peak:  # model FLOPs utilization: achieved training FLOP/s per device over the device's peak
                scalars["train/mfu"] = scalars["train/tokens_per_s"] * flops / (env.world_size * peak)
            scalars |= memory_scalars(env.device)
            if len(mix) > 1:
                scalars |= {f"data/mix/{name}": n / sum(mix) for (name, _), n in zip(loader.mix, mix, strict=True)}
            metrics.log(step, scalars)
            bar.set_postfix(loss=f"{scalars.get('train/loss', math.nan):.3f}")
            window_start, window_losses, window_steps = time.perf_counter(), [], 0
            window_wait, window_mix = 0.0, torch.zeros_like(window_mix)
        if rollback:  # back to the last checkpoint, past the data that led here
            latest = checkpoint.complete_checkpoints(run_dir)
            rollbacks += 1
            if not latest or rollbacks > t.max_rollbacks:
                raise UserError(
                    f"training diverged at step {step} ({rollback}) and "
                    + ("there is no checkpoint to roll back to" if not latest else f"{t.max_rollbacks} rollbacks "
                       "did not help")
                    + "; lower train.lr, raise train.warmup_steps or check the data, then rerun."
                )  # fmt: skip
            skip_to = loader.state_dict()["blocks_consumed"]
            del batches  # the old loader's workers stop
            bad_step = step
            step, tokens_seen, state = restore(latest[-1])
            skip_from = state["blocks_consumed"]
            checkpoint.record_skip(run_dir, skip_from, skip_to, bad_step, rollback, env.is_main)
            state["blocks_consumed"] = skip_to
            loader = make_loader(state)
            batches = iter(loader)
            checkpoint.restore_rng(latest[-1], env.rank)
            guard.reset()
            metrics.log(step, {"train/rollbacks": rollbacks})
            say(
                env.is_main,
                f"step {bad_step}: {rollback}; rolled back to step {step} and skipped training blocks "
                f"[{skip_from}, {skip_to}) (recorded in {run_dir / checkpoint.SKIPS})",
            )
            bar.reset(total=t.max_steps)
            bar.update(step)
            continue
        if t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
            validate()
        preempted = agreed.signum
        if (t.save_every and step % t.save_every == 0) or step == t.max_steps or preempted:
            save()
        if preempted:
            say(env.is_main, f"stopping at step {step} on signal {signal.Signals(preempted).name}; checkpoint saved")
            break
    bar.close()
    stop.restore()
    if preempted:
        metrics.close()
        return {"step": step, "tokens_seen": tokens_seen, "preempted": signal.Signals(preempted).name}
    after = validate()
    metrics.close()
    return {"step": step, "tokens_seen": tokens_seen, "val_before": before, "val_after": after, "preempted": None}
