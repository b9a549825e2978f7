"""Many nodes for real, on the project's local SLURM cluster (launchers/local_slurm/start.sh: nodes dn1-dn3,
each its own slurmd, partition `multi`): 2 nodes x 2 ranks through submitit, the deepspeed launcher
(`--launcher slurm`, srun) and torchrun (c10d rendezvous) train what 1 node x 4 ranks trains, block for
block; a resume on another node count continues exactly; a preemption of a 2-node job resumes exactly; a node
that dies and a rank that stalls end every rank with a sentence naming it, and the job comes back from its
last checkpoint on the nodes that are left."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from dist_clm.launch.slurm import ENDED
from dist_clm.parallel.process_group import free_port
from tests.helpers import (
    BIN,
    TINY,
    kill_node,
    launch,
    logged_steps,
    metrics,
    needs_slurm,
    restarts,
    restore_node,
    run_cli,
    running,
    wait_for,
)

pytestmark = pytest.mark.slow


COMMON = [*TINY, "train.micro_batch_size=2", "train.max_steps=8", "checkpoint.save_every=4", "checkpoint.keep_last=5",
          "train.log_every=1", "train.eval_every=0", "train.eval_blocks=2"]  # fmt: skip


SLURM_2x2 = ["launch", "slurm", "--nodes", "2", "--tasks-per-node", "2", "--cpus-per-task", "1", "--partition",
             "multi", "--time", "30"]  # fmt: skip


def per_step(run, skip: int = 0) -> dict[int, tuple[float, int]]:
    """step -> (training loss, the step's token ids summed over all ranks)."""
    return {r["step"]: (r["train/loss"], r["data/token_sum"]) for r in metrics(run, skip) if "train/loss" in r}


def same_training(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for step, (loss, tokens) in got.items():
        assert tokens == want[step][1], step  # the very same blocks in every step
        assert loss == pytest.approx(want[step][0], rel=1e-4), step  # (another reduction order across nodes)


def nodes_of(run) -> list[tuple[str, int]]:
    return [(r["node"], r["local_rank"]) for r in json.loads((run / "ranks.json").read_text())]


def one_node_4_ranks(*overrides: str):
    return launch([str(BIN / "deepspeed"), "--num_gpus", "4", "--master_port", str(free_port())], *overrides)


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, data_dir):
    """The reference: 1 node x 4 ranks (the deepspeed launcher on this machine)."""
    run = tmp_path_factory.mktemp("one_node") / "run"
    one_node_4_ranks(*COMMON, f"data.path={data_dir}", f"run.dir={run}")
    return run


def test_submitit_two_nodes_train_what_one_node_trains_and_resume_on_one_node(one_node, tmp_path, data_dir):
    needs_slurm("multi")
    run = tmp_path / "two_nodes"
    r = run_cli(*SLURM_2x2, "--wait", *COMMON, f"data.path={data_dir}", f"run.dir={run}")
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert "finished: {'step': 8" in r.stdout
    assert sorted(nodes_of(run)) == [("dn1", 0), ("dn1", 1), ("dn2", 0), ("dn2", 1)]
    [job_dir] = [d for d in (run / "slurm").iterdir() if d.is_dir() and d.name != ENDED]
    assert len(list((run / "slurm" / ENDED).iterdir())) == 4  # each task recorded that it ended on its own
    assert len(list(job_dir.glob("*_log.out"))) == 4  # one log per task
    rank0 = next(job_dir.glob("*_0_log.*[rt]")).read_text() + next(job_dir.glob("*_0_log.out")).read_text()
    assert "4 ranks on 2 nodes (dn1: 0-1, dn2: 2-3)" in rank0
    same_training(per_step(run), per_step(one_node))

    # the 2-node run's step-4 checkpoint continues on 1 node x 4 ranks, exactly as the 2-node run went on
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    shutil.rmtree(moved / "checkpoints" / "step_00000008")
    skip = len(metrics(moved))
    one_node_4_ranks(*COMMON, f"data.path={data_dir}", f"run.dir={moved}")
    same_training(per_step(moved, skip), {s: v for s, v in per_step(run).items() if s > 4})


def test_sequence_parallel_inside_each_node_and_data_parallel_across_them(one_node, tmp_path, data_dir):
    """SP=2 x DP=2 on 2 nodes x 2 ranks: a group's ranks are consecutive, so each node holds one group (its
    all-to-alls in every layer stay on the node, where links are fast; only the gradient reduction crosses), and
    the run trains what 4 data-parallel ranks on one node train, block for block (4 steps)."""
    needs_slurm("multi")
    run = tmp_path / "sp"
    r = run_cli(*SLURM_2x2, "--wait", *COMMON, f"data.path={data_dir}", f"run.dir={run}", "train.max_steps=4",
                "distributed.sequence_parallel_size=2", "train.global_batch_size=8")  # fmt: skip
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    nodes = [node for node, _ in nodes_of(run)]
    assert nodes[0] == nodes[1] != nodes[2] == nodes[3]  # one group per node
    same_training(per_step(run), {s: v for s, v in per_step(one_node).items() if s <= 4})


def test_tensor_parallel_inside_each_node_and_data_parallel_across_them(tmp_path, data_dir):
    """TP=2 x DP=2 on 2 nodes x 2 ranks (submitit) trains what 2 data-parallel ranks on one node (torchrun) train,
    block for block: each node holds one tensor-parallel group (its two all-reduces per layer stay on the node),
    only the gradient reduction crosses. (One node under the deepspeed launcher: the integration tier.)"""
    needs_slurm("multi")
    llama = [*COMMON[len(TINY) :], "model.preset=tiny-llama", "model.overrides.hidden_size=64", "data.block_size=64",
             "model.overrides.intermediate_size=128", "train.max_steps=4", "checkpoint.save_every=2",
             "train.global_batch_size=8", "run.progress_bar=false", f"data.path={data_dir}"]  # fmt: skip
    dp, nodes = tmp_path / "dp", tmp_path / "nodes"
    r = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
                        "dist_clm", "train", *llama, f"run.dir={dp}"], capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(*SLURM_2x2, "--wait", *llama, "distributed.tensor_parallel_size=2", f"run.dir={nodes}")
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    names = [node for node, _ in nodes_of(nodes)]
    assert names[0] == names[1] != names[2] == names[3]  # one group per node
    same_training(per_step(nodes), per_step(dp))
    marker = json.loads((nodes / "checkpoints" / "step_00000004" / "complete.json").read_text())
    assert (marker["world_size"], marker["tensor_parallel_size"]) == (4, 2)


def test_the_deepspeed_launcher_and_torchrun_over_two_nodes(one_node, tmp_path, data_dir):
    needs_slurm("multi")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("dn1 slots=2\ndn2 slots=2\n")
    alloc = ["salloc", "-p", "multi", "-N", "2", "--time", "10"]
    runs = {"deepspeed": tmp_path / "ds", "torchrun": tmp_path / "tr"}
    train = [*COMMON, f"data.path={data_dir}"]
    # the deepspeed launcher's slurm backend: one srun over the allocation (no ssh)
    ds = [*alloc, "--ntasks-per-node", "2", "--cpus-per-task", "1", str(BIN / "deepspeed"), "--hostfile",
          str(hostfile), "--launcher", "slurm", "--no_ssh_check", "--master_addr", "dn1", str(BIN / "dist-clm"),
          "train", *train, f"run.dir={runs['deepspeed']}"]  # fmt: skip
    # torchrun on each node, meeting through c10d on the first (whose store it hosts: is_host, since the
    # nodes of this cluster share one host name)
    tr = " ".join([str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
                   "--rdzv_endpoint", f"dn1:{free_port()}", "--rdzv_id", "tr", "--rdzv_conf",
                   "is_host=$((SLURM_NODEID == 0))", "-m", "dist_clm", "train", *train,
                   f"run.dir={runs['torchrun']}"])  # fmt: skip
    torchrun = [*alloc, "--ntasks-per-node", "1", "--cpus-per-task", "2", "srun", "--kill-on-bad-exit=1", "bash",
                "-c", f"exec {tr}"]  # fmt: skip
    for name, cmd in (("deepspeed", ds), ("torchrun", torchrun)):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (name, r.stdout[-2000:], r.stderr[-3000:])
        assert sorted(nodes_of(runs[name])) == [("dn1", 0), ("dn1", 1), ("dn2", 0), ("dn2", 1)], name
        same_training(per_step(runs[name]), per_step(one_node))


def submit(run, data_dir, *extra: str) -> str:
    r = run_cli(*SLURM_2x2, *TINY, "train.micro_batch_size=2", f"data.path={data_dir}", f"run.dir={run}",
                "train.log_every=1", "train.eval_every=0", "train.eval_blocks=2", *extra)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split("submitted job ")[1].split(":")[0]


def logs(run, job: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((run / "slurm" / job).glob("*_log.*")))


def results(run, job: str) -> list[dict]:
    import pickle

    out = []
    for p in sorted((run / "slurm" / job).glob("*_result.pkl")):
        kind, value, *_ = pickle.loads(p.read_bytes())
        assert kind == "success", value
        out.append(value)
    return out


def test_a_preempted_two_node_job_resumes_exactly_and_one_whose_node_dies_comes_back(tmp_path, data_dir):
    needs_slurm("multi")
    run = tmp_path / "run"
    job = submit(run, data_dir, "train.max_steps=36", "checkpoint.save_every=8", "checkpoint.keep_last=20")
    try:
        # 1. preemption (SLURM's USR2 to every task on both nodes): all agree, save, requeue, resume exactly
        wait_for(lambda: len(logged_steps(run)) >= 5, "the first steps")
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        wait_for(lambda: restarts(job) >= 1 and running(job), "the job requeued after USR2")
        wait_for(lambda: len(logged_steps(run)) > 0 and logged_steps(run)[-1] >= 18, "progress", 300)
        steps = logged_steps(run)
        assert steps == sorted(steps) and len(steps) == len(set(steps))  # stopped and resumed exactly

        # 2. a node dies: its slurmd, step daemon and tasks are killed at once
        victim = json.loads((run / "ranks.json").read_text())[3]["node"]
        last = max(json.loads(p.read_text())["step"] for p in (run / "checkpoints").glob("step_*/complete.json"))
        killed = time.time()
        kill_node(victim)
        wait_for(lambda: "lost the other ranks in a collective" in logs(run, job), "the survivors' message", 120)
        noticed = time.time()
        wait_for(lambda: restarts(job) >= 2 and running(job), "the job back on the nodes left", 300)
        back = time.time()
        print(f"node {victim} killed: the survivors stopped {noticed - killed:.1f} s later, the job ran again "
              f"{back - killed:.1f} s later")  # fmt: skip
        text = logs(run, job)
        assert "a peer closed its connection" in text and "Traceback" not in text.split("dist-clm: error:")[-1]
        final = wait_for(lambda: results(run, job) if not running(job) and results(run, job) else None,
                         "the job's end", 400)  # fmt: skip
        assert all(r["step"] == 36 and r["world_size"] == 4 for r in final)
        assert victim not in {n for n, _ in nodes_of(run)}  # the requeued job runs without the dead node
        steps = logged_steps(run)
        went_back = [(a, b) for a, b in zip(steps, steps[1:], strict=False) if b <= a]
        assert len(went_back) == 1 and went_back[0][1] == last + 1  # from the last complete checkpoint
        assert set(steps) == set(range(1, 37))
    finally:
        subprocess.run(["scancel", job], capture_output=True)
        for node in ("dn1", "dn2", "dn3"):  # the cluster whole again for the tests after this one
            restore_node(node)


def test_a_stalled_rank_then_ranks_that_abort_without_a_word_each_bring_the_job_back(tmp_path, data_dir):
    """Two faults in one job, each ending in a requeue and a resume from the last complete checkpoint:
    1. a rank that stops answering (SIGSTOP: alive, holding its connections) is named by the others once the
       collective timeout passes;
    2. NCCL's default after a collective timeout, played on CPU: the rank that stopped is gone (kill -9) and each
       survivor's watchdog aborts its process (SIGABRT), so no rank says a word and srun ends the step; the batch
       script sees that no task recorded its end and requeues the job as for any lost rank."""
    needs_slurm("multi")
    run = tmp_path / "run"
    job = submit(run, data_dir, "train.max_steps=30", "checkpoint.save_every=5", "distributed.collective_timeout_s=15")
    try:
        wait_for(lambda: len(logged_steps(run)) >= 8, "the first steps", 300)
        stalled = json.loads((run / "ranks.json").read_text())[3]
        stopped = time.time()
        os.kill(stalled["pid"], signal.SIGSTOP)
        named = f"rank 3 (node {stalled['node']}) stopped answering"
        # each survivor writes its own sentence (the one whose collective timed out, and those that then saw it
        # leave): wait for the timeout's
        wait_for(lambda: "no answer within the collective timeout of 15 s" in logs(run, job), "the timeout", 120)
        noticed = time.time()
        wait_for(lambda: named in logs(run, job), "the stalled rank named", 30)
        wait_for(lambda: restarts(job) >= 1 and running(job), "the job back", 300)
        print(f"rank 3 stopped: the others stopped {time.time() - stopped:.1f} s later (timeout 15 s), the job "
              f"ran again {time.time() - noticed:.1f} s after that")  # fmt: skip
        assert "no task said why" not in logs(run, job)  # (every rank said why: the second fault's is new)

        before = len(logged_steps(run))
        wait_for(lambda: len(logged_steps(run)) >= before + 4, "steps after the first requeue", 300)
        ranks = json.loads((run / "ranks.json").read_text())  # (the requeued job's processes)
        assert ranks[3]["pid"] != stalled["pid"]
        last = max(json.loads(p.read_text())["step"] for p in (run / "checkpoints").glob("step_*/complete.json"))
        os.kill(ranks[3]["pid"], signal.SIGKILL)
        for r in ranks[:3]:
            with contextlib.suppress(ProcessLookupError):  # (srun may have ended it already)
                os.kill(r["pid"], signal.SIGABRT)
        wait_for(lambda: restarts(job) >= 2 and running(job), "the job requeued again", 300)
        assert "no task said why: a rank was killed by a signal" in logs(run, job)
        final = wait_for(lambda: results(run, job) if not running(job) and results(run, job) else None,
                         "the job's end", 400)  # fmt: skip
        assert all(r["step"] == 30 and r["restarts"] == 2 for r in final)
        steps = logged_steps(run)
        went_back = [(a, b) for a, b in zip(steps, steps[1:], strict=False) if b <= a]
        assert len(went_back) <= 2 and set(steps) == set(range(1, 31))
        assert not went_back or went_back[-1][1] <= last + 1 + 5  # from a complete checkpoint (perhaps a newer one)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
