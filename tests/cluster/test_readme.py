"""The README runs as written: every command of its bash blocks, in order, in a scratch directory laid out like
a clone (configs/, README.md) holding the inputs the README names as the user's own (corpus/, held_out/,
prompts.txt, a bucket with web/*.jsonl on the local S3 server), with the SLURM lines on the local cluster. The runs
are shrunk only by DIST_CLM_OVERRIDES, which the README documents; `dist-clm` runs as in every other test of the
suite, forked from the suite's zygote with its imports done (tests/zygote.py), which saves ~5 s a command. A
command that cannot run on a machine like CI's (a GPU partition, a download, Docker) is listed below with the
reason; a server (TensorBoard, the MLflow UI) runs until it answers on its port. A README edit that breaks a
command, or names a command this list no longer matches, fails here."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import BIN, ROOT, corpus_files, dist_clm_shim, needs_slurm

README = ROOT / "README.md"
# what the README's shrinking variable sets here: a few steps per run, little validation
SHRINK = {"DIST_CLM_OVERRIDES": "train.max_steps=4 train.eval_blocks=2 train.eval_tasks_limit=8"}
# commands (by a fragment) that cannot run on a 2-core machine without GPUs, network or Docker: why
NOT_HERE = {
    "--gpus-per-node 8 --partition gpu": "needs a partition of GPU nodes",
    "--tasks hellaswag arc_easy": "downloads its tasks from the Hugging Face Hub",
    "wandb sync": "uploads to wandb's servers",
    "docker build": "needs Docker",
    "docker run --gpus all": "needs Docker and GPUs",
}
SERVERS = {"tensorboard --logdir": 6006, "mlflow ui": 5000}  # started, asked for a page, stopped


def commands(text: str) -> list[str]:
    """Each command of the README's bash blocks, in order: continuation lines joined, comment lines dropped (a
    comment after a command is bash's to drop)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        pending = ""
        for line in block.splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            out.append(pending + line)
            pending = ""
    return out


def scratch_clone(root: Path) -> None:
    """The directory the commands run in: a clone's configs/ and README.md, and the user's inputs."""
    (root / "configs").symlink_to(ROOT / "configs")
    shutil.copy(README, root / "README.md")
    files = corpus_files(120)
    for i, f in enumerate(files[:100]):
        part = root / "corpus" / f"part{i % 3}"
        part.mkdir(parents=True, exist_ok=True)
        (part / f"{f.stem}.txt").write_text(f.read_text())
    (root / "held_out").mkdir()
    for f in files[100:110]:
        (root / "held_out" / f"{f.stem}.txt").write_text(f.read_text())
    (root / "prompts.txt").write_text("def \nimport os\nclass \n")


def upload_web_corpus(s3, bucket: str) -> None:
    import contextlib
    import json

    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
        s3.create_bucket(Bucket=bucket)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):  # (an earlier run's outputs go)
        for item in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=item["Key"])
    for i, f in enumerate(corpus_files(30, skip=120)):
        body = json.dumps({"text": f.read_text()}) + "\n"
        s3.put_object(Bucket=bucket, Key=f"web/{i:03d}.jsonl", Body=body.encode())


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def run_server(command: str, port: int, cwd: Path, env: dict) -> str:
    """Start `command`, wait until its page answers on `port`, stop it; '' or what went wrong."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            return f"port {port} is taken"
    proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if answers(port):
                return ""
            if proc.poll() is not None:
                return f"exited {proc.returncode}: {proc.stdout.read()[-2000:]}"
            time.sleep(0.5)
        return f"did not answer on port {port} within 90 s"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)


def test_the_readme_commands_list_is_what_this_test_expects():
    """The README documents the variable that shrinks it, and every exception here still names a README command
    (one each): the list cannot rot into skipping something else."""
    text = README.read_text()
    listed = commands(text)
    assert len(listed) >= 40
    for variable in SHRINK:
        assert variable in text
    for fragment in [*NOT_HERE, *SERVERS]:
        assert sum(fragment in c for c in listed) == 1, fragment
    assert not any("[" in c and "]" in c and "--" in c.split("[", 1)[1] for c in listed if "=[" not in c), (
        "an optional flag in brackets is not a command"
    )


@pytest.mark.timeout(1800)
def test_every_readme_command_runs_as_written(tmp_path, s3):
    needs_slurm("debug")
    upload_web_corpus(s3, "bucket")
    scratch_clone(tmp_path)
    shims = tmp_path / ".bin"
    shims.mkdir()
    dist_clm_shim(shims)
    env = {**os.environ, **SHRINK, "PATH": f"{shims}:{BIN}:{os.environ['PATH']}", "DIST_CLM_PROGRESS_SECONDS": "60"}
    env.pop("PYTEST_CURRENT_TEST", None)
    timings, skipped = [], []
    for command in commands(README.read_text()):
        reason = next((why for fragment, why in NOT_HERE.items() if fragment in command), None)
        if reason:
            skipped.append(f"{command[:60]}... ({reason})")
            continue
        started = time.perf_counter()
        port = next((p for fragment, p in SERVERS.items() if fragment in command), None)
        if port:
            problem = run_server(command, port, tmp_path, env)
            assert not problem, f"README command failed: {command}\n{problem}"
        else:
            r = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=900)  # fmt: skip
            out = r.stdout[-3000:] + r.stderr[-3000:]
            assert r.returncode == 0, f"README command failed (exit {r.returncode}): {command}\n{out}"
            assert "Traceback" not in r.stderr, f"README command printed a traceback: {command}\n{out}"
        timings.append((time.perf_counter() - started, command[:90]))
    print("\n".join(f"{s:6.1f} s  {c}" for s, c in timings))
    print(f"total {sum(s for s, _ in timings):.0f} s; not run here: {skipped}")
    assert len(skipped) == len(NOT_HERE)
