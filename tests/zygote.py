"""The test suite's way to run a `dist-clm` command in a fresh process without paying the interpreter's start-up
and the imports (torch, transformers, DeepSpeed, streaming: ~5 s a command on 2 cores) every time.

`python -m tests.zygote SOCKET` imports what the commands import, once, and then only forks: for each request
(the arguments, the environment, the working directory, two files for stdout and stderr) a fresh process is
forked that sets those and runs the console script's own entry point (`dist_clm.cli.entry`), exactly what the
installed `dist-clm` runs, and exits with its exit code. The process that ran the command is new and alone
(its own pid, files, signals and exit); only the import step is shared, and it happened in a process that
ran nothing else: no Python thread, no torch computation, no logging set up before the fork.

Each request is served by a small middle process: it forks the command, sends its pid, waits for it and sends
its exit status (a negative signal number when a signal ended it), so that a command killed by a signal is
reported as subprocess.run reports it. The test side is `helpers.run_cli` (`Zygote.run`); `shim()` writes a
`dist-clm` executable that forwards its own command line, environment, directory and standard streams to a
running zygote, for tests that run commands through a shell (the README's).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import traceback

# what `dist-clm` commands import, at module level or when they run (DeepSpeed's engine, the model classes)
PRELOAD = (
    "dist_clm.cli",
    "dist_clm.training.loop",
    "dist_clm.training.setup",
    "dist_clm.evaluation.export",
    "dist_clm.evaluation.perplexity",
    "dist_clm.evaluation.generate",
    "dist_clm.evaluation.downstream",
    "dist_clm.data.prepare",
    "dist_clm.data.tokenizer",
    "dist_clm.data.audit",
    "dist_clm.data.synthetic",
    "dist_clm.launch.slurm",
    "deepspeed.runtime.engine",
    "deepspeed.runtime.zero.stage_1_and_2",
    "deepspeed.runtime.zero.stage3",
    "deepspeed.checkpoint",
    "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.llama.modeling_llama",
    "torch.utils.tensorboard",
    "streaming",
    "datasets",
    "safetensors.torch",
)


def preload() -> None:
    import importlib

    from dist_clm.parallel.process_group import import_deepspeed, lean_imports, use_cpu_accelerator_if_no_gpu

    lean_imports()  # (as the commands' entry point does)
    use_cpu_accelerator_if_no_gpu()
    import_deepspeed()  # (without its autotuner's mlflow import, as the commands import it)
    for name in PRELOAD:
        importlib.import_module(name)
    # a fork copies the calling thread only: a Python thread holding a lock would leave it held in the child
    # (the native threads some libraries start at import, torch's and jemalloc's, are made to survive a fork:
    # every DataLoader worker and multiprocessing pool forks from such a process)
    if threading.active_count() != 1:
        raise SystemExit(f"zygote: the imports started {threading.active_count() - 1} Python threads")


def run_command(request: dict) -> None:
    """In the forked process: become the command, run it, and exit with its code (never returns)."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.argv = [request["argv0"], *request["args"]]
        from dist_clm.cli import entry

        entry()  # (ends the process itself: os._exit with the command's code)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 (as the interpreter does with an uncaught exception)
        traceback.print_exc()
    try:
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def serve_one(conn: socket.socket, request: dict) -> None:
    """In the middle process: fork the command, tell its pid, wait, tell its status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # (the zygote ignores it; the command and its waits must not)
    pid = os.fork()
    if pid == 0:
        conn.close()
        run_command(request)
    conn.sendall(f"pid {pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    conn.sendall(f"status {code}\n".encode())
    conn.close()
    os._exit(0)


def ask(path: str, request: dict, started=None, timeout: float | None = None) -> int:
    """The client: send `request` to the zygote listening on `path`, call `started(pid)` once the command runs,
    return its exit status (negative: the signal that ended it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall((json.dumps(request) + "\n").encode())
        replies = s.makefile("r")
        pid = int(replies.readline().split()[1])
        if started:
            started(pid)
        s.settimeout(timeout)
        return int(replies.readline().split()[1])


def forward(path: str) -> None:
    """The shim's body: run this process's own command line in a process forked from the zygote, with this
    process's environment and directory, writing to this process's stdout and stderr (reopened through /proc:
    a pipe stays the same pipe); signals that end a shell's child are passed on; exit as the command did."""
    me = os.getpid()
    request = {"args": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd(), "argv0": sys.argv[0],
               "stdout": f"/proc/{me}/fd/1", "stderr": f"/proc/{me}/fd/2"}  # fmt: skip
    child = []

    def pass_on(signum, _frame):
        if child:
            os.kill(child[0], signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, pass_on)
    code = ask(path, request, child.append)
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(me, -code)
    sys.exit(code)


def shim(directory, socket_path: str):
    """Write DIRECTORY/dist-clm: an executable that runs `dist-clm ARGS` through the zygote at `socket_path` (put
    DIRECTORY first on PATH). It starts Python without site (~20 ms) and imports only this module's stdlib."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    exe = Path(directory) / "dist-clm"
    exe.write_text(f"#!{sys.executable} -S\nimport sys\nsys.path.insert(0, {str(repo)!r})\n"
                   f"from tests.zygote import forward\nforward({socket_path!r})\n")  # fmt: skip
    exe.chmod(0o755)
    return exe


def serve(path: str) -> None:
    preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # middle processes are reaped by the kernel
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn.makefile("r") as f:
            request = json.loads(f.readline())
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            listener.close()
            serve_one(conn, request)
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
