"""DPO on the local SLURM cluster (preempted, requeued, moved to one rank) and from a bucket (pairs and reference values
read through the node's cache), training exactly as from a local copy on one machine."""

import pytest

from tests.helpers import PREF_BLOCK, TINY_PREF, assert_clean_error, run_cli


@pytest.mark.slow
def test_dpo_on_slurm_survives_preemption_and_moves_to_one_rank(tmp_path, pref_data, start_model):
    """The same DPO run three ways: under torchrun on 2 ranks; as a 2-task SLURM job (submitit) preempted
    mid-run, requeued and resumed from the checkpoint its signal wrote; and moved from the torchrun run's step-10
    checkpoint to 1 rank. Every way sees the same pairs at every step, with the same losses."""
    from dist_clm.launch.slurm import SlurmSettings, submit
    from dist_clm.parallel.process_group import free_port
    from tests.helpers import BIN, launch, logged_steps, metrics, needs_slurm, resume_moved, train_losses, wait_for

    needs_slurm()
    common = [*TINY_PREF, f"data.path={pref_data}", f"model.pretrained={start_model}", "train.log_every=1",
              "train.global_batch_size=8", "train.max_steps=20", "checkpoint.save_every=10",
              "checkpoint.keep_last=5"]  # fmt: skip
    full = tmp_path / "full"
    launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())], *common,
           f"run.dir={full}")  # fmt: skip
    reference = train_losses(metrics(full))
    assert list(reference) == list(range(1, 21))

    slurm = tmp_path / "slurm"
    settings = SlurmSettings(tasks_per_node=2, cpus_per_task=1, time_min=30, signal_delay_s=30, max_requeues=3)
    [(job, _)] = submit(settings, None, [*common, f"run.dir={slurm}"])
    wait_for(lambda: len(logged_steps(slurm)) >= 5, "the first steps")
    job._interrupt()  # submitit's preemption: checkpoint on the signal, requeue, resume
    results = job.results()
    assert all(r["step"] == 20 and r["world_size"] == 2 for r in results) and results[0]["restarts"] == 1
    steps = logged_steps(slurm)
    assert steps == sorted(set(steps)) == list(range(1, 21))  # resumed where the signal stopped it
    for step, loss in train_losses(metrics(slurm)).items():
        assert loss == pytest.approx(reference[step], rel=1e-5), (step, loss, reference[step])

    resumed, r = resume_moved(full, tmp_path / "moved", [str(BIN / "python")], *common, last=20)
    assert list(resumed) == list(range(11, 21))
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], rel=2e-4), (step, loss, reference[step])


def test_dpo_reads_pairs_and_reference_values_from_a_bucket(tmp_path, s3, chat_tokenizer, pref_data, start_model):
    """Pairs prepared into a bucket, their reference values computed through the node cache and uploaded beside
    them: a DPO run from the bucket trains exactly as from the local copy of the same data."""
    import os

    from dist_clm.data import reference_store
    from tests.helpers import BUCKET, metrics, train_losses

    records = tmp_path / "pairs.jsonl"
    r = run_cli("data", "synthetic", "--task", "preference", "--out", str(records), "--records", "200")
    assert r.returncode == 0
    url = f"s3://{BUCKET}/run-{os.getpid()}/dpo-pairs"
    r = run_cli("prepare", str(records), "--tokenizer", str(chat_tokenizer), "--out", url, "--format", "preference",
                "--block-size", str(PREF_BLOCK), "--val-fraction", "0.1", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("train", *TINY_PREF, f"data.path={url}", f"model.pretrained={start_model}",
                f"run.dir={tmp_path / 'early'}", "train.max_steps=3")  # fmt: skip
    assert_clean_error(r, "has no reference values for dpo", "prepare-reference")
    r = run_cli("prepare-reference", url, "--model", str(start_model), env={"DIST_CLM_CACHE": str(tmp_path / "c1")})
    assert r.returncode == 0, r.stderr[-2000:]
    prefix = url.removeprefix(f"s3://{BUCKET}/")
    stored = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/reference/")["Contents"]}
    record = reference_store.read_record(pref_data)
    names = ["reference.json", *(s["file"] for s in record["splits"].values())]
    assert stored == {f"{prefix}/reference/{name}" for name in names}  # the local copy's values, by their hashes

    losses = {}
    for name, path in (("bucket", url), ("local", pref_data)):
        run = tmp_path / name
        r = run_cli("train", *TINY_PREF, f"data.path={path}", f"model.pretrained={start_model}", f"run.dir={run}",
                    f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=4", "train.log_every=1")  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        losses[name] = train_losses(metrics(run))
    assert losses["bucket"] == losses["local"] and len(losses["local"]) == 4
