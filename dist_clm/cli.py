"""The `dist-clm` command. Thin: parse arguments, call one function, turn a UserError into one line and exit 2."""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import os
import sys
from pathlib import Path

from dist_clm import console
from dist_clm.errors import PeerLost, UserError


def _corpus(a: argparse.Namespace):
    """The documents the corpus arguments name (inputs, --dataset, or the embedded default)."""
    from dist_clm.data import sources

    if a.dataset:
        if a.inputs:
            raise UserError("give either input files or --dataset, not both.")
        return sources.hf_dataset_documents(a.dataset, a.dataset_config, a.split, a.text_column)
    files = sources.resolve_inputs(a.inputs) if a.inputs else sources.default_corpus_files()
    if not a.inputs:
        print(f"no corpus named: using {len(files)} files of the Python standard library")
    return sources.iter_documents(files, a.text_column, split=a.split)


def _tokenizer_train(a: argparse.Namespace) -> None:
    from itertools import islice

    from dist_clm.data.tokenizer import train_bpe

    docs = (d for d in _corpus(a) if d)
    if a.sample_docs:
        docs = islice(docs, a.sample_docs)
    docs = console.progress(docs, unit="doc", desc="reading", total=a.sample_docs or None, enabled=not a.quiet)
    out = train_bpe(docs, a.out, vocab_size=a.vocab_size, chat_template=a.chat_template)
    print(f"tokenizer saved to {out}")


def _prepare(a: argparse.Namespace) -> None:
    if a.merge:
        return _merge(a.merge)
    for flag, value in (("--tokenizer", a.tokenizer), ("--out", a.out)):
        if not value:
            raise UserError(f"prepare needs {flag} (or --merge OUT to join the parts of a prepare in parts).")
    options = dict(
        dataset=a.dataset,
        dataset_config=a.dataset_config,
        split=a.split,
        val_fraction=a.val_fraction,
        chunk_tokens=a.chunk_tokens,
        text_column=a.text_column,
        compression=a.compression,
        shard_bytes=int(a.shard_mb * (1 << 20)),
        num_proc=a.num_proc,
        dedup=a.dedup,
        progress=not a.quiet,
        fmt=a.format,
        block_size=a.block_size,
        chat_template=a.chat_template,
    )
    if a.launch:
        return _prepare_on_slurm(a, options)
    if a.tasks or a.task_index is not None or a.stage:
        if not a.tasks or a.task_index is None:
            raise UserError("a prepare in parts needs both --tasks N and --task-index I (0 <= I < N); or --launch "
                            "slurm with --tasks N to submit them all.")  # fmt: skip
        from dist_clm.data.prepare import prepare_part

        m = prepare_part(a.tokenizer, a.out, a.inputs, a.tasks, a.task_index, a.stage or "tokenize", **options)
        if "splits" in m:
            tokens = sum(s["tokens"] for s in m["splits"].values())
            print(f"part {a.task_index} of {a.tasks}: {tokens} tokens in {m['seconds']:.1f} s")
        print(f"part {a.task_index} of {a.tasks} ({a.stage or 'tokenize'}) complete; when every part is: "
              f"dist-clm prepare --merge {a.out}")  # fmt: skip
        return None
    from dist_clm.data.prepare import prepare

    _print_prepared(prepare(a.tokenizer, a.out, a.inputs, **options), a.out)
    return None


def _print_prepared(m: dict, out: str) -> None:
    for split, s in m["splits"].items():
        tuned = m.get("fine_tuning") or {}
        what = "pairs" if tuned.get("pairs") else "conversations" if tuned else "documents"
        print(f"{split}: {s['documents']:,} {what}, {s['tokens']:,} tokens, {console.count(s['chunks'], 'chunk')}"
              + (f"; {s['truncated']} truncated, {s['dropped']} dropped" if "fine_tuning" in m else ""))  # fmt: skip
    if m.get("duplicates_removed"):
        print(f"{m['duplicates_removed']} exact duplicates removed")
    parts = m.get("parts")
    took = f"{m['seconds']:.1f} s" if not parts else (f"{parts['tasks']} parts, {m['seconds']:.1f} task-seconds (the "
                                                      f"slowest {parts['slowest_part_seconds']:.1f} s), merged in "
                                                      f"{parts['merge_seconds']:.1f} s")  # fmt: skip
    print(f"prepared data written to {out} in {took}")


def _merge(out: str) -> None:
    from dist_clm.data.merge import merge

    _print_prepared(merge(out), out)


def _prepare_on_slurm(a: argparse.Namespace, options: dict) -> None:
    from dist_clm.data.remote import is_remote
    from dist_clm.launch import prepare_arrays
    from dist_clm.launch.slurm import SlurmSettings

    if not a.tasks or a.task_index is not None or a.stage:
        raise UserError("--launch slurm needs --tasks N (the number of array tasks to split the corpus between) and "
                        "submits every --task-index and --stage itself: leave those out.")  # fmt: skip
    settings = SlurmSettings(nodes=1, tasks_per_node=1, cpus_per_task=a.cpus_per_task, mem_gb=a.mem_gb,
                             partition=a.partition or "", account=a.account or "", time_min=a.time,
                             job_name="dist-clm-prepare", max_requeues=a.max_requeues,
                             signal_delay_s=min(60, a.time * 30), sbatch=a.sbatch or [])  # fmt: skip
    folder = Path(a.log_folder) if a.log_folder else (Path("prepare-logs") if is_remote(a.out) else
                                                      Path(a.out) / "parts" / "slurm")  # fmt: skip
    options = options | {"progress": False}
    prepare = {"tokenizer_dir": a.tokenizer, "out": a.out, "inputs": a.inputs, "options": options}
    arrays, merge_job = prepare_arrays.submit(settings, prepare, a.tasks, folder)
    print(f"submitted job arrays {', '.join(arrays)} ({a.tasks} tasks each) and the merge, job {merge_job.job_id}")
    print(f"  logs: {folder}; progress: dist-clm data status {a.out}")
    if a.wait:
        _print_prepared(prepare_arrays.wait(merge_job, arrays, a.out), a.out)


def _status(a: argparse.Namespace) -> None:
    from dist_clm.data.parts import describe_status
    from dist_clm.data.store import store

    print(describe_status(store(a.dir)))


def _prepare_reference(a: argparse.Namespace) -> None:
    from dist_clm.parallel.process_group import inference_device
    from dist_clm.training.preference import compute_reference

    record = compute_reference(a.model, a.data, a.batch_size, inference_device())
    counts = ", ".join(f"{split} {s['conversations']}" for split, s in record["splits"].items())
    print(f"reference values of the conversations ({counts}) under weights {record['weights']} written to "
          f"{a.data}/reference")  # fmt: skip


def _synthetic(a: argparse.Namespace) -> None:
    from dist_clm.data.synthetic import write

    print(f"{a.records} {a.task} records written to {write(a.task, a.out, a.records, a.seed)}")


def _inspect(a: argparse.Namespace) -> None:
    from dist_clm.data.audit import inspect, verify

    if a.verify:  # one line per split, or a DataError (exit 2) at the first problem
        for line in verify(a.dir):
            print(line)
        return
    print(inspect(a.dir, samples=a.samples, tokens=a.tokens))


def _batch(a: argparse.Namespace) -> None:
    import json

    from dist_clm.data.step_blocks import report, run_data, text
    from dist_clm.data.tokenizer import load_tokenizer

    if a.step < 1:
        raise UserError(f"--step must be 1 or more (steps count from 1), got {a.step}.")
    run = run_data(a.run, a.overrides)
    if a.rank is not None and not 0 <= a.rank < run.world:
        raise UserError(f"--rank {a.rank} is not a rank of this run ({run.world} rank(s): 0-{run.world - 1}).")
    tokenizer = load_tokenizer(Path(a.run) / "tokenizer") if (Path(a.run) / "tokenizer").is_dir() else None
    found = report(run, a.step, a.rank, tokenizer, a.tokens)
    print(json.dumps(found) if a.json else text(found, a.run))


def _run_status(a: argparse.Namespace) -> None:
    import time

    from dist_clm.training.status import read, screen

    seen_running = False
    while True:
        try:
            s = read(a.run)
        except UserError:
            if not a.watch:
                raise
            print(f"{a.run}: no run there yet; waiting for it to start", flush=True)
            time.sleep(a.watch)
            continue
        text = screen(s)
        print(("\033[2J\033[H" if a.watch and sys.stdout.isatty() else "") + text, flush=True)
        seen_running = seen_running or bool(s["running"])
        # --watch: until Ctrl-C, or until the run it saw training (or found ended) is no longer training
        if not a.watch or (not s["running"] and (seen_running or s["end"])):
            return
        if not sys.stdout.isatty():
            print(flush=True)  # (screens one after the other in a log, a blank line between)
        time.sleep(a.watch)


def _train(a: argparse.Namespace) -> None:
    from dist_clm.config import ENV_OVERRIDES, env_overrides, load_config
    from dist_clm.training.preemption import PREEMPTED_EXIT

    extra = env_overrides()
    cfg = load_config(a.config, [*a.overrides, *extra])  # a bad key fails here, before seconds of importing torch
    if extra:
        console.info(f"{ENV_OVERRIDES} adds {' '.join(extra)}")
    from dist_clm.parallel.process_group import launched_world
    from dist_clm.training.preflight import preflight

    # so do the mistakes the data, the model's shape and the ranks reveal, and a run the memory plan cannot fit
    preflight(cfg, *launched_world(), plan_check=not a.no_plan_check)
    from dist_clm.training.loop import train

    result = train(cfg)
    if result.preempted:
        print(
            f"dist-clm: stopped by {result.preempted} at step {result.step} after saving a checkpoint; "
            "rerun the same command to continue.",
            file=sys.stderr,
        )
        sys.exit(PREEMPTED_EXIT)


def _size(text: str, flag: str) -> int:
    """'80GB' -> 80e9 bytes, '1TiB' -> 2**40 (a plain number: GB)."""
    import re

    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?)(b?)\s*", text.lower())
    if not m:
        raise UserError(f"{flag} {text!r} is not a size; write it like 80GB, 141GB or 1TB.")
    number, prefix, binary, unit = m.groups()
    if not (prefix or binary or unit):
        prefix = "g"  # (a plain number)
    return int(float(number) * (1024 if binary else 1000) ** " kmgt".index(prefix or " "))


def _plan(a: argparse.Namespace) -> None:
    from dist_clm.config import load_config
    from dist_clm.parallel import memory_plan as mp

    cfg = load_config(a.config, a.overrides)
    if a.gpus:
        gpu = a.gpu.upper()
        memory = _size(a.gpu_memory, "--gpu-memory") if a.gpu_memory else mp.GPU_MEMORY.get(gpu)
        if memory is None:
            raise UserError(f"--gpu {a.gpu} is not one of {', '.join(mp.GPU_MEMORY)}; give --gpu-memory (and "
                            "--peak-tflops for the time per step).")  # fmt: skip
        if a.gpus % a.nodes:
            raise UserError(f"--gpus {a.gpus} is not a multiple of --nodes {a.nodes}; give the GPUs of all nodes.")
        machine = mp.Machine(a.gpus, a.nodes, memory, _size(a.host_memory, "--host-memory"), on_gpu=True, gpu=gpu,
                             peak_tflops=a.peak_tflops or mp.PEAK_TFLOPS.get(gpu, 0.0))  # fmt: skip
    else:
        from dist_clm.parallel.process_group import launched_world

        machine = mp.machine_here(*launched_world())
        if a.peak_tflops:
            machine = dataclasses.replace(machine, peak_tflops=a.peak_tflops)
    from dist_clm.training.preflight import data_vocab

    print(mp.render(mp.plan(cfg, mp.size_of_run(cfg, a.vocab or data_vocab(cfg)), machine, a.mfu)))


def _model_source(path: str, exported_ok: bool = True) -> None:
    """Fail fast (before importing torch) on a path that holds no checkpoint or exported model."""
    from dist_clm.checkpointing.checkpointer import resolve
    from dist_clm.evaluation.export import is_exported

    p = Path(path)
    if exported_ok and not p.exists():
        raise UserError(
            f"'{p}' does not exist; give a run directory, one of its checkpoints/step_* directories, or an exported "
            "model (dist-clm export RUN --out DIR makes one)."
        )
    if not (exported_ok and is_exported(p)):
        resolve(p)


def _eval(a: argparse.Namespace) -> None:
    _model_source(a.checkpoint)
    if a.tasks:
        return _eval_tasks(a)
    from dist_clm.evaluation.perplexity import evaluate_cli

    res = evaluate_cli(
        a.checkpoint,
        data=a.data,
        text=a.text,
        block_size=a.block_size,
        stride=a.stride,
        max_blocks=a.max_blocks,
        batch_size=a.batch_size,
    )
    if res.pop("is_main"):
        line = f"tokens evaluated: {res['tokens']:,}  loss: {res['loss']:.4f}  perplexity: {res['perplexity']:.3f}"
        if "bits_per_byte" in res:
            line += f"  bits per byte: {res['bits_per_byte']:.4f} ({res['bytes']:,} bytes)"
        stride = f", stride {res['stride']}" if res["stride"] else ""
        print(f"{line}  (blocks of {res['block_size']} tokens{stride}; {res['data']})")
        if a.json:
            print(json.dumps(res))


def _eval_tasks(a: argparse.Namespace) -> None:
    """Downstream tasks on one process (under a launcher: rank 0; the harness shares work between processes
    only through accelerate's own launch)."""
    from dist_clm.evaluation import downstream
    from dist_clm.evaluation.export import load_model
    from dist_clm.parallel.process_group import inference_device

    if int(os.environ.get("RANK", "0")) != 0:
        return
    device = inference_device()
    model, tok, _ = load_model(a.checkpoint, device)
    results, seconds = downstream.timed(model, tok, a.tasks, device, limit=a.limit,
                                        batch_size=a.batch_size, num_fewshot=a.num_fewshot)  # fmt: skip
    print(downstream.table(results))
    print(f"({seconds:.1f} s)")
    if a.json:
        print(json.dumps(results))


def _generate(a: argparse.Namespace) -> None:
    given = {k: v for k in ("temperature", "top_p", "top_k") if (v := getattr(a, k)) is not None}
    if a.greedy and given:
        named = " and ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in given.items())
        raise UserError(f"--greedy always takes the most likely token, so {named} would do nothing; drop --greedy to "
                        f"sample, or drop {named}.")  # fmt: skip
    _model_source(a.checkpoint)
    from dist_clm.evaluation.generate import Sampling, generate  # (light: torch is imported when generating)

    prompts = list(a.prompt or [])
    if a.prompt_file:
        path = Path(a.prompt_file)
        if not path.is_file():
            raise UserError(f"prompt file '{path}' does not exist; give a text file with one prompt per line.")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    conversations = [[{"role": "user", "content": p}] for p in prompts] if a.chat else []
    if a.chat_file:
        conversations += _conversations(Path(a.chat_file))
    prompts = prompts or [""]
    s = Sampling(
        max_new_tokens=a.max_new_tokens,
        greedy=a.greedy,
        **given,
        repetition_penalty=a.repetition_penalty,
        num_return_sequences=a.num_return_sequences,
        seed=a.seed,
    )
    s.check()
    from dist_clm.evaluation.export import load_model
    from dist_clm.parallel.process_group import inference_device

    model, tok, _ = load_model(a.checkpoint, inference_device())
    if conversations:
        from dist_clm.evaluation.generate import chat_prompts

        prompts = chat_prompts(tok, conversations, a.checkpoint)
        shown = [c[-1]["content"] for c in conversations]
    stream = len(prompts) == 1 and s.num_return_sequences == 1 and not conversations
    if stream:
        print(prompts[0], end="", flush=True)
    results = generate(model, tok, prompts, s, stream=stream)
    if stream:  # (the streamer ends the line)
        return
    for i, (prompt, texts) in enumerate(zip(prompts, results, strict=True)):
        for j, text in enumerate(texts):
            print(f"=== prompt {i + 1}" + (f", sequence {j + 1}" if len(texts) > 1 else "") + " ===")
            print(f"user: {shown[i]}\nassistant: {text}" if conversations else prompt + text)


def _conversations(path: Path) -> list[list[dict]]:
    """--chat-file: one JSON object per line with a `messages` list (the conversation so far)."""
    if not path.is_file():
        raise UserError(f"chat file '{path}' does not exist; give a jsonl file with a 'messages' list per line.")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"line {n} of '{path}' is not a JSON object with a 'messages' list; fix it.") from None
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in messages):  # fmt: skip
            raise UserError(f"line {n} of '{path}': 'messages' must be a list of {{role, content}} objects.")
        out.append(messages)
    return out


def _export(a: argparse.Namespace) -> None:
    _model_source(a.checkpoint, exported_ok=False)
    from dist_clm.evaluation.export import export

    print(f"exported to {export(a.checkpoint, a.out, a.dtype, a.max_shard_size, a.provenance)}")


def _launch_slurm(a: argparse.Namespace) -> None:
    from dist_clm.launch.slurm import launch_cli

    launch_cli(a)


def _quickstart(a: argparse.Namespace) -> None:
    from dist_clm.quickstart import quickstart

    quickstart(a.dir, a.overrides)


class _ShowDefaults(argparse.HelpFormatter):
    """--help shows each option's default where it has one (not for flags, nor where the help says it already)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default in (None, False, argparse.SUPPRESS) or not action.option_strings
        return text if quiet or "default" in text else f"{text} (default: %(default)s)"


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _ShowDefaults
    for action in parser._actions:  # (argparse has no public walk over its subcommands)
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _show_defaults(child)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-clm", description="Streaming, distributed pretraining of causal LMs.")
    sub = p.add_subparsers(dest="command", required=True)

    def corpus_args(t: argparse.ArgumentParser) -> None:
        t.add_argument("inputs", nargs="*", help="files, directories, globs, save_to_disk dirs (default: the stdlib)")
        t.add_argument("--dataset", help="a Hugging Face dataset name or local dataset directory (load_dataset)")
        t.add_argument("--dataset-config", help="the dataset's configuration name")
        t.add_argument("--split", default="train", help="which split of --dataset or a save_to_disk DatasetDict")
        t.add_argument("--text-column", default="text", help="field holding the text (json, parquet, csv, datasets)")
        t.add_argument("--quiet", action="store_true", help="no progress bar")

    tk = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True)
    t = tk.add_parser("train", help="train a byte-level BPE on a corpus")
    corpus_args(t)
    t.add_argument("--out", required=True, help="directory to save the tokenizer to")
    t.add_argument("--vocab-size", type=int, default=8192, help="tokens in the vocabulary, special tokens included")
    t.add_argument("--sample-docs", type=int, default=0, help="train on the first N documents only (0 = all)")
    t.add_argument("--chat-template", choices=["chatml"], help="reserve its special tokens and save the template")
    t.set_defaults(func=_tokenizer_train)

    t = sub.add_parser("prepare", help="tokenize a corpus once into MDS shards")
    corpus_args(t)
    t.add_argument("--tokenizer", help="a local tokenizer directory")
    t.add_argument(
        "--out", help="directory to write (must not exist or be empty), or a URL such as s3://bucket/prefix (uploaded)"
    )
    t.add_argument(
        "--val-fraction", type=float, default=0.05, help="share of documents for validation (1: evaluation-only data)"
    )
    t.add_argument("--chunk-tokens", type=int, default=16384, help="tokens per stored MDS sample")
    t.add_argument("--num-proc", type=int, default=0, help="tokenizer processes (default: all cores)")
    t.add_argument("--dedup", action="store_true", help="drop exact duplicate documents")
    t.add_argument("--compression", default=None, help="MDS shard compression, e.g. zstd, zstd:7, gz, br")
    t.add_argument("--shard-mb", type=float, default=64, help="shard size limit in MiB (e.g. 64, or 0.5)")
    t.add_argument(
        "--format",
        default="text",
        choices=["text", "chat", "prompt-completion", "preference"],
        help="chat: a messages column; prompt-completion: prompt and completion columns; preference: prompt, chosen "
        "and rejected columns (fine-tuning)",
    )
    t.add_argument("--block-size", type=int, default=0, help="fine-tuning formats: tokens per packed block")
    t.add_argument("--chat-template", choices=["chatml"], help="for a tokenizer without a chat template")
    g = t.add_argument_group("a prepare in parts (many tasks, many nodes), then a merge")
    g.add_argument("--tasks", type=int, default=0, help="split the corpus between N tasks")
    g.add_argument("--task-index", type=int, help="run part I of --tasks N (from any scheduler)")
    g.add_argument("--stage", choices=["hash", "dedup", "tokenize"], help="with --dedup: hash, dedup, then tokenize, "
                   "each for every task before the next (default: tokenize)")  # fmt: skip
    g.add_argument("--merge", metavar="OUT", help="join the finished parts under OUT into one dataset")
    g.add_argument("--launch", choices=["slurm"], help="submit the --tasks as SLURM job arrays (and the merge)")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--cpus-per-task", type=int, help="CPU cores per task (the prepare's worker processes); default: 8, "
                   "or all of a node's where the partition's nodes have fewer")  # fmt: skip
    g.add_argument("--mem-gb", type=float, default=0, help="memory per task (0: the partition's default)")
    g.add_argument("--time", type=int, default=24 * 60, help="time limit per task in minutes")
    g.add_argument("--max-requeues", type=int, default=3, help="requeues of a task killed or preempted")
    g.add_argument("--log-folder", help="default: OUT/parts/slurm (a bucket OUT: ./prepare-logs)")
    g.add_argument("--sbatch", action="append", help="an extra sbatch option KEY=VALUE, KEY= for a flag (repeatable)")
    g.add_argument("--wait", action="store_true", help="wait for the merge and print the dataset's figures")
    t.set_defaults(func=_prepare)

    t = sub.add_parser("prepare-reference", help="DPO: the starting model's log-probabilities of prepared pairs")
    t.add_argument("data", help="a directory prepared with --format preference")
    t.add_argument("--model", required=True, help="the model DPO starts from (an export, a run or a checkpoint)")
    t.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass (on a GPU where there is one)")
    t.set_defaults(func=_prepare_reference)

    dt = sub.add_parser("data", help="prepared-data tools").add_subparsers(dest="action", required=True)
    t = dt.add_parser("synthetic", help="a small fine-tuning dataset (arithmetic), as JSON lines")
    t.add_argument(
        "--task",
        default="chat",
        choices=["chat", "prompt-completion", "preference"],
        help="what the examples teach (arithmetic in every case)",
    )
    t.add_argument("--out", required=True, help="the .jsonl file to write")
    t.add_argument("--records", type=int, default=2000, help="how many examples")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_synthetic)
    t = dt.add_parser("status", help="a prepare in parts: parts done, running and failed, tokens, time left")
    t.add_argument("dir", help="the prepare's --out (a directory or s3:// URL)")
    t.set_defaults(func=_status)
    t = dt.add_parser("batch", help="the blocks and documents a training step trained on, recomputed exactly")
    t.add_argument("run", help="the run directory (run.dir)")
    t.add_argument("overrides", nargs="*", help="section.key=value for data that moved, e.g. data.path=/new/place")
    t.add_argument("--step", type=int, required=True, help="the step (from 1)")
    t.add_argument("--rank", type=int, help="only the blocks this rank read (default: every rank's)")
    t.add_argument("--tokens", type=int, default=24, help="tokens of each document piece to decode")
    t.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    t.set_defaults(func=_batch)
    t = dt.add_parser("inspect", help="a prepared directory's figures and a few decoded documents")
    t.add_argument("dir")
    t.add_argument("--samples", type=int, default=3, help="documents to decode")
    t.add_argument("--tokens", type=int, default=60, help="tokens to show of each")
    t.add_argument(
        "--verify", action="store_true", help="check every shard against index.json and the manifest instead"
    )
    t.set_defaults(func=_inspect)

    t = sub.add_parser("status", help="one screen on a run: progress, loss, speed, time split, checkpoints, incidents")
    t.add_argument("run", help="the run directory (run.dir)")
    t.add_argument("--watch", type=float, nargs="?", const=10.0, default=0.0, metavar="SECONDS",
                   help="refresh every SECONDS (10) until the run stops training or Ctrl-C")  # fmt: skip
    t.set_defaults(func=_run_status)

    t = sub.add_parser("train", help="train (plain, or under deepspeed/torchrun launchers)")
    t.add_argument("--config", help="a YAML config file (see configs/)")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=3e-4")
    t.add_argument("--no-plan-check", action="store_true", help="start even where the memory plan (dist-clm plan) "
                   "says the run does not fit")  # fmt: skip
    t.set_defaults(func=_train)

    t = sub.add_parser(
        "plan", help="the memory (per rank, per node, on disk) and time of a training run, before it runs"
    )
    t.add_argument("--config", help="a YAML config file (see configs/)")
    t.add_argument("overrides", nargs="*", help="section.key=value, as for train")
    t.add_argument("--gpus", type=int, default=0, help="GPUs in all (default: this machine's ranks, as train sees "
                   "them; CPU ranks where there is no GPU)")  # fmt: skip
    t.add_argument("--gpu", default="H100", help="the GPU's name: H100, H200 or A100 (its memory and peak FLOP/s)")
    t.add_argument("--gpu-memory", help="memory per GPU, e.g. 80GB (default: the --gpu's)")
    t.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are on")
    t.add_argument("--host-memory", default="1TB", help="memory per node, with --gpus")
    t.add_argument("--peak-tflops", type=float, default=0.0, help="peak bf16 TFLOP/s per GPU (default: the --gpu's)")
    t.add_argument("--mfu", type=float, default=0.4, help="the model FLOPs utilization the time per step assumes")
    t.add_argument("--vocab", type=int, default=0, help="the vocabulary (default: the data's tokenizer's, or the "
                   "pretrained model's)")  # fmt: skip
    t.set_defaults(func=_plan)

    t = sub.add_parser("eval", help="perplexity and bits per byte of a checkpoint (any launcher: ranks share it)")
    t.add_argument("checkpoint", help="a run directory, a checkpoint directory, or an exported model")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--data", help="a prepared directory (its validation split); default: the run's data")
    src.add_argument("--text", nargs="+", help="text files, tokenized with the checkpoint's tokenizer")
    src.add_argument("--tasks", nargs="+", help="downstream tasks (lm-evaluation-harness): harness task names, folders "
                     "or YAML files of task definitions, or the offline dist_clm_suite")  # fmt: skip
    t.add_argument("--limit", type=int, default=0, help="--tasks: the first N examples of each task (0 = all)")
    t.add_argument("--num-fewshot", type=int, help="--tasks: examples shown before each question")
    t.add_argument("--block-size", type=int, help="tokens per window; default: the run's data.block_size")
    t.add_argument("--stride", type=int, default=0, help="sliding windows this far apart (default: non-overlapping)")
    t.add_argument("--max-blocks", type=int, default=0, help="evaluate the first N windows only (0 = all)")
    t.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass")
    t.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    t.set_defaults(func=_eval)

    t = sub.add_parser("generate", help="sample text from a checkpoint or an exported model")
    t.add_argument("checkpoint", help="a run directory, a checkpoint directory (any ZeRO stage), or an exported model")
    t.add_argument("--prompt", action="append", help="a prompt (repeat for a batch); default: a new document")
    t.add_argument("--prompt-file", help="a text file with one prompt per line (batched)")
    t.add_argument("--chat", action="store_true", help="each prompt is a user turn, rendered with the chat template")
    t.add_argument("--chat-file", help="a jsonl file, one conversation ({messages: [...]}) per line, to answer")
    t.add_argument("--max-new-tokens", type=int, default=64, help="tokens to add to each prompt")
    t.add_argument("--greedy", action="store_true", help="always the most likely token")
    t.add_argument("--temperature", type=float, help="default 0.8; 0 = greedy")
    t.add_argument("--top-p", type=float, help="nucleus sampling, default 0.95 (1 = off)")
    t.add_argument("--top-k", type=int, help="default 50 (0 = off)")
    t.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    t.add_argument("--num-return-sequences", type=int, default=1, help="continuations per prompt")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_generate)

    t = sub.add_parser("export", help="write a Hugging Face model directory from a checkpoint (any ZeRO stage)")
    t.add_argument("checkpoint", help="a run directory or a checkpoint directory")
    t.add_argument("--out", required=True)
    t.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="the weights' precision in the export",
    )
    t.add_argument("--max-shard-size", default="2GB", help="safetensors shard size limit, e.g. 500MB")
    t.add_argument(
        "--provenance", choices=["public", "full"], default="public",
        help="public (default): no local paths in the export, the data and tokenizer named by their fingerprints; "
             "full: the local paths too (the run directory keeps them anyway)",
    )  # fmt: skip
    t.set_defaults(func=_export)

    ln = sub.add_parser("launch", help="submit training to a cluster").add_subparsers(dest="where", required=True)
    t = ln.add_parser("slurm", help="submit to SLURM with submitit (one task per GPU; requeue on preemption)")
    t.add_argument("--config", help="a YAML config file (see configs/)")
    t.add_argument("overrides", nargs="*", help="section.key=value training overrides")
    t.add_argument("--nodes", type=int, default=1, help="nodes for the job")
    t.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU (0: CPU tasks)")
    t.add_argument("--tasks-per-node", type=int, default=0, help="CPU tasks per node when there are no GPUs")
    t.add_argument("--cpus-per-task", type=int, help="CPU cores per task (the loader's workers and the step's "
                   "threads); default: 8, or a node's CPUs over its tasks where the partition's nodes have "
                   "fewer")  # fmt: skip
    t.add_argument("--mem-gb", type=float, default=0, help="memory per node (0: the partition's default)")
    t.add_argument("--partition")
    t.add_argument("--account")
    t.add_argument("--qos")
    t.add_argument("--constraint")
    t.add_argument("--time", type=int, default=24 * 60, help="time limit in minutes")
    t.add_argument("--job-name", default="dist-clm", help="the job's name in the queue")
    t.add_argument("--log-folder", help="default: RUN/slurm")
    t.add_argument("--max-requeues", type=int, default=10, help="preemptions/time limits to come back from")
    t.add_argument("--signal-delay", type=int, default=120, help="seconds before the time limit to checkpoint")
    t.add_argument("--sbatch", action="append", help="an extra sbatch option KEY=VALUE, KEY= for a flag (repeatable)")
    t.add_argument("--sweep", action="append", help="an override set, quoted (repeat: one job array member each)")
    t.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    t.add_argument("--no-plan-check", action="store_true", help="submit even where the memory plan (dist-clm plan) "
                   "says the run does not fit the nodes")  # fmt: skip
    t.add_argument("--wait", action="store_true", help="wait for the jobs and print their results")
    t.set_defaults(func=_launch_slurm)

    t = sub.add_parser(
        "quickstart", help="tokenizer -> prepare -> train -> eval -> generate -> export, embedded corpus"
    )
    t.add_argument("--dir", default="runs/quickstart", help="where everything goes")
    t.add_argument("overrides", nargs="*", help="training overrides, e.g. train.max_steps=50")
    t.set_defaults(func=_quickstart)
    _show_defaults(p)
    return p


SILENT_RANK_WAIT_S = 90  # longer than any start skew between the ranks of one node, even on a busy machine


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [x for x in argv if not x.startswith("--local_rank")]  # the deepspeed launcher adds it; env has it
    console.quiet_library_noise()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        console.error(e)
        if console.silent_before_group(e):
            # a launcher ends every rank when one exits: leaving first could end rank 0 before it writes the
            # sentence; rank 0 fails the same check, and its exit ends this wait. Still here: rank 0 did not
            # say it, so this rank does rather than lose it
            import time

            time.sleep(SILENT_RANK_WAIT_S)
            console.error(e, unheard=True)
        return e.exit_code
    except KeyboardInterrupt:
        console.warning("interrupted; nothing partial was kept.")
        return 130
    return 0


def entry() -> None:
    """Console-script entry point."""
    from dist_clm.parallel.process_group import keep_group_at_exit, lean_imports, shutdown

    lean_imports()
    code = main()
    if code == PeerLost.exit_code:
        keep_group_at_exit()  # (with peers gone, tearing the group down could wait on them)
    shutdown()
    # end as Python would (exit handlers run, streams flushed) but without the C++ static destructors, where a
    # library's thread left joinable aborts the process ("terminate called without an active exception") and
    # replaces the exit code, which launchers and SLURM act on, with SIGABRT
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
