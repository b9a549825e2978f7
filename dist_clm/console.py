"""The one path from dist_clm to its user's console: a `logging` logger that knows the run, the rank and the
node.

`info` is what the run reports (on the main rank only: one line per event, not one per rank), on stdout;
`warning` is said by whichever process meets it, on stderr, starting `warning: `; `error` is the one line a
failing command ends with (`dist-clm: error: ...`). Once `bind` has told it the rank, the world size and the
node, a line from a process of a multi-rank run starts with `[rank R/W node]`, so a node's log or a SLURM
task's file says who spoke; a one-process run prints the text alone. Lines go through tqdm, so a progress bar
is not broken. Every record carries `rank`, `node` and `run` attributes: a handler a user adds to the
"dist_clm" logger (a file, a tracker) receives them too.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator

LOGGER = logging.getLogger("dist_clm")


class _Context(logging.Filter):
    """Adds who speaks to every record, and keeps the main-rank-only ones off the other ranks."""

    def __init__(self):
        super().__init__()
        self.rank, self.world, self.node, self.run = _env_rank(), _env_world(), socket.gethostname(), ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank, record.world, record.node, record.run = self.rank, self.world, self.node, self.run
        return not (getattr(record, "main_only", False) and self.rank != 0)


class _Console(logging.Handler):
    """INFO on stdout, WARNING and above on stderr, through tqdm.write; flushed at once."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            text = self.format(record)
            if record.levelno == logging.WARNING:
                text = f"warning: {text}"
            if record.world > 1:
                text = f"[rank {record.rank}/{record.world} {record.node}] {text}"
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            tqdm.write(text, file=stream)
            stream.flush()
        except Exception:  # (logging's rule: a console that cannot be written never ends the run)
            self.handleError(record)


def _env_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)


def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


_CONTEXT = _Context()
if not LOGGER.handlers:
    _handler = _Console()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.addHandler(_handler)
    LOGGER.addFilter(_CONTEXT)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False


def bind(rank: int, world: int, node: str, run: str | os.PathLike = "") -> None:
    """From now on, records come from rank `rank` of `world` on `node`, training the run in `run`."""
    _CONTEXT.rank, _CONTEXT.world, _CONTEXT.node, _CONTEXT.run = rank, world, node, str(run)


def info(text: str, *, every_rank: bool = False) -> None:
    """What the run reports: on the main rank only (every_rank: from each rank that calls it)."""
    LOGGER.info(text, extra={"main_only": not every_rank})


def warning(text: str, *, every_rank: bool = True) -> None:
    """Something the user should know, said by whichever process met it (every_rank=False: a warning every rank
    reaches alike, said once by the main rank)."""
    LOGGER.warning(text, extra={"main_only": not every_rank})


def error(e, *, unheard: bool = False) -> None:
    """The line a command that fails on a UserError `e` ends with: `dist-clm: error: SENTENCE` on stderr, the
    contract of every command and SLURM task (scripts look for it). An error every rank reached alike
    (`e.agreed`) is said once, by the main rank; a rank's own error by that rank, naming itself and its node.
    `unheard`: the main rank has not said the agreed error when it should have, so this rank says it."""
    rank = _CONTEXT.rank if _CONTEXT.world > 1 else _env_rank()
    if rank != 0 and getattr(e, "agreed", False) and not unheard:
        return
    node = os.environ.get("SLURMD_NODENAME")
    where = "" if rank == 0 else f"rank {rank}{f' on {node}' if node else ''}: "
    sys.stderr.write(f"dist-clm: error: {where}{e}\n")
    sys.stderr.flush()


def silent_before_group(e) -> bool:
    """Whether `error(e)` left `e` to rank 0 in a launched job whose ranks have not formed a group yet."""
    return getattr(e, "agreed", False) and _CONTEXT.world <= 1 and _env_rank() != 0 and _env_world() > 1


def progress(iterable=None, *, total: int | None = None, initial: int = 0, unit: str = "it", desc: str = "",
             enabled: bool = True, since: float | None = None):  # fmt: skip
    """A progress display: tqdm's bar on a terminal; where stderr is not one (a SLURM log, nohup, CI) a plain
    line every DIST_CLM_PROGRESS_SECONDS (30) seconds and at the end, instead of carriage-return frames that
    make one endless line of a log file. Both take update(n), set_postfix(**values), reset(total), close(), and
    iterate over `iterable`. `since`: the time.monotonic() the work began at, where that was before the display
    (workers that started at once): its time and rate count from then."""
    if enabled and not sys.stderr.isatty():
        return LineProgress(iterable, total=total, initial=initial, unit=unit, desc=desc, since=since)
    from tqdm.auto import tqdm

    bar = tqdm(iterable, total=total, initial=initial, unit=unit, desc=desc or None, disable=not enabled,
               smoothing=0.1)  # fmt: skip
    if since is not None and not bar.disable:
        bar.start_t = bar.last_print_t = bar._time() - (time.monotonic() - since)
    return bar


# What libraries say on every start that tells the user nothing they could act on, dropped where it is said (by
# logger or warning module, and message), never by silencing a library as a whole. dist_clm says the same things
# itself where they matter (the device, a skipped step and why).
NOISE_LOGS = {
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),  # on every CPU start, at DeepSpeed's op import
    "DeepSpeed": ("OVERFLOW! Skipping step. Gradients are non-finite",),  # the loss guard's skip (its own line)
}
NOISE_WARNINGS = [  # (category, message regex, module regex)
    # ZeRO's collectives, once per rank: all-gather on every stage, reduce-scatter on ZeRO-3
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated", r"torch\.distributed"),
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated", r"torch\.distributed"),
    # inductor's own lowering, when a first step compiles (Muon's update, train.compile)
    (FutureWarning, r"`torch\._prims_common\.check` is deprecated", r"torch\._inductor"),
]


class _Drop(logging.Filter):
    def __init__(self, texts: tuple[str, ...]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(t in record.getMessage() for t in self.texts)


def quiet_library_noise() -> None:
    """Drop NOISE_LOGS and NOISE_WARNINGS; without a terminal, no progress bars of the Hugging Face libraries
    (carriage-return frames in a log file). Call before those libraries are imported."""
    import warnings

    for name, texts in NOISE_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(texts))
    for category, message, module in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # (transformers' bars follow huggingface_hub's)


@contextlib.contextmanager
def without_lines(stream: str, *texts: str) -> Iterator[None]:
    """Inside: what a library prints to sys.`stream` ("stdout", "stderr") is held, then passed on without the
    lines holding one of `texts` (a report or progress bar the library prints on every call, with no switch)."""
    held = io.StringIO()
    try:
        with (contextlib.redirect_stdout if stream == "stdout" else contextlib.redirect_stderr)(held):
            yield
    finally:
        out = getattr(sys, stream)  # (a line ends at "\n" only: a bar's "\r" frames are one line)
        lines = held.getvalue().split("\n")
        kept = [line + "\n" for line in lines[:-1] if not any(t in line for t in texts)]
        out.write("".join(kept) + ("" if any(t in lines[-1] for t in texts) else lines[-1]))
        out.flush()


def count(n: int, noun: str, of: int | None = None) -> str:
    """1 chunk, 2 chunks, 1,024 tokens; with `of`: 3/10 steps (the noun follows the total)."""
    if of is None:
        return f"{n:,} {noun}{'' if n == 1 else 's'}"
    return f"{n:,}/{of:,} {noun}{'' if of == 1 else 's'}"


def rate_from_now(bar, done: int = 0) -> None:
    """A progress display's rate and time left count from here on, after `done` more units that count as done but
    not toward the rate: a first step's compilation and warm-up (46 s for a Muon run's first step, against ~0.1 s
    for the next) would otherwise promise 45 minutes for a minute. The time so far still counts from the start."""
    if isinstance(bar, LineProgress):
        bar.n += done
        bar.start_n, bar.start = bar.n, time.monotonic()
        bar.update(0)  # (a line, if one is due: without a rate until a steady unit is done)
    elif bar.disable:
        bar.n += done
    else:  # tqdm: what its reset() restarts but its start (the elapsed time), without going back to 0
        from tqdm.std import EMA

        bar.n += done
        bar.initial = bar.last_print_n = bar.n
        bar.last_print_t = bar._time()
        bar._ema_dn, bar._ema_dt = EMA(bar.smoothing), EMA(bar.smoothing)
        bar.refresh()


def duration(seconds: float) -> str:
    """42 s, 17 min, 4.2 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class LineProgress:
    """tqdm's interface, printed as one plain line at a time (see progress)."""

    def __init__(self, iterable=None, *, total: int | None = None, initial: int = 0, unit: str = "it", desc: str = "",
                 since: float | None = None):  # fmt: skip
        self.iterable, self.total, self.n, self.unit, self.desc = iterable, total, initial, unit, desc
        self.every = float(os.environ.get("DIST_CLM_PROGRESS_SECONDS", "30"))
        self.last = time.monotonic()
        self.began = self.last if since is None else since  # the time so far counts from here
        self.start_n, self.start = initial, self.began  # the rate, from here
        self.postfix, self.closed = "", False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._say(now)

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def reset(self, total: int | None = None) -> None:
        """Back to 0 of `total`; the rate counts from now, the time so far from the start."""
        self.total, self.n, self.start_n, self.start = total, 0, 0, time.monotonic()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._say(time.monotonic())

    def _say(self, now: float) -> None:
        steady = self.n - self.start_n  # (none yet: no rate to say, rather than one from a compile)
        rate = steady / max(now - self.start, 1e-9)
        done = count(self.n, self.unit, self.total) if self.total else count(self.n, self.unit)
        parts = [done + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        if steady > 0:
            parts.append(f"{rate:,.1f} {self.unit}/s")
        if self.postfix:
            parts.append(self.postfix)
        if self.total and steady > 0 and self.n < self.total:
            parts.append(f"about {duration((self.total - self.n) / rate)} left")
        parts.append(f"{now - self.began:.0f} s so far")
        info(f"{self.desc + ': ' if self.desc else ''}{', '.join(parts)}")
