"""What building and loading a model costs each rank's memory, by ZeRO stage, number of ranks and model size, in
one run on this machine's CPU, side by side:

    stage 2   every rank builds (and loads) the whole model in fp32, as every stage did before partitioned
              construction
    stage 3   the model built under deepspeed.zero.Init, or loaded shard by shard, each rank keeping its share
              (parallel/partitioned.py)

Each figure is the peak resident memory of a rank above what it held just before the build (sampled every few
milliseconds while the build runs, after a small build has done what a first build does once, imports), with
every large allocation its own mapping (MALLOC_MMAP_THRESHOLD_), so that freed memory is not counted. The model
is built as training builds it (training/setup.py, before the engine); "load" reads the same model back from a
pretrained directory in 20 MB safetensors shards. A ZeRO-2 load leaves the weights in the memory-mapped files
until the engine first copies them (so its figure here is small: the cost comes at deepspeed.initialize).

    python bench/model_memory.py [--markdown] [--layers 8,16] [--data DIR]

Worker mode (what each rank runs under torchrun; the tests run it too):

    torchrun --nproc_per_node N bench/model_memory.py --worker OUT.json PRETRAINED_DIR [dist_clm overrides]
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import threading
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import psutil  # noqa: E402

from dist_clm.config import load_config  # noqa: E402
from dist_clm.parallel import process_group  # noqa: E402
from dist_clm.parallel.partitioned import is_partitioned  # noqa: E402
from dist_clm.training.setup import _checked  # noqa: E402


class Peak:
    """The largest resident set seen while the block runs, above the one at its start."""

    def __enter__(self):
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # (what an earlier build freed goes back to the system)
        self.me, self.done = psutil.Process(), threading.Event()
        self.start = self.top = self.me.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.003):
            self.top = max(self.top, self.me.memory_info().rss)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.top = max(self.top, self.me.memory_info().rss)
        self.above = self.top - self.start


def main(out: str, pretrained: str, overrides: list[str]) -> None:
    env = process_group.init()
    world = process_group.world_table(env)
    # a small build first: what the first build imports and sets up once is not the model's memory
    small = ["model.overrides.num_hidden_layers=1", "model.overrides.intermediate_size=64"]
    _checked(load_config(None, [*overrides, *small]), env, world)
    found = {}
    for name, extra in (("preset", []), ("pretrained", [f"model.pretrained={pretrained}"])):
        cfg = load_config(None, [*overrides, *extra])
        with Peak() as peak:
            model = _checked(cfg, env, world)[3]
        found[name], found["partitioned"] = peak.above, is_partitioned(model)
        del model
    if env.is_main:
        with open(out, "w") as f:
            json.dump(found, f)
    time.sleep(0.1)


SHAPE = {"hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 4096}


def overrides_for(layers: int, data: str, stage: int, run_dir: str) -> list[str]:
    shape = {**SHAPE, "num_hidden_layers": layers}
    return ["model.preset=tiny-llama", *(f"model.overrides.{k}={v}" for k, v in shape.items()), f"data.path={data}",
            "data.block_size=64", f"distributed.zero_stage={stage}", f"run.dir={run_dir}"]  # fmt: skip


def save_pretrained(layers: int, data: str, out: str) -> int:
    """A fresh model of the bench's shape saved to `out` in 20 MB shards; its parameter count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_clm.models.build import count_params, preset_config

    tok = AutoTokenizer.from_pretrained(os.path.join(data, "tokenizer"))
    config = preset_config("tiny-llama", {**SHAPE, "num_hidden_layers": layers}, len(tok), tok.bos_token_id,
                           tok.eos_token_id)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out, max_shard_size="20MB")
    return count_params(model)


def measure(launches: list[tuple[int, list[str]]], pretrained: str, scratch: str) -> list[dict]:
    """The worker's figures for each launch of (ranks, overrides), the launches run at once (each rank's memory
    is its own; the machine's cores are shared, which changes the time only)."""
    import subprocess

    from dist_clm.parallel.process_group import free_port

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MALLOC_MMAP_THRESHOLD_": "65536"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    outs = [os.path.join(scratch, f"found_{i}.json") for i in range(len(launches))]
    running = [
        subprocess.Popen(
            [
                torchrun,
                "--nproc_per_node",
                str(ranks),
                "--master_port",
                str(free_port()),
                __file__,
                "--worker",
                out,
                pretrained,
                *overrides,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for (ranks, overrides), out in zip(launches, outs, strict=True)
    ]
    errors = [p.communicate()[1] for p in running]
    for p, err in zip(running, errors, strict=True):
        if p.returncode:
            sys.exit(err[-3000:])
    found = []
    for out in outs:
        with open(out) as f:
            found.append(json.load(f))
    return found


def bench() -> None:
    import argparse
    import platform
    import tempfile

    from tables import render

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="8,16", help="model sizes, as layers of width 1024")
    p.add_argument("--data", required=True, help="a prepared directory (its tokenizer sets the vocabulary)")
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for layers in (int(x) for x in a.layers.split(",")):
            pretrained = os.path.join(scratch, f"pretrained_{layers}")
            n = save_pretrained(layers, a.data, pretrained)
            ways = ((2, 1), (3, 1), (3, 2))
            launches = [(ranks, overrides_for(layers, a.data, stage, f"{scratch}/run{stage}{ranks}"))
                        for stage, ranks in ways]  # fmt: skip
            results = measure(launches, pretrained, scratch)
            whole = results[1]  # (one rank holds the whole model; a ZeRO-2 load maps its files, untouched)
            for (stage, ranks), found in zip(ways, results, strict=True):
                figures = [f"{found[w] / 2**20:.0f} ({found[w] / whole[w]:.2f})" for w in ("preset", "pretrained")]
                rows.append([f"{n / 1e6:.0f} M", f"ZeRO-{stage}", str(ranks), f"{n * 4 / 2**20:.0f}", *figures])
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs: peak MiB per rank above the "
        "build's start, and its ratio to one ZeRO-3 rank's (the whole model)"
    )
    print(render(["model", "stage", "ranks", "fp32 MiB", "build (ratio)", "load (ratio)"], rows, a.markdown))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        main(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        bench()
