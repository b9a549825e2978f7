"""`dist-clm quickstart`: the whole path on the embedded corpus (the Python standard library) in minutes on a CPU.

Each stage calls the same function its own subcommand calls, so this is also the reference for using them.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from dist_clm import console
from dist_clm.errors import UserError

MARKER = ".dist_clm_quickstart"  # lets a rerun replace its own directory, and nothing else

# A tiny GPT-2 on ~1.4 M tokens: validation perplexity falls from ~4000 to ~100 in about 2.5 minutes on 2 cores.
TRAIN_SETTINGS = [
    "model.preset=tiny",
    "data.block_size=128",
    "train.max_steps=1000",
    "train.micro_batch_size=8",
    "optim.lr=3e-3",
    "optim.warmup_steps=0.05",  # of train.max_steps, so a shorter run (train.max_steps=50) keeps a warmup too
    "train.eval_every=250",
    "train.eval_blocks=32",
    "checkpoint.save_every=250",
    "distributed.zero_stage=2",
]


def quickstart(directory: str | Path = "runs/quickstart", overrides: list[str] | tuple[str, ...] = ()) -> dict:
    from transformers import AutoModelForCausalLM

    from dist_clm.config import load_config
    from dist_clm.data import sources
    from dist_clm.data.prepare import prepare
    from dist_clm.data.tokenizer import train_bpe
    from dist_clm.evaluation.export import export, load_model
    from dist_clm.evaluation.generate import Sampling, generate
    from dist_clm.evaluation.perplexity import evaluate_cli
    from dist_clm.training.loop import train

    root = Path(directory)
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).exists():
            raise UserError(f"'{root}' exists and was not made by quickstart; pass --dir with a new path.")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).touch()
    start = time.time()

    def stage(name: str) -> None:
        console.info(f"\n=== {name}  (t = {time.time() - start:.0f} s)")

    stage("1/6 tokenizer: byte-level BPE on the Python standard library")
    files = sources.default_corpus_files()
    console.info(f"{len(files)} files, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB")
    train_bpe(sources.iter_documents(files), root / "tokenizer", vocab_size=4096)

    stage("2/6 prepare: token ids -> MDS shards")
    m = prepare(root / "tokenizer", root / "data", None, val_fraction=0.05, chunk_tokens=8192, progress=False)
    for split, s in m["splits"].items():
        console.info(
            f"{split}: {s['documents']:,} documents, {s['tokens']:,} tokens, {console.count(s['chunks'], 'chunk')}"
        )

    stage("3/6 train: DeepSpeed ZeRO-2, one process")
    cfg = load_config(None, [f"data.path={root / 'data'}", f"run.dir={root / 'run'}", *TRAIN_SETTINGS, *overrides])
    result = train(cfg)
    b, a = result.val_before["perplexity"], result.val_after["perplexity"]
    console.info(f"validation perplexity: {b:.2f} before training -> {a:.2f} after {result.step} steps")

    stage("4/6 eval: perplexity of the last checkpoint on the whole validation split")
    ev = evaluate_cli(str(root / "run"))
    console.info(
        f"tokens evaluated: {ev['tokens']:,}  loss: {ev['loss']:.4f}  perplexity: {ev['perplexity']:.3f}  "
        f"bits per byte: {ev['bits_per_byte']:.4f}  (blocks of {ev['block_size']} tokens; {ev['data']})"
    )

    stage("5/6 generate: temperature 0.8, top_p 0.95, top_k 50, seed 0")
    model, tok, _ = load_model(root / "run")
    prompt = "def __init__(self"
    console.info(prompt + generate(model, tok, [prompt], Sampling(max_new_tokens=80, seed=0))[0][0])

    stage("6/6 export: a Hugging Face directory")
    out = export(root / "run", root / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    console.info(
        f"{out} loads with AutoModelForCausalLM ({reloaded.config.model_type}, "
        f"{sum(p.numel() for p in reloaded.parameters()):,} parameters)"
    )
    board = root / "run" / "tensorboard"
    console.info(f"\ndone in {time.time() - start:.0f} s; TensorBoard: tensorboard --logdir {board}")
    if a >= b:
        raise UserError(f"validation perplexity did not fall ({b:.2f} -> {a:.2f}); something is wrong with training.")
    return {"before": b, "after": a, "eval": ev}
