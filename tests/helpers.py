"""What several test modules share: the tiny model's settings, running the real commands, reading a run's
metrics and checkpoints, comparing weights, and the assertions for clean errors and loadable exports."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = [
    "model.preset=tiny",
    "model.overrides.n_embd=64",
    "model.overrides.n_positions=128",
    "data.block_size=64",
    "train.micro_batch_size=4",
    "optim.warmup_steps=2",
    "optim.lr=3e-3",
    "train.eval_blocks=8",
    "run.progress_bar=false",
]


# ---- running the real commands


def bench_module(name: str = "gpu_throughput"):
    """A bench/ script as a module (the scripts import each other by name: bench/ goes on sys.path)."""
    import importlib.util

    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (a module's dataclasses look themselves up there)
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str, timeout: int = 600, env: dict | None = None, cwd: Path | None = None, fresh: bool = False):
    """Run `dist-clm ARGS` in a new process, the way a user does; returns the CompletedProcess. The process is
    forked from the suite's zygote (tests/zygote.py: the imports done once), unless `fresh` (or
    DIST_CLM_TESTS_FRESH is set): then it is the installed console script started from scratch."""
    full_env = {**os.environ, **(env or {})}
    if fresh or os.environ.get("DIST_CLM_TESTS_FRESH"):  # (set it to start every command from scratch)
        return subprocess.run(
            [str(BIN / "dist-clm"), *args], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd
        )
    return _zygote().run(list(args), full_env, Path(cwd or os.getcwd()), timeout)


class Zygote:
    """The client side of tests/zygote.py: one server per test session, started at the first command."""

    def __init__(self):
        import atexit
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="zygote_"))
        self.path = self.dir / "socket"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.zygote", str(self.path)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        atexit.register(self.stop)
        ready = self.proc.stdout.readline().strip()
        assert ready == "ready", f"the zygote did not start: {ready!r} (exit {self.proc.poll()})"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def run(self, args: list[str], env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        import signal
        import tempfile

        from tests.zygote import ask

        argv = [str(BIN / "dist-clm"), *args]
        with tempfile.TemporaryDirectory(dir=self.dir) as d:
            out, err = Path(d) / "stdout", Path(d) / "stderr"
            request = {"args": args, "env": env, "cwd": str(cwd), "stdout": str(out), "stderr": str(err),
                       "argv0": argv[0]}  # fmt: skip
            pid = []
            try:
                code = ask(str(self.path), request, pid.append, timeout)
            except TimeoutError:
                os.kill(pid[0], signal.SIGKILL)
                raise subprocess.TimeoutExpired(argv, timeout, _text(out), _text(err)) from None
            return subprocess.CompletedProcess(argv, code, _text(out), _text(err))


def _text(path: Path) -> str:
    """A file's text as subprocess.run(text=True) gives a pipe's: universal newlines."""
    text = path.read_bytes().decode(errors="replace") if path.exists() else ""
    return text.replace("\r\n", "\n").replace("\r", "\n")


_ZYGOTE: Zygote | None = None


def dist_clm_shim(directory: Path) -> Path:
    """DIRECTORY/dist-clm, which runs its command through the suite's zygote (tests/zygote.py `shim`), for
    commands run by a shell; put DIRECTORY first on PATH. Under DIST_CLM_TESTS_FRESH it is the installed one."""
    from tests.zygote import shim

    if os.environ.get("DIST_CLM_TESTS_FRESH"):
        (directory / "dist-clm").symlink_to(BIN / "dist-clm")
        return directory / "dist-clm"
    return shim(directory, str(_zygote().path))


def _zygote() -> Zygote:
    global _ZYGOTE
    if _ZYGOTE is None or _ZYGOTE.proc.poll() is not None:
        _ZYGOTE = Zygote()
    return _ZYGOTE


def launch(launcher: list[str], *overrides: str, timeout: int = 600, env: dict | None = None):
    """`dist_clm train OVERRIDES` under a launcher command (deepspeed, torchrun or python); asserts success."""
    r = subprocess.run(
        [*launcher, "--module" if launcher[0].endswith("deepspeed") else "-m", "dist_clm", "train", *overrides],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def resume_moved(run: Path, moved: Path, launcher: list[str], *overrides: str, last: int):
    """Copy RUN to MOVED without its step-LAST checkpoint and resume it there under another launcher (another
    number of ranks: DeepSpeed's universal checkpoint carries the state over); (the resumed steps' losses, the
    process)."""
    shutil.copytree(run, moved)
    shutil.rmtree(moved / "checkpoints" / f"step_{last:08d}")
    skip = len(metrics(moved))
    r = launch(launcher, *overrides, f"run.dir={moved}")
    assert "universal checkpoint" in r.stdout + r.stderr
    return train_losses(metrics(moved, skip)), r


def assert_clean_error(r, *fragments):
    """The command failed the way a user error must: exit 2, one `dist-clm: error:` sentence holding each of
    `fragments`, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("dist-clm: error:")]
    assert len(errors) == 1, r.stderr[-2000:]
    for f in fragments:
        assert f in errors[0], errors[0]
    assert errors[0].endswith(".")


# ---- inputs


def corpus_files(n: int = 40, skip: int = 0) -> list[Path]:
    """Real text nobody here wrote: `n` standard-library modules of moderate size (after the first `skip`)."""
    from dist_clm.data.sources import default_corpus_files

    files = [f for f in default_corpus_files() if 2_000 < f.stat().st_size < 40_000]
    return files[skip : skip + n]


def without_eos(src, dst):
    """A copy of a tokenizer directory whose config names no end-of-text token."""
    dst.mkdir()
    for f in src.iterdir():
        dst.joinpath(f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    for key in ("eos_token", "bos_token", "unk_token"):
        cfg.pop(key, None)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    sm = dst / "special_tokens_map.json"
    if sm.exists():
        sm.write_text("{}")
    return dst


def read_split(path: Path):
    """A prepared split's chunks through streaming's own StreamingDataset (a plain reader, not ours)."""
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(path), shuffle=False, batch_size=1)
    return [ds[i] for i in range(ds.num_samples)]


# ---- shared memory

SHM = Path("/dev/shm")


def _held_by_others() -> set[str]:
    """Names in /dev/shm that another live process maps or holds open: a test running beside this one."""
    names = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/maps") as f:
                names |= {line.split("/dev/shm/", 1)[1].removesuffix(" (deleted)") for line in f.read().splitlines()
                          if "/dev/shm/" in line}  # fmt: skip
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("/dev/shm/"):
                        names.add(target.removeprefix("/dev/shm/"))
    return names


def new_in_shared_memory(before: set[str]) -> set[str]:
    """What appeared in /dev/shm since `before` and stays with no other process holding it: what this test's
    processes left. A segment a concurrent test's live process holds is that test's (make test runs two at once)."""
    new = set(os.listdir(SHM)) - before
    return {n for n in new - _held_by_others() if (SHM / n).exists()} if new else set()


# ---- a run's outputs


def metrics(run: Path, skip: int = 0) -> list[dict]:
    """The rows of RUN/metrics.jsonl after the first `skip`."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[skip:]]


def train_losses(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def run_probe(module: str, tmp_path: Path) -> dict:
    """A probe module (tests/*_probe.py) run under torchrun on 2 ranks; the differences it found (its JSON)."""
    from dist_clm.parallel.process_group import free_port

    out = tmp_path / "probe.json"
    r = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
                        module, str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text())


def kill_then_resume(cmd: list[str], run: Path, step: int) -> None:
    """Start a torchrun training `cmd` writing to `run`, kill -9 its whole process group once step `step` has
    been logged, then run it again to its end (a new port), which must resume from a checkpoint."""
    import signal

    from dist_clm.parallel.process_group import free_port

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if (run / "metrics.jsonl").is_file() and step in train_losses(metrics(run)):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    cmd[cmd.index("--master_port") + 1] = str(free_port())
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr


def checkpoint_dir(run: Path, step: int) -> Path:
    from dist_clm.checkpointing.checkpointer import checkpoints_dir, tag_for

    return checkpoints_dir(run) / tag_for(step)


def last_checkpoint(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step_*"))[-1]


def weights(run: Path, step: int) -> dict:
    """The consolidated fp32 weights of the checkpoint at `step`."""
    from dist_clm.evaluation.export import load_state_dict

    return load_state_dict(checkpoint_dir(run, step))


def train_state(run: Path, step: int) -> dict:
    """The parts' states saved in the checkpoint at `step`, by part (progress, settings, data, guard)."""
    return json.loads((checkpoint_dir(run, step) / "train_state.json").read_text())["parts"]


def same(a: dict, b: dict) -> bool:
    """Two state dicts hold the same tensors, bit for bit."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- exports


def independent_model(tag_dir):
    """The checkpoint's weights via DeepSpeed's own consolidation (ZeRO 1-3; ZeRO 0: the module's weights in
    its model-states file, read with plain torch.load), in a model built from its config.json."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    if json.loads((tag_dir / "complete.json").read_text())["zero_stage"] == 0:
        sd = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(tag_dir)))
    model.load_state_dict(sd, strict=False)
    model.tie_weights()
    return model.eval()


def check_export(out, tag_dir):
    """`out` loads in transformers with the checkpoint's logits, and pipeline() generates with it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token_id == hf.generation_config.eos_token_id
    ids = torch.tensor([tok("def main():\n    return 1\n").input_ids])
    with torch.no_grad():
        assert (hf(ids).logits - independent_model(tag_dir)(ids).logits).abs().max().item() <= 1e-5
    # its generation config is consistent: greedy by default, no sampling flag for generate() to ignore
    # (transformers < 5's text-generation pipeline adds a temperature of its own; that one is not the export's)
    hf.generation_config.validate(strict=True)
    assert not hf.generation_config.do_sample
    generator = pipeline("text-generation", model=str(out), device="cpu")
    text = generator("import ", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("import ") and len(text) > len("import ")


# ---- the local SLURM cluster (launchers/local_slurm/start.sh)


def slurm_up(partition: str = "debug") -> bool:
    if shutil.which("sbatch") is None:
        return False
    if "is UP" not in subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout:
        return False
    return bool(subprocess.run(["sinfo", "-h", "-p", partition], capture_output=True, text=True).stdout.strip())


def needs_slurm(partition: str = "debug") -> None:
    """Skip without a cluster (with that partition), except under CI, where it is a failure."""
    if slurm_up(partition):
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the SLURM tests (partition {partition}): .ci/run starts a cluster with "
                    "launchers/local_slurm/start.sh")  # fmt: skip
    pytest.skip("no SLURM cluster here: start one with `bash launchers/local_slurm/start.sh` (as root)")


def wait_for(condition, what: str, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def logged_steps(run) -> list[int]:
    """Every step with a train/loss row, in the order logged (a resume logs steps again)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if "train/loss" in line]


def restarts(job_id: str) -> int:
    r = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    for field in r.stdout.split():
        if field.startswith("Restarts="):
            return int(field.split("=")[1])
    return -1


def running(job_id: str) -> bool:
    r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return r.stdout.strip() == "RUNNING"


SLURM_DIR = Path(os.environ.get("DIST_CLM_SLURM_DIR", "/tmp/dist-clm-slurm"))


def node_tasks(node: str) -> list[int]:
    """The pids of the job tasks running on SLURM node `node` of the local cluster (they carry its name)."""
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("SLURMD_NODENAME") == node and p.name().startswith("python"):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def kill_node(node: str) -> None:
    """The node dies: its slurmd, its job step daemons and tasks, all at once (SIGKILL)."""
    import psutil

    victims = set(node_tasks(node))
    for pid in list(victims):
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(pid).parent()
            if parent is not None and parent.name() == "slurmstepd":
                victims.add(parent.pid)
    victims.add(int((SLURM_DIR / "run" / f"slurmd.{node}.pid").read_text().strip()))
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


def restore_node(node: str) -> None:
    """Start the node's slurmd again (if it is not running) and wait until SLURM takes it back."""
    conf = SLURM_DIR / "slurm.conf"
    alive = subprocess.run(["pgrep", "-f", f"slurmd -f {conf} -N {node}$"], capture_output=True).returncode == 0
    if not alive:
        subprocess.run(["slurmd", "-f", str(conf), "-N", node], check=True, env={**os.environ, "SLURM_CONF": str(conf)})

    def state() -> str:
        return subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%T"], capture_output=True, text=True).stdout

    if "idle" not in state() and "alloc" not in state():
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)
    wait_for(lambda: any(s in state() for s in ("idle", "alloc", "mix")), f"node {node} back", 60)


# ---- the S3-compatible server (launchers/local_s3/start.sh)

ROOT = Path(__file__).resolve().parents[1]
S3_DIR = Path(os.environ.get("DIST_CLM_S3_DIR", "/tmp/dist-clm-s3"))
BUCKET = "dist-clm-tests"


def server_env() -> dict:
    env = {}
    for line in (S3_DIR / "env").read_text().splitlines():
        key, value = line.removeprefix("export ").split("=", 1)
        env[key] = value.split(":-", 1)[1].rstrip("}") if value.startswith("${") else value
    return env


def start_server() -> dict:
    r = subprocess.run(["bash", str(ROOT / "launchers/local_s3/start.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return server_env()


# ---- a model without a tokenizer


class FakeTokenizer:
    """Only what build_model reads of a tokenizer: its length and special ids."""

    def __init__(self, n):
        self.n, self.bos_token_id, self.eos_token_id = n, 0, 0

    def __len__(self):
        return self.n


# ---- a prepare in parts

PARTS_OPTS = dict(chunk_tokens=700, shard_bytes=1 << 13, val_fraction=0.2, num_proc=1, progress=False)
PARTS_CLI_OPTS = ["--chunk-tokens", "700", "--shard-mb", str(1 / 128), "--val-fraction", "0.2", "--num-proc", "1",
                  "--quiet"]  # fmt: skip


def documents(data: Path | str, split: str) -> list[tuple[int, ...]]:
    """A split's documents (token ids), sorted: the multiset, whatever the order and the chunking."""
    from dist_clm.data.format import read_manifest
    from dist_clm.data.stream import TokenStream

    m = read_manifest(data)
    stream = TokenStream(data, split, m)
    ids, starts = stream.read(0, stream.tokens, with_starts=True)
    cuts = [*starts.tolist(), len(ids)]
    return sorted(tuple(ids[a:b].tolist()) for a, b in zip(cuts, cuts[1:], strict=False))


def in_parts(tokenizer, out, inputs, tasks, **options) -> dict:
    """A prepare in `tasks` parts, every stage of every task in this process, then the merge."""
    from dist_clm.data.merge import merge
    from dist_clm.data.prepare import prepare_part

    for stage in ("hash", "dedup", "tokenize") if options.get("dedup") else ("tokenize",):
        for i in range(tasks):
            prepare_part(tokenizer, out, inputs, tasks, i, stage, **(PARTS_OPTS | options))
    return merge(str(out))


# ---- preference data (DPO, ORPO)

PREF_BLOCK = 128
TINY_PREF = ["model.preset=tiny", "model.overrides.n_embd=64", f"data.block_size={PREF_BLOCK}",
             "train.micro_batch_size=4", "optim.warmup_steps=2", "optim.lr=3e-3", "train.eval_blocks=2",
             "train.eval_every=0", "run.progress_bar=false", "train.log_every=10"]  # fmt: skip


def rebuilt(blocks: list[dict], dirs: dict) -> np.ndarray:
    """The token ids of `blocks` (as `dist-clm data batch --json` prints them), read from the training stream of
    each block's source (source name -> prepared directory in `dirs`) at its document pieces' ranges alone."""
    from dist_clm.data.stream import TokenStream

    streams = {name: TokenStream(d, "train", json.loads((Path(d) / "manifest.json").read_text()))
               for name, d in dirs.items()}  # fmt: skip
    return np.concatenate([streams[b["source"]].read(p["document"] + p["start"], p["end"] - p["start"])
                           for b in blocks for p in b["pieces"]])  # fmt: skip
