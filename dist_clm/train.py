"""The training loop: one function, read top to bottom.

setup (data, tokenizer, model, DeepSpeed engine) -> resume from the latest complete checkpoint ->
validate -> loop { micro batches -> engine.step -> log -> validate -> checkpoint } -> validate.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from dist_clm import checkpoint, distributed
from dist_clm.config import Config
from dist_clm.data.loader import TokenStream, TrainLoader
from dist_clm.data.prepare import read_manifest
from dist_clm.data.tokenizer import fingerprint, load_tokenizer
from dist_clm.errors import UserError
from dist_clm.evaluate import block_spans, perplexity
from dist_clm.metrics import Metrics, say
from dist_clm.model import build_model, count_params, flops_per_token, max_positions


def resolve_precision(precision: str, on_gpu: bool) -> str:
    if precision != "auto":
        return precision
    return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"


def deepspeed_config(cfg: Config, on_gpu: bool) -> dict:
    """The DeepSpeed config this run's settings mean; DeepSpeed owns the optimizer and the schedule."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": resolve_precision(t.precision, on_gpu) == "bf16"},
        "zero_optimization": {"stage": t.zero_stage},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": [t.beta1, t.beta2],
                "eps": t.eps,
                "weight_decay": t.weight_decay,
                "torch_adam": not on_gpu,
            },  # DeepSpeed's fused Adam needs CUDA
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.max_steps,
                "warmup_num_steps": t.warmup_steps,
                "warmup_type": "linear",
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": t.min_lr_ratio,
            },
        },
        "steps_per_print": 1 << 40,  # we log ourselves
    }


def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay matrices only: not biases, norm weights or embeddings (their decay hurts and buys nothing)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(cfg: Config) -> dict:
    """Train per `cfg`; returns validation loss/perplexity before and after, the final step and tokens seen."""
    import deepspeed

    env = distributed.init()
    t, run_dir = cfg.train, Path(cfg.run.dir)

    # --- data, tokenizer, model: all checked before anything is written ---
    manifest = read_manifest(cfg.data.path)
    tok = load_tokenizer(Path(cfg.data.path) / "tokenizer")
    if fingerprint(tok) != manifest["tokenizer"]["fingerprint"]:
        raise UserError(
            f"the tokenizer in '{cfg.data.path}/tokenizer' is not the one the shards were made with; "
            "prepare the data again."
        )
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = build_model(cfg.model.preset, cfg.model.pretrained, cfg.model.overrides, tok)
    limit = max_positions(model.config)
    if limit is not None and cfg.data.block_size > limit:
        raise UserError(
            f"config key 'data.block_size' is {cfg.data.block_size}, more than the model's {limit} "
            "positions; lower data.block_size or raise the model's positions."
        )
    if manifest["tokenizer"]["vocab_size"] > model.config.vocab_size:
        raise UserError(
            f"the shards use {manifest['tokenizer']['vocab_size']} token ids but the model embeds only "
            f"{model.config.vocab_size}; use a model built for this tokenizer."
        )
    n_params = count_params(model)
    say(
        env.is_main,
        f"model: {model.config.model_type}, {n_params / 1e6:.2f} M parameters, "
        f"{flops_per_token(model.config, n_params, cfg.data.block_size) / 1e6:.1f} MFLOPs per token; "
        f"world size {env.world_size} on {env.device}, {resolve_precision(t.precision, env.device != 'cpu')}, "
        f"ZeRO-{t.zero_stage}",
    )
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
        if not (run_dir / "tokenizer").is_dir():
            tok.save_pretrained(str(run_dir / "tokenizer"))

    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, t.weight_decay),
        config=deepspeed_config(cfg, on_gpu=env.device != "cpu"),
    )

    # --- resume: engine, optimizer, schedule, step, tokens and the loader's position ---
    step, tokens_seen, loader_state = 0, 0, None
    done = checkpoint.complete_checkpoints(run_dir) if t.resume else []
    if done:
        _, client = engine.load_checkpoint(str(checkpoint.checkpoints_dir(run_dir)), tag=done[-1].name)
        step, tokens_seen, loader_state = client["step"], client["tokens_seen"], client["loader"]
        say(env.is_main, f"resumed from {done[-1]} at step {step}")
    loader = TrainLoader(
        cfg.data.path,
        manifest,
        cfg.data.block_size,
        t.micro_batch_size,
        t.grad_accum,
        env.rank,
        env.world_size,
        cfg.data.shuffle,
        t.seed,
        cfg.data.num_workers,
        loader_state,
    )
    val = TokenStream(cfg.data.path, "val", manifest)
    val_spans = block_spans(val.tokens, cfg.data.block_size, t.eval_blocks)
    metrics = Metrics(run_dir, env.is_main, cfg.run.tensorboard)

    def validate() -> dict:
        res = perplexity(engine.module, val.read, val_spans, t.micro_batch_size, env.device, env.rank, env.world_size)
        metrics.log(step, {"val/loss": res["loss"], "val/perplexity": res["perplexity"]})
        say(
            env.is_main,
            f"step {step}: validation loss {res['loss']:.4f}, perplexity {res['perplexity']:.2f} "
            f"({res['tokens']} tokens)",
        )
        return res

    def save() -> None:
        client = {"step": step, "tokens_seen": tokens_seen, "loader": loader.state_dict()}
        checkpoint.save(engine, run_dir, step, client, model.config, t.keep_last, env.is_main)

    before = validate()
    tokens_per_step = loader.global_blocks_per_step * cfg.data.block_size
    batches = iter(loader)
    from tqdm.auto import tqdm

    bar = tqdm(total=t.max_steps, initial=step, unit="step", disable=not (env.is_main and cfg.run.progress_bar))
    window_start, window_loss, window_steps = time.perf_counter(), torch.zeros((), device=env.device), 0
    while step < t.max_steps:
        for _ in range(t.grad_accum):  # engine.step() applies the update at the accumulation boundary
            batch = next(batches)
            loss = engine(input_ids=batch["input_ids"].to(env.device), labels=batch["labels"].to(env.device)).loss
            engine.backward(loss)
            engine.step()
            window_loss += loss.detach().float() / t.grad_accum
        step += 1
        window_steps += 1
        tokens_seen += tokens_per_step
        loader.step_done()
        bar.update(1)

        if step % t.log_every == 0 or step == t.max_steps:
            mean_loss = distributed.all_reduce_sum([window_loss.item()], env.device)[0] / (
                env.world_size * window_steps
            )
            elapsed = time.perf_counter() - window_start
            metrics.log(
                step,
                {
                    "train/loss": mean_loss,
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/grad_norm": float(engine.get_global_grad_norm() or 0.0),
                    "train/tokens_per_s": window_steps * tokens_per_step / elapsed,
                    "train/tokens_seen": tokens_seen,
                },
            )
            bar.set_postfix(loss=f"{mean_loss:.3f}")
            window_start, window_loss, window_steps = time.perf_counter(), torch.zeros_like(window_loss), 0
        if t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
            validate()
        if (t.save_every and step % t.save_every == 0) or step == t.max_steps:
            save()
    bar.close()
    after = validate()
    metrics.close()
    return {"step": step, "tokens_seen": tokens_seen, "val_before": before, "val_after": after}
