"""Prepared data in object storage, against a real S3-compatible server (SeaweedFS, started by
launchers/local_s3/start.sh): prepare uploads, training reads through the bounded node cache with exact
prefetch and the two-level shuffle, and faults end in one sentence."""

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dist_clm.parallel.process_group import free_port
from tests.helpers import BIN, BUCKET, ROOT, S3_DIR, TINY, metrics, run_cli, server_env, start_server, train_losses


@pytest.fixture(scope="module")
def remote_data(s3, corpus_dir, tokenizer_dir, data_dir):
    """The data_dir fixture's corpus prepared straight to s3:// with the same settings."""
    url = f"s3://{BUCKET}/run-{os.getpid()}/data"
    r = run_cli("prepare", "--tokenizer", str(tokenizer_dir), "--out", url, str(corpus_dir), "--val-fraction", "0.15",
                "--chunk-tokens", "1000", "--shard-mb", str(1 / 64), "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return url


def keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def downloads(cache: Path) -> list[str]:
    return [line.split()[2] for log in cache.glob("*/downloads.log") for line in log.read_text().splitlines()]


def test_prepare_uploads_the_same_data(s3, remote_data, data_dir):
    prefix = remote_data.removeprefix(f"s3://{BUCKET}/")
    names = {k.removeprefix(prefix + "/") for k in keys(s3, prefix)}
    local = {str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.is_file()}
    assert names == local
    for split in ("train", "val"):  # the same shards, byte for byte (sizes and hashes)
        body = s3.get_object(Bucket=BUCKET, Key=f"{prefix}/{split}/index.json")["Body"].read()
        assert json.loads(body) == json.loads((data_dir / split / "index.json").read_text())
    # a complete remote directory is never overwritten
    r = run_cli("prepare", "--tokenizer", str(data_dir / "tokenizer"), "--out", remote_data, "--quiet")
    assert r.returncode == 2 and "already holds a complete prepared dataset" in r.stderr


def test_a_prefix_without_manifest_is_not_data(s3, tmp_path):
    s3.put_object(Bucket=BUCKET, Key="half/train/shard.00000.mds", Body=b"x")
    r = run_cli("train", *TINY, f"data.path=s3://{BUCKET}/half", f"run.dir={tmp_path / 'run'}",
                f"data.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"'s3://{BUCKET}/half' has no manifest.json, so it is not a complete prepared dataset" in r.stderr


@pytest.mark.slow
def test_two_ranks_train_from_s3_as_from_the_local_copy_within_a_bounded_cache(s3, remote_data, data_dir, tmp_path):
    # windows of 2000 tokens: the 12 steps read several windows, so more shards than the cache can hold
    common = [*TINY, "train.max_steps=12", "train.eval_every=0", "train.log_every=1", "checkpoint.save_every=6",
              "data.shuffle_window=2000"]  # fmt: skip
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
                "dist_clm", "train"]  # fmt: skip
    local, remote, cache = tmp_path / "local", tmp_path / "remote", tmp_path / "cache"
    limit = 3 * (1 << 14)  # three shards' worth: far less than the corpus
    sizes, stop = [], threading.Event()

    def used(path: Path) -> int:  # the bytes a file takes (a sparse one, its blocks), 0 if it just went
        with contextlib.suppress(FileNotFoundError):
            st = path.stat()
            return min(st.st_size, st.st_blocks * 512)
        return 0

    def sample() -> None:  # the bytes of shard files in the cache, partial downloads included, every 20 ms
        while not stop.is_set():
            sizes.append(sum(used(p) for p in cache.glob("*/*/*shard.*")))
            time.sleep(0.02)

    r = subprocess.run([*torchrun, *common, f"data.path={data_dir}", f"run.dir={local}"], capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    watcher = threading.Thread(target=sample)
    watcher.start()
    try:
        r = subprocess.run([*torchrun, *common, f"data.path={remote_data}", f"run.dir={remote}",
                            f"data.cache_dir={cache}", f"data.cache_limit={limit}"],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    finally:
        stop.set()
        watcher.join()
    assert r.returncode == 0, r.stderr[-3000:]
    assert train_losses(metrics(remote)) == pytest.approx(train_losses(metrics(local)), rel=1e-6)
    assert max(sizes) <= limit and len(sizes) > 10
    got = [n for n in downloads(cache) if "/shard." in n]
    assert len(set(got)) > 3  # more shards than the cache holds went through it: it evicted, within its limit
    # evaluation and inspection read the remote data too, through the same cache
    evals = [run_cli("eval", str(run), "--data", data, "--json") for run, data in ((remote, remote_data),
                                                                                   (local, str(data_dir)))]  # fmt: skip
    assert all(e.returncode == 0 for e in evals), evals[0].stderr[-2000:]
    assert json.loads(evals[0].stdout.splitlines()[-1])["loss"] == pytest.approx(
        json.loads(evals[1].stdout.splitlines()[-1])["loss"], rel=1e-6
    )
    r = run_cli("data", "inspect", remote_data, "--verify", env={"DIST_CLM_CACHE": str(tmp_path / "inspect")})
    assert r.returncode == 0 and "train:" in r.stdout, r.stderr[-2000:]
    waits = [row["train/data_wait_frac"] for row in metrics(remote) if "train/data_wait_frac" in row]
    print(f"shards downloaded: {len(got)} ({len(set(got))} distinct); data wait after step 2: {waits[2:]}")

    # exact resume from the step-6 checkpoint with a cold cache
    for tag in sorted((remote / "checkpoints").glob("step_*"))[1:]:
        subprocess.run(["rm", "-rf", str(tag)], check=True)
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    first = train_losses(metrics(remote))
    r = subprocess.run([*torchrun, *common, f"data.path={remote_data}", f"run.dir={remote}",
                        f"data.cache_dir={cache}", f"data.cache_limit={limit}"],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    again = {r["step"]: r["train/loss"] for r in metrics(remote) if "train/loss" in r and r["step"] > 6}
    assert again == pytest.approx({s: v for s, v in first.items() if s > 6}, rel=1e-6)


def test_one_download_per_shard_per_node(remote_data, tmp_path):
    """Ranks of one node share the cache: two processes reading the same shards download each once."""
    code = (
        "import sys\nfrom dist_clm.data import remote\nfrom dist_clm.data.stream import TokenStream\n"
        "from dist_clm.data.format import read_manifest\n"
        f"remote.configure({str(tmp_path / 'cache')!r}, None)\n"
        f"url = {remote_data!r}\n"
        "s = TokenStream(url, 'train', read_manifest(url))\n"
        "for k in range(s.n_chunks):\n    s.chunks.files.ensure_local(s.chunks.shard_of_chunk(k))\n"
    )
    procs = [subprocess.Popen([str(BIN / "python"), "-c", code], stderr=subprocess.PIPE, text=True) for _ in "ab"]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    shards = [n for n in downloads(tmp_path / "cache") if "/shard." in n]
    assert shards and len(shards) == len(set(shards))


def test_a_leftover_partial_download_is_never_taken_for_a_shard(remote_data, tmp_path):
    """A kill -9 mid-download leaves `.NAME.part`: the next download replaces it, the shard is whole."""
    from dist_clm.data import remote
    from dist_clm.data.format import read_manifest
    from dist_clm.data.stream import TokenStream

    remote.configure(tmp_path / "cache", None)
    stream = TokenStream(remote_data, "train", read_manifest(remote_data))
    part = stream.chunks.dir / ".shard.00000.mds.part"
    part.write_bytes(b"\0" * 100)  # what a killed download leaves
    assert not (stream.chunks.dir / "shard.00000.mds").exists()
    assert stream.read(0, 500).max() > 0
    assert (stream.chunks.dir / "shard.00000.mds").is_file() and not part.exists()


def test_room_held_by_a_dead_download_is_taken_back_and_a_live_one_is_waited_for(remote_data, tmp_path):
    """With a cache limit, a download first reserves its shard's size (`.NAME.room`) while it holds `.NAME.lock`.
    A reservation whose holder is alive is counted, and a download that needs its bytes waits; one whose holder
    died (kill -9: the lock went with it) is removed with its partial file, and the download goes on."""
    from dist_clm.data import remote
    from dist_clm.data.format import read_manifest
    from dist_clm.data.stream import TokenStream

    limit = 4 << 14
    remote.configure(tmp_path / "cache", limit)
    stream = TokenStream(remote_data, "train", read_manifest(remote_data))
    where = stream.chunks.dir

    def reservation(name: str) -> list[Path]:  # the files of a download in flight: room (all the cache), part
        paths = [where / f".{name}.room", where / f".{name}.part", where / f".{name}.lock"]
        with open(paths[0], "wb") as f:
            f.truncate(limit)
        paths[1].write_bytes(b"\0" * 100)
        paths[2].touch()
        return paths

    room, part, lock = reservation("shard.99998.mds")  # its holder is gone: nothing holds the lock
    reader = threading.Thread(target=stream.read, args=(0, 500), daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive()  # shard 0 came in (not a wait for a room no one will give back)
    assert (where / "shard.00000.mds").is_file() and not room.exists() and not part.exists()

    live = reservation("shard.99999.mds")
    holder = subprocess.Popen([str(BIN / "python"), "-c", "import fcntl, sys, time\nf = open(sys.argv[1], 'a')\n"
                               "fcntl.flock(f, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(600)",
                               str(live[2])], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        last = stream.tokens - 1
        reader = threading.Thread(target=stream.read, args=(last, 1), daemon=True)  # the last shard, not cached
        reader.start()
        reader.join(timeout=3)
        assert reader.is_alive() and live[0].exists()  # waits: every byte of the cache is held by a live download
        holder.kill()  # the holder dies; its lock goes with it
        reader.join(timeout=60)
        assert not reader.is_alive() and not live[0].exists() and not live[1].exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert sum(p.stat().st_size for p in where.glob("shard.*")) <= limit


def test_a_corrupted_object_is_one_sentence_naming_it(s3, remote_data, tmp_path):
    prefix = remote_data.removeprefix(f"s3://{BUCKET}/")
    bad = f"{prefix}-bad"
    for key in keys(s3, prefix + "/"):
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        if key.endswith("train/shard.00000.mds"):
            body = body[:500] + bytes([body[500] ^ 0x40]) + body[501:]  # same size: only the hash can tell
        s3.put_object(Bucket=BUCKET, Key=key.replace(prefix, bad, 1), Body=body)
    r = run_cli("train", *TINY, f"data.path=s3://{BUCKET}/{bad}", f"run.dir={tmp_path / 'run'}", "data.shuffle=false",
                f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=3")  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"s3://{BUCKET}/{bad}/train/shard.00000.mds' does not match its xxh3_64 hash" in r.stderr


@pytest.mark.slow
def test_the_server_stopped_mid_run_is_retried_then_one_sentence(s3, remote_data, tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    proc = subprocess.Popen(
        [str(BIN / "dist-clm"), "train", *TINY, f"data.path={remote_data}", f"run.dir={run}", "train.max_steps=200",
         "train.eval_every=0", "train.log_every=1", f"data.cache_dir={cache}", f"data.cache_limit={3 << 14}",
         "data.prefetch_steps=0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while not ((run / "metrics.jsonl").is_file() and len(train_losses(metrics(run))) >= 3):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.2)
        pid = int((S3_DIR / "weed.pid").read_text())
        os.killpg(pid, signal.SIGKILL)  # the storage goes away
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        start_server()
    assert proc.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert "could not download shard" in err and "after 5 tries" in err and "is reachable and rerun" in err


def slow_endpoint(rate: str, delay_ms: int = 0) -> tuple[subprocess.Popen, str]:
    """The local S3 server behind launchers/local_s3/slow_proxy.py: (the proxy's process, its endpoint)."""
    target = server_env()["S3_ENDPOINT_URL"].removeprefix("http://")
    proxy = subprocess.Popen(
        [str(BIN / "python"), str(ROOT / "launchers/local_s3/slow_proxy.py"), "--to", target, "--rate", rate,
         "--delay-ms", str(delay_ms)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = proxy.stdout.readline()
    assert line.startswith("listening on "), line
    return proxy, line.split()[-1]


def test_kill_9_during_a_download_leaves_nothing_taken_for_a_shard(s3, remote_data, data_dir, tmp_path):
    """A run whose shard downloads crawl (8 KB/s through a proxy) is killed with -9 while one is on its way: no
    file under a shard's name is anything but the whole shard, and the next run downloads it again."""
    proxy, endpoint = slow_endpoint("8KB")
    cache = tmp_path / "cache"
    settings = [*TINY, f"data.path={remote_data}", f"data.cache_dir={cache}", "train.max_steps=3",
                "train.eval_every=0", "data.prefetch_steps=0", f"data.cache_limit={4 << 14}"]  # fmt: skip
    proc = subprocess.Popen([str(BIN / "dist-clm"), "train", *settings, f"run.dir={tmp_path / 'killed'}"],
                            env={**os.environ, "S3_ENDPOINT_URL": endpoint}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 240
        while not any(cache.rglob(".shard.*")):  # a shard is on its way (written in pieces, or at its end)
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proxy.terminate()
        proxy.wait(timeout=30)

    def shards() -> dict[str, bytes]:  # split/name -> the bytes under that name in the cache
        return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in cache.rglob("shard.*")}

    assert any(cache.rglob(".shard.*")), "the kill came after the download"
    for name, body in shards().items():  # whatever is under a shard's name is the whole shard
        assert body == (data_dir / name).read_bytes(), name
    r = run_cli("train", *settings, f"run.dir={tmp_path / 'again'}")
    assert r.returncode == 0, r.stderr[-2000:]
    got = shards()
    assert got and all(body == (data_dir / name).read_bytes() for name, body in got.items())
    assert not [p for p in cache.rglob(".shard.*") if not p.name.endswith(".lock")]  # the leftovers went


def read_through_a_two_shard_cache(url: str, cache: Path, steps: int, prefetch: int) -> list:
    """`steps` steps of a loader (4 blocks of 64 tokens, shuffled) reading `url` through a cache of two shards,
    the prefetcher `prefetch` steps ahead: its batches' tokens."""
    from dist_clm.data import remote
    from dist_clm.data.format import read_manifest
    from dist_clm.data.loader import TrainLoader
    from dist_clm.data.order import Source

    remote.configure(cache, 2 * (1 << 14))  # (shards of at most 16 KiB)
    loader = TrainLoader([Source("a", url, read_manifest(url))], block_size=64, micro_batch=4, seed=3,
                         prefetch_steps=prefetch)  # fmt: skip
    try:
        batches = iter(loader)
        out = []
        for _ in range(steps):
            out.append(next(batches)["input_ids"].clone())
            loader.step_done()
        return out
    finally:
        loader.close()


def evict_all_it_may(mirror, _) -> None:
    """What a reservation of the whole cache does, forced here: every shard the cache may give up goes."""
    import fcntl

    with open(mirror.config.root / ".evict.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        mirror._make_room(mirror.config.limit)


def remove_it(_, got) -> None:
    """The fetched shard's file removed under its reader (by hand, or a tool that cleans caches)."""
    got.path.unlink(missing_ok=True)


@pytest.mark.parametrize("after_fetch", [evict_all_it_may, remove_it])
def test_a_shard_fetched_for_reading_is_read_whatever_the_cache_does_before_it_is_mapped(
    remote_data, data_dir, tmp_path, monkeypatch, after_fetch
):
    """Through a cache of two shards with the prefetcher 8 steps (32 shards) ahead, the cache evicts all it may
    (what the prefetcher's next reservation can do) or the file is removed between every fetch and its mapping
    (whoever fetched it: the loader or the prefetcher): the loader reads the blocks it reads from the local
    copy, no error; the shard it reads is never evicted."""
    from dist_clm.data import remote

    monkeypatch.setattr(remote, "_CONFIG", remote._CONFIG)  # (restored after)
    expected = read_through_a_two_shard_cache(str(data_dir), tmp_path / "unused", 10, 0)
    fetch = remote.Mirror.shard

    def fetch_then(mirror, *args, **kwargs):
        got = fetch(mirror, *args, **kwargs)
        after_fetch(mirror, got)
        return got

    monkeypatch.setattr(remote.Mirror, "shard", fetch_then)
    got = read_through_a_two_shard_cache(remote_data, tmp_path / "cache", 10, 8)
    assert all(a.equal(b) for a, b in zip(got, expected, strict=True))
    assert len(downloads(tmp_path / "cache")) > len({*downloads(tmp_path / "cache")})  # shards went and came back
    assert sum(p.stat().st_size for p in (tmp_path / "cache").glob("*/train/shard.*")) <= remote._CONFIG.limit
