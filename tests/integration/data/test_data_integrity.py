"""Damaged prepared data, for real: shards truncated, changed or renamed in index.json, a token id past the
vocabulary, a broken manifest or index, a second prepare into the same output, a full disk. Each is refused
with one sentence naming the file (a DataError, or exit 2 through the CLI), before anything else happens.

The session's `data_dir` is never changed: every test damages its own copy."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from dist_clm.data.audit import inspect, verify
from dist_clm.data.batches import MixedBlocks
from dist_clm.data.format import SHARD_HASH, read_manifest
from dist_clm.data.loader import TrainLoader
from dist_clm.data.order import Source
from dist_clm.data.prepare import prepare
from dist_clm.data.stream import ChunkStore, TokenStream
from dist_clm.errors import DataError
from dist_clm.parallel.process_group import free_port
from tests.helpers import BIN, TINY, assert_clean_error, metrics, run_cli


@pytest.fixture(scope="module")
def zstd_dir(tmp_path_factory, corpus_dir, tokenizer_dir) -> Path:
    """data_dir's corpus prepared with compressed shards (copy it with `copy_data` before damaging it)."""
    out = tmp_path_factory.mktemp("zstd") / "prepared"
    prepare(
        tokenizer_dir, out, [str(corpus_dir)], val_fraction=0.15, chunk_tokens=1000, shard_bytes=1 << 14,
        compression="zstd", progress=False,
    )  # fmt: skip
    return out


def copy_data(src: Path, tmp_path: Path, name: str = "copy") -> Path:
    """A copy to damage; without the raw files a reader decompressed from compressed ones (as prepare left it)."""
    dst = tmp_path / name
    shutil.copytree(src, dst, ignore=lambda _, names: [n for n in names if f"{n}.zstd" in names])
    return dst


def index_of(split_dir: Path) -> dict:
    return json.loads((split_dir / "index.json").read_text())


def write_index(split_dir: Path, index: dict) -> None:
    (split_dir / "index.json").write_text(json.dumps(index))


def flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x40
    path.write_bytes(bytes(data))


def one_sentence(message: str, *fragments: str) -> None:
    """What a user sees: one line, one sentence ending in a period, holding each fragment."""
    assert "\n" not in message and "Traceback" not in message and message.endswith("."), message
    for f in fragments:
        assert f in message, (f, message)


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def src(d: Path) -> Source:
    return Source(d.name, str(d), read_manifest(d))


def loader(d: Path, workers: int = 0) -> TrainLoader:
    return TrainLoader([src(d)], block_size=64, micro_batch=2, shuffle=False, num_workers=workers)


def test_index_records_each_shard_file_size_and_hash(data_dir, zstd_dir):
    from streaming.base.compression import decompress
    from streaming.base.hashing import get_hash

    for d, compressed in ((data_dir, False), (zstd_dir, True)):
        for split in ("train", "val"):
            for shard in index_of(d / split)["shards"]:
                assert shard["hashes"] == [SHARD_HASH] == ["xxh3_64"]
                packed = (d / split / shard["zip_data"]["basename"]).read_bytes() if compressed else None
                raw = (
                    decompress("zstd", packed)
                    if compressed
                    else (d / split / shard["raw_data"]["basename"]).read_bytes()
                )
                assert shard["raw_data"]["bytes"] == len(raw)
                assert shard["raw_data"]["hashes"] == {SHARD_HASH: get_hash(SHARD_HASH, raw)}
                if compressed:
                    assert shard["zip_data"]["bytes"] == len(packed)
                    assert shard["zip_data"]["hashes"] == {SHARD_HASH: get_hash(SHARD_HASH, packed)}
                else:
                    assert shard["zip_data"] is None


def test_truncated_shard_is_refused_when_the_split_is_opened(tmp_path, data_dir):
    d = copy_data(data_dir, tmp_path)
    shard = d / "train" / "shard.00001.mds"
    full = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: full // 2])
    with pytest.raises(DataError) as e:
        ChunkStore(d / "train")
    one_sentence(
        str(e.value), f"'{shard}'", f"{full // 2:,} bytes where index.json says {full:,}", "prepare the data again"
    )
    with pytest.raises(DataError, match=re.escape(str(shard))):
        loader(d)  # before any training step
    for args in ([], ["--verify"]):
        assert_clean_error(run_cli("data", "inspect", str(d), *args), str(shard), "prepare the data again")


def test_truncated_shard_stops_training_before_it_starts(tmp_path, data_dir):
    d = copy_data(data_dir, tmp_path)
    shard = d / "train" / "shard.00002.mds"
    shard.write_bytes(shard.read_bytes()[:100])
    r = run_cli("train", *TINY, f"data.path={d}", f"run.dir={tmp_path / 'run'}", "train.max_steps=4")
    assert_clean_error(r, str(shard), "prepare the data again")


@pytest.mark.parametrize("workers", [0, 2])
def test_changed_shard_is_refused_at_its_first_read(tmp_path, data_dir, workers):
    d = copy_data(data_dir, tmp_path)
    shard = d / "train" / "shard.00000.mds"
    flip_byte(shard)  # same size: only the hash can tell
    store = ChunkStore(d / "train")
    np.testing.assert_array_equal(store.arrays(len(store) - 1)["tokens"], store[len(store) - 1]["tokens"])
    with pytest.raises(DataError) as e:
        store.arrays(0)
    one_sentence(str(e.value), f"'{shard}'", "does not match its xxh3_64 hash in index.json", "prepare the data again")
    # through the DataLoader (block 0 is in shard 0 without shuffling): the same sentence, from a worker too
    with pytest.raises(DataError) as e:
        next(iter(loader(d, workers)))
    one_sentence(str(e.value), f"'{shard}'", "xxh3_64 hash")


def test_compressed_shard_is_checked_before_it_is_decompressed(tmp_path, zstd_dir):
    d = copy_data(zstd_dir, tmp_path)
    packed = d / "train" / "shard.00001.mds.zstd"
    flip_byte(packed)
    with pytest.raises(DataError) as e:
        ChunkStore(d / "train")
    one_sentence(str(e.value), f"'{packed}'", "xxh3_64 hash", "prepare the data again")
    assert not (d / "train" / "shard.00001.mds").exists()
    assert not list((d / "train").glob(".*.tmp"))
    # the raw file must come out of decompression with index.json's size
    d2 = copy_data(zstd_dir, tmp_path, "copy2")
    index = index_of(d2 / "train")
    index["shards"][1]["raw_data"]["bytes"] += 1
    write_index(d2 / "train", index)
    with pytest.raises(DataError, match=re.escape(f"'{d2 / 'train' / 'shard.00001.mds.zstd'}' decompresses to")):
        ChunkStore(d2 / "train")
    assert not (d2 / "train" / "shard.00001.mds").exists()
    # a good copy decompresses, reads back, and every raw file is hashed at its first map
    good = ChunkStore(copy_data(zstd_dir, tmp_path, "good") / "train")
    assert all(good.arrays(i)["tokens"].tolist() == good[i]["tokens"].tolist() for i in range(len(good)))


def test_data_prepared_without_hashes_is_still_read(tmp_path, data_dir):
    """Data from before hashes were recorded: sizes are checked, hashes cannot be."""
    d = copy_data(data_dir, tmp_path)
    index = index_of(d / "train")
    for s in index["shards"]:
        s["hashes"], s["raw_data"]["hashes"] = [], {}
    write_index(d / "train", index)
    flip_byte(d / "train" / "shard.00000.mds", 0.9)
    store = ChunkStore(d / "train")
    assert store.files.verify_shard(0) is None
    assert len(store.arrays(0)["tokens"]) == 1000


@pytest.mark.parametrize("name", ["../../escape/loot", "/etc/passwd", "", "sub/shard.00000.mds", "..", "."])
@pytest.mark.parametrize("field", ["raw_data", "zip_data"])
def test_index_names_must_be_plain_file_names(tmp_path, zstd_dir, name, field):
    d = copy_data(zstd_dir, tmp_path)
    (tmp_path / "escape").mkdir()
    index = index_of(d / "train")
    index["shards"][0][field]["basename"] = name
    write_index(d / "train", index)
    before = files_under(tmp_path)
    with pytest.raises(DataError) as e:
        ChunkStore(d / "train")
    one_sentence(str(e.value), f"'{d / 'train' / 'index.json'}'", repr(name), "not a plain file name")
    assert files_under(tmp_path) == before  # nothing read into place, nothing written anywhere


def test_inspect_refuses_a_name_outside_the_dataset_and_writes_nothing(tmp_path, zstd_dir):
    """The case that wrote 92 KB outside the dataset: a raw name leading out of it, its compressed file there."""
    d = copy_data(zstd_dir, tmp_path)
    (tmp_path / "escape").mkdir()
    index = index_of(d / "train")
    index["shards"][0]["raw_data"]["basename"] = "../../escape/loot"
    write_index(d / "train", index)
    before = files_under(tmp_path)
    r = run_cli("data", "inspect", str(d))
    assert_clean_error(r, "'../../escape/loot'", "not a plain file name", "prepare the data again")
    assert files_under(tmp_path) == before and not list((tmp_path / "escape").iterdir())
    # inspect reads only train, but checks the names of every split
    v = copy_data(zstd_dir, tmp_path, "val_bad")
    index = index_of(v / "val")
    index["shards"][0]["zip_data"]["basename"] = "../x"
    write_index(v / "val", index)
    with pytest.raises(DataError, match="not a plain file name"):
        inspect(v)


@pytest.mark.parametrize(
    "target, content",
    [
        ("manifest.json", b'{"format": "dist_clm.prepared/1", "splits'),
        ("manifest.json", b"\xff\xfe\x00garbage"),
        ("manifest.json", b"[1, 2]"),
        ("manifest.json", b'{"format": "dist_clm.prepared/1"}'),
        ("train/index.json", b'{"version": 2, "shards": [{"samp'),
        ("train/index.json", b"{}"),
        ("train/index.json", b'{"shards": [{"format": "mds", "samples": 3}]}'),
        ("train/index.json", b""),
    ],
)
def test_damaged_manifest_or_index_is_one_sentence(tmp_path, data_dir, target, content):
    d = copy_data(data_dir, tmp_path)
    (d / target).write_bytes(content)
    with pytest.raises(DataError) as e:
        ChunkStore(d / "train") if target.startswith("train") else read_manifest(d)
    one_sentence(str(e.value), f"'{d / target}'", "prepare the data again")


@pytest.mark.parametrize("target", ["manifest.json", "train/index.json"])
def test_damaged_manifest_or_index_through_the_cli(tmp_path, data_dir, target):
    d = copy_data(data_dir, tmp_path)
    (d / target).write_text("{ not json")
    assert_clean_error(run_cli("data", "inspect", str(d)), str(d / target), "prepare the data again")


def shard_and_sample(split_dir: Path, chunk: int) -> tuple[Path, int]:
    """The shard file holding chunk `chunk` of a split, and its sample number there, from index.json."""
    for shard in index_of(split_dir)["shards"]:
        if chunk < shard["samples"]:
            return split_dir / shard["raw_data"]["basename"], chunk
        chunk -= shard["samples"]
    raise IndexError(chunk)


def put_token(d: Path, chunk: int, position: int, value: int, rehash: bool = True) -> Path:
    """Write `value` at `position` of train chunk `chunk` in its shard; index.json's hash made to agree (the
    damage then is one no hash can see: before hashing, or in memory)."""
    from streaming.base.hashing import get_hash

    path, _ = shard_and_sample(d / "train", chunk)
    data = bytearray(path.read_bytes())
    tokens = ChunkStore(d / "train")[chunk]["tokens"]
    at = data.find(tokens.tobytes()) + position * tokens.itemsize
    data[at : at + tokens.itemsize] = np.asarray(value, dtype=tokens.dtype).tobytes()
    path.write_bytes(bytes(data))
    if rehash:
        index = index_of(d / "train")
        for s in index["shards"]:
            if s["raw_data"]["basename"] == path.name:
                s["raw_data"]["hashes"] = {SHARD_HASH: get_hash(SHARD_HASH, bytes(data))}
        write_index(d / "train", index)
    return path


@pytest.mark.parametrize("workers", [0, 2])
def test_token_id_past_the_vocabulary_is_refused_with_its_shard(tmp_path, data_dir, workers):
    d = copy_data(data_dir, tmp_path)
    limit = read_manifest(d)["max_token_id"]
    shard = put_token(d, chunk=0, position=5, value=60000)
    with pytest.raises(DataError) as e:
        next(iter(loader(d, workers)))  # block 0 holds chunk 0's first 64 tokens
    one_sentence(str(e.value), f"'{shard}'", "token id 60000 in chunk 0", f"above {limit}", "prepare the data again")
    # a block elsewhere in the stream is fine, and the check is per block
    blocks = MixedBlocks([src(d)], 64, False, 0, False)
    assert blocks[1]["input_ids"].max() <= limit
    with pytest.raises(DataError, match="token id 60000 in chunk 0"):
        blocks[0]


@pytest.mark.slow
def test_damage_one_rank_finds_stops_every_rank_with_its_sentence(tmp_path, data_dir):
    """Two ranks; a token past the vocabulary in a block only rank 1 reads, at step 2: rank 1 trains the step
    on a blank batch, the step's agreement carries the damage, the update is dropped, and both ranks stop
    with rank 1's sentence, printed once (by rank 0), with no rank left waiting in a collective."""
    d = copy_data(data_dir, tmp_path)
    world, micro, block = 2, 4, 64  # TINY's micro batch and block
    rank1 = TrainLoader([src(d)], block_size=block, micro_batch=micro, rank=1, world=world, shuffle=True, seed=1234)
    g = world * micro + micro  # step 2's first block of rank 1
    offset = rank1.blocks.blocks[0].position(g) + 10
    shard = put_token(d, chunk=offset // 1000, position=offset % 1000, value=60000)
    run = tmp_path / "run"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "dist_clm",
           "train", *TINY, f"data.path={d}", f"run.dir={run}", "train.max_steps=6", "train.log_every=1",
           "train.eval_every=0", "checkpoint.save_every=0"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    errors = [line for line in (r.stdout + r.stderr).splitlines() if "dist-clm: error:" in line]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    one_sentence(errors[0].split("dist-clm: error: ")[1], f"'{shard}'", "token id 60000", "prepare the data again")
    assert [row["step"] for row in metrics(run) if "train/loss" in row] == [1]  # step 2 was not applied


def test_token_check_names_the_right_chunk_deep_in_the_stream(tmp_path, data_dir):
    d = copy_data(data_dir, tmp_path)
    chunk = read_manifest(d)["splits"]["train"]["chunks"] - 2
    shard = put_token(d, chunk=chunk, position=999, value=600)  # the last token of a chunk, just past 511
    path, j = shard_and_sample(d / "train", chunk)
    blocks = MixedBlocks([src(d)], 64, False, 0, False)
    with pytest.raises(DataError) as e:
        blocks[(chunk * 1000 + 999) // 64]
    one_sentence(str(e.value), f"'{shard}'", f"token id 600 in chunk {chunk} (its sample {j})")
    assert path == shard
    # validation and evaluation read windows with TokenStream.read: checked the same way
    stream = TokenStream(d, "train", read_manifest(d))
    with pytest.raises(DataError, match=re.escape(f"token id 600 in chunk {chunk} (its sample {j})")):
        stream.read(chunk * 1000 + 990, 20)
    assert stream.read(chunk * 1000 + 990, 9).max() <= read_manifest(d)["max_token_id"]


def test_verify_passes_on_good_data(data_dir, zstd_dir):
    for d in (data_dir, zstd_dir):
        r = run_cli("data", "inspect", str(d), "--verify")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.strip().splitlines()
        m = read_manifest(d)
        assert [line.split(":")[0] for line in lines] == ["train", "val"]
        for line, split in zip(lines, ("train", "val"), strict=True):
            assert "ok:" in line and "xxh3_64 hashes" in line
            assert f"{m['splits'][split]['chunks']:,} chunks, {m['splits'][split]['tokens']:,} tokens" in line


def damage(d: Path, how: str) -> list[str]:
    """Damage `d` one way; the fragments the error must hold."""
    if how == "truncated":
        shard = d / "val" / "shard.00000.mds"
        shard.write_bytes(shard.read_bytes()[:-10])
        return [str(shard), "bytes where index.json says"]
    if how == "changed":
        shard = d / "val" / "shard.00000.mds"
        flip_byte(shard, 0.7)
        return [str(shard), "xxh3_64 hash"]
    if how == "name":
        index = index_of(d / "val")
        index["shards"][-1]["raw_data"]["basename"] = "../train/shard.00000.mds"
        write_index(d / "val", index)
        return ["not a plain file name"]
    if how == "chunks":
        m = json.loads((d / "manifest.json").read_text())
        m["splits"]["val"]["chunks"] -= 1
        (d / "manifest.json").write_text(json.dumps(m))
        return [str(d / "val"), "chunks but", "manifest.json"]
    if how == "token":
        put_token(d, chunk=3, position=17, value=513)
        return ["token id 513 in chunk 3", str(d / "train")]
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "changed", "name", "chunks", "token"])
def test_verify_finds_damage_in_any_split(tmp_path, data_dir, how):
    d = copy_data(data_dir, tmp_path)
    fragments = damage(d, how)
    r = run_cli("data", "inspect", str(d), "--verify")
    assert_clean_error(r, *fragments, "prepare the data again")
    with pytest.raises(DataError):
        verify(d)


def test_a_second_prepare_into_the_same_output_is_refused_while_the_first_runs(tmp_path, corpus_dir, tokenizer_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k in range(6):  # ~4 MB: seconds of work after the output directory is claimed
        for f in corpus_dir.iterdir():
            (corpus / f"{k}_{f.name}").write_text(f.read_text())
    out = tmp_path / "out"
    args = ["prepare", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--num-proc", "1", "--quiet"]
    first = subprocess.Popen([str(BIN / "dist-clm"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    owner = tmp_path / ".out.partial" / "OWNER"
    deadline = time.time() + 120
    while not (owner.is_file() and owner.read_text().strip()):
        assert first.poll() is None, first.communicate()
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(first.pid, signal.SIGSTOP)  # alive, owning the output, for as long as the second one takes
    try:
        second = run_cli(*args)
        assert_clean_error(second, f"another prepare (pid {first.pid}) is writing '{out}'", "wait for it")
        assert owner.read_text().split()[0] == str(first.pid)  # the first one's directory untouched
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert read_manifest(out)["splits"]["train"]["documents"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KB tmpfs: too small for the prepared corpus (~650 KB), big enough for its tokenizer."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("filling a real disk needs a small tmpfs, and mounting one needs root and mount(8)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mounting a small tmpfs is not permitted here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_during_prepare_is_one_sentence_and_leaves_nothing(small_disk, corpus_dir, tokenizer_dir):
    out = small_disk / "out"
    r = run_cli("prepare", str(corpus_dir), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--quiet")
    assert_clean_error(r, "no space left on device while writing", str(out), "choose another --out")
    assert list(small_disk.iterdir()) == []  # no partial directory, nothing else
    assert shutil.disk_usage(small_disk).used < 64 << 10
