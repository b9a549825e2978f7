"""DeepSpeed's compiled ops (its shared-memory collectives on CPU, CPU Adam): where torch builds them, and one
line before a build instead of a silent minute and a "built successfully" after every start.

torch builds a JIT extension in TORCH_EXTENSIONS_DIR (default: one folder per Python and CUDA version) and
rebuilds it whenever its sources or flags change; DeepSpeed's flags name its installation's path. Two
installations sharing the folder (two checkouts, two virtual environments) therefore rebuilt the op in turn,
40-120 s on every start. Unless the user sets TORCH_EXTENSIONS_DIR, each installation gets its own folder; and
the environment's own ninja builds it, whether or not the environment is activated (ninja versions disagree on
whether a build is up to date).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from dist_clm import console

SHM_OP = "deepspeed_shm_comm"  # the CPU collectives' op (deepspeed/comm/torch.py builds it at init)


def op_home(environ: dict | None = None, installation: str | None = None) -> Path:
    """The folder torch builds DeepSpeed's ops in: TORCH_EXTENSIONS_DIR if set, else one in torch's default cache
    named after this DeepSpeed installation, this Python and this torch."""
    environ = os.environ if environ is None else environ
    if environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(environ["TORCH_EXTENSIONS_DIR"])
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if installation is None:
        spec = importlib.util.find_spec("deepspeed")
        installation = str(Path(spec.origin).parent) if spec and spec.origin else "deepspeed"
    key = f"{installation}|{sys.version_info[0]}.{sys.version_info[1]}|{torch.__version__}"
    return Path(get_default_build_root()) / f"dist_clm-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def use_own_op_home() -> Path:
    """Point torch's extension builds at op_home() for this process and the ones it starts, built by this
    environment's own ninja (`environment_ninja_first`)."""
    home = op_home()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(home)
    environment_ninja_first(os.environ)
    return home


def environment_ninja_first(environ, bin_dir: Path | None = None) -> None:
    """Put the Python environment's bin folder first on PATH when it holds a ninja (the `ninja` wheel torch and
    DeepSpeed depend on). torch runs whichever `ninja` PATH finds, and ninja versions hash a build's command
    differently (1.11 and 1.13 do): a process run from an activated environment and one run without (the
    system's ninja) rebuilt the op in turn, a minute each time."""
    bin_dir = bin_dir or Path(sys.executable).parent
    if not (bin_dir / "ninja").is_file():
        return
    parts = [p for p in environ.get("PATH", "").split(os.pathsep) if p]
    if parts[:1] != [str(bin_dir)]:
        environ["PATH"] = os.pathsep.join([str(bin_dir), *(p for p in parts if p != str(bin_dir))])


def build_notice(home: Path, op: str = SHM_OP) -> str | None:
    """The line to print before torch builds `op` in `home` (None when a build is there already)."""
    if (home / op).is_dir() and any((home / op).glob(f"{op}*.so")):
        return None
    return (
        f"building DeepSpeed's {op} op (its CPU collectives) with the C++ compiler, once for this installation "
        f"(about a minute; in {home})"
    )


def quiet_build_report():
    """Drop DeepSpeed's "DeepSpeed ... built successfully" (printed on every start, built or not)."""
    return console.without_lines("stdout", " built successfully")


def announce_build(local_rank: int) -> None:
    """Before DeepSpeed's CPU init: one line from each node's first rank when its op is not built yet."""
    notice = build_notice(op_home())
    if notice and local_rank == 0:
        console.info(notice, every_rank=True)
