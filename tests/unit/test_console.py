"""The one console path (console.py): who speaks, and what each rank prints."""

from __future__ import annotations

import pytest

from dist_clm import console
from dist_clm.errors import UserError, agreed


@pytest.fixture
def bound(monkeypatch):
    """Restores the console's binding afterwards; no rank or node from the environment."""
    ctx = console._CONTEXT
    saved = (ctx.rank, ctx.world, ctx.node, ctx.run)
    for var in ("RANK", "SLURM_PROCID", "SLURMD_NODENAME"):
        monkeypatch.delenv(var, raising=False)
    yield console.bind
    console.bind(*saved)


def test_one_process_prints_the_text_alone(bound, capsys):
    """A one-process run: info on stdout, warning on stderr marked as one, no rank prefix."""
    bound(0, 1, "nodeA")
    console.info("step 1")
    console.warning("careful")
    assert capsys.readouterr() == ("step 1\n", "warning: careful\n")


def test_multi_rank_lines_name_the_rank_and_info_is_the_main_ranks(bound, capsys):
    """Rank 0 of 2 says its info with `[rank 0/2 node]`; another rank says only every_rank info and its warnings,
    prefixed with itself; a warning every rank reaches alike (every_rank=False) is said by the main rank only."""
    bound(0, 2, "nodeA")
    console.info("main says")
    console.warning("alike", every_rank=False)
    assert capsys.readouterr() == ("[rank 0/2 nodeA] main says\n", "[rank 0/2 nodeA] warning: alike\n")
    bound(3, 4, "nodeB")
    console.info("not said")
    console.warning("alike", every_rank=False)
    console.info("mine", every_rank=True)
    console.warning("my own")
    assert capsys.readouterr() == ("[rank 3/4 nodeB] mine\n", "[rank 3/4 nodeB] warning: my own\n")


def test_error_line_is_said_once_or_by_the_rank_that_met_it(bound, capsys, monkeypatch):
    """`dist-clm: error: ...` on stderr: by the main rank bare, by another rank with `rank R: ` (and its SLURM
    node), and an agreed error only by the main rank."""
    bound(0, 2, "n0")
    console.error(agreed(UserError("every rank broke.")))
    assert capsys.readouterr() == ("", "dist-clm: error: every rank broke.\n")
    bound(1, 2, "n1")
    console.error(agreed(UserError("every rank broke.")))
    console.error(UserError("my shard is bad."))
    monkeypatch.setenv("SLURMD_NODENAME", "gpu07")
    console.error(UserError("mine again."))
    assert capsys.readouterr() == ("", "dist-clm: error: rank 1: my shard is bad.\n"
                                       "dist-clm: error: rank 1 on gpu07: mine again.\n")  # fmt: skip


def test_a_launched_rank_that_leaves_its_sentence_to_rank_0_waits_for_the_launcher(bound, monkeypatch):
    """Before the group forms, a rank other than 0 that met an agreed error must not exit first: a launcher ends
    every rank when one exits, and rank 0 could be ended before writing the sentence (torchrun did, 1 run in 4).
    A rank's own error, rank 0, one process, or a formed group: no wait."""
    bound(0, 1, "")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert console.silent_before_group(agreed(UserError("every rank broke.")))
    assert not console.silent_before_group(UserError("my shard is bad."))
    monkeypatch.setenv("RANK", "0")
    assert not console.silent_before_group(agreed(UserError("every rank broke.")))
    monkeypatch.setenv("RANK", "1")
    bound(1, 2, "n1")
    assert not console.silent_before_group(agreed(UserError("every rank broke.")))
    bound(0, 1, "")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not console.silent_before_group(agreed(UserError("every rank broke.")))


def test_a_silent_rank_says_the_agreed_error_when_rank_0_never_did(monkeypatch, capsys):
    """Rank 1 of a launched world leaves an agreed error to rank 0, and waits for the launcher to end it when
    rank 0 exits; still alive after the wait, it says the sentence itself rather than lose it."""
    from dist_clm import cli, console

    console.bind(0, 1, "")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(cli, "SILENT_RANK_WAIT_S", 0)
    code = cli.main(["train", "distributed.sequence_parallel_size=4", "data.path=/nowhere"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err == [
        "dist-clm: error: rank 1: config key 'distributed.sequence_parallel_size' is 4, which does not divide the 2 "
        "ranks; use a divisor of the number of ranks."
    ], err


def test_counts_agree_with_their_numbers():
    from dist_clm.console import count

    assert [count(1, "chunk"), count(2, "chunk"), count(0, "rank"), count(1024, "token")] == [
        "1 chunk", "2 chunks", "0 ranks", "1,024 tokens"
    ]  # fmt: skip
    assert count(3, "step", 10) == "3/10 steps" and count(1, "step", 1) == "1/1 step"


def test_library_noise_is_dropped_where_it_is_said_and_nothing_else(capsys):
    import logging
    import warnings

    from dist_clm import console

    console.quiet_library_noise()
    caught = logging.getLogger("torch.utils.cpp_extension")
    kept = []
    handler = logging.Handler()
    handler.emit = kept.append
    caught.addHandler(handler)
    try:
        caught.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
        caught.warning("a compiler error the user must see")
    finally:
        caught.removeHandler(handler)
    assert [r.getMessage() for r in kept] == ["a compiler error the user must see"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        console.quiet_library_noise()  # (after catch_warnings reset the filters)
        warnings.warn_explicit("`torch.distributed.all_gather_into_tensor` is deprecated.", FutureWarning,
                               "c10d_logger.py", 83, module="torch.distributed.c10d_logger")  # fmt: skip
        warnings.warn_explicit("`torch.distributed.reduce_scatter_tensor` is deprecated.", FutureWarning,
                               "c10d_logger.py", 83, module="torch.distributed.c10d_logger")  # fmt: skip
        warnings.warn_explicit("something else is deprecated", FutureWarning, "x.py", 1, module="torch.distributed.x")
        # inductor's lowering when Muon's update or a train.compile model compiles; the same words elsewhere are kept
        check = "`torch._prims_common.check` is deprecated and will be removed in the future."
        warnings.warn_explicit(check, FutureWarning, "lowering.py", 2487, module="torch._inductor.lowering")
        warnings.warn_explicit(check, FutureWarning, "model.py", 1, module="my_model")
    assert [str(w.message) for w in seen] == ["something else is deprecated", check]
    with console.without_lines("stdout", "built successfully"):
        print("DeepSpeed op built successfully")
        print("kept")
    assert capsys.readouterr().out == "kept\n"


def test_the_time_left_counts_from_the_steady_steps(monkeypatch, capsys):
    """A first step of 46 s (a compile) and then ten steps in a second: a minute's run says seconds are left,
    not the 45 minutes the first step's pace would give; the first step's line has no rate to say, and the
    time so far is the run's (47 s), not the steady steps' second."""
    from dist_clm import console

    monkeypatch.setenv("DIST_CLM_PROGRESS_SECONDS", "0")
    now = [1000.0]
    monkeypatch.setattr("time.monotonic", lambda: now[0])
    bar = console.LineProgress(total=60, unit="step", desc="train")
    now[0] += 46.0
    console.rate_from_now(bar, done=1)
    assert capsys.readouterr().out == "train: 1/60 steps (2%), 46 s so far\n"
    for _ in range(10):
        now[0] += 0.1
        bar.update(1)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "train: 11/60 steps (18%), 10.0 step/s, about 5 s left, 47 s so far", last


def test_work_begun_before_its_progress_display_counts_from_its_start(monkeypatch, capsys):
    """Workers that started 12 s before the display: its lines say the work's time and rate, not '0 s so far'."""
    from dist_clm import console

    monkeypatch.setenv("DIST_CLM_PROGRESS_SECONDS", "30")
    now = [500.0]
    monkeypatch.setattr("time.monotonic", lambda: now[0])
    began = now[0]
    now[0] += 12.0
    bar = console.LineProgress(unit="doc", desc="prepare", since=began)
    bar.update(240)
    bar.close()
    assert capsys.readouterr().out == "prepare: 240 docs, 20.0 doc/s, 12 s so far\n"
