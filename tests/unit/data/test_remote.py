"""Data in object storage, without a server (data/remote.py): URLs, sizes, the node cache's room and its downloads in
flight, errors worth a retry."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from string import hexdigits

import pytest

from dist_clm.data import remote
from dist_clm.errors import UserError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The node cache configured under tmp_path with a 300-byte limit; the previous configuration restored after."""
    monkeypatch.setattr(remote, "_CONFIG", remote._CONFIG)
    monkeypatch.setattr(remote, "_MIRRORS", {})
    remote.configure(tmp_path / "cache", 300)
    return tmp_path / "cache"


@pytest.mark.parametrize(
    "path, expected",
    [("s3://bucket/data", True), ("gs://b/p/", True), ("oci://b/x", True), ("file:///tmp/data", False),
     ("/tmp/data", False), ("data/prepared", False), ("c:data", False)],
)  # fmt: skip
def test_is_remote_only_for_object_storage_urls(path, expected):
    """A scheme:// URL is remote, except file://; a plain path is local."""
    assert remote.is_remote(path) is expected


@pytest.mark.parametrize(
    "text, expected",
    [("20GB", 20 * 10**9), ("512MiB", 512 * 2**20), ("1.5k", 1500), ("2 tib", 2 * 2**40), (" 10 ", 10),
     ("64KB", 64_000), (4096, 4096), (0, None), (None, None), ("", None), ("0", None), ("0GB", None), (-1, None)],
)  # fmt: skip
def test_parse_size_decimal_and_binary_units_and_no_limit(text, expected):
    """Sizes: decimal (k, M, G, T) and binary (KiB...) units, case and spaces free; 0 / None / '' mean no limit."""
    assert remote.parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "20 GBs", "1e9", "-5GB", "12 PB"])
def test_parse_size_refuses_what_is_not_a_size(text):
    """Anything else is one sentence naming the key and the value."""
    with pytest.raises(UserError, match=r"data.cache_limit .* is not a size"):
        remote.parse_size(text)


def test_local_dir_of_a_local_path_is_itself_and_mirrors_are_per_url(cache):
    """A local prepared directory is read in place; a URL's mirror is CACHE/<16 hex digits>/ with a SOURCE file,
    one per URL (a trailing slash is the same URL), configured anew by configure()."""
    assert remote.local_dir("/data/prepared") == remote.local_dir(Path("/data/prepared")) == Path("/data/prepared")
    assert remote.mirror_of("/data/prepared") is None
    m = remote.mirror("s3://bucket/data/")
    assert m is remote.mirror("s3://bucket/data") is remote.mirror_of("s3://bucket/data")
    assert m.root.parent == cache and len(m.root.name) == 16 and set(m.root.name) <= set(hexdigits)
    assert (m.root / "SOURCE").read_text() == "s3://bucket/data\n"
    assert remote.mirror("s3://bucket/other").root != m.root
    remote.configure(cache, "1KB")
    assert remote.mirror("s3://bucket/data") is not m and remote._CONFIG.limit == 1000


def put_shard(mirror, split, name, size, age):
    """A cached shard of `size` bytes last read `age` seconds ago."""
    path = mirror.root / split / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    t = 1_700_000_000 - age
    os.utime(path, (t, t))
    return path


def test_making_room_evicts_the_least_recently_read_shards_of_any_mirror(cache):
    """Room for a new shard removes the least recently read shards of the whole cache, no more than needed;
    shard() of a cached shard returns it without a download and marks it recently read."""
    a, b = remote.mirror("s3://bucket/a"), remote.mirror("s3://bucket/b")
    oldest = put_shard(a, "train", "shard.00000.mds", 100, age=40)
    second = put_shard(b, "train", "shard.00000.mds", 100, age=30)
    third = put_shard(a, "val", "shard.00001.mds", 100, age=20)
    (other := a.root / "train" / "index.json").write_text("{}")  # (not a shard: never counted or evicted)
    with a.shard("train", "shard.00000.mds", 100, check=None) as lease:  # now the most recently read
        assert lease.path == oldest
    assert a._make_room(150) == remote.MADE
    assert [p.exists() for p in (oldest, second, third, other)] == [True, False, False, True]
    assert a._make_room(301) != remote.MADE


def test_a_shard_open_for_reading_is_never_evicted_and_a_dead_reader_pins_nothing(cache):
    """A lease (a shared lock on the open shard, of any reader) makes eviction pass over the shard, even when
    no room is made then; released, or its file closed (its process ended, kill -9 included), it goes as any
    other."""
    m = remote.mirror("s3://bucket/data")
    held = put_shard(m, "train", "shard.00000.mds", 100, age=30)
    other = put_shard(m, "train", "shard.00001.mds", 100, age=40)
    lease = m.shard("train", "shard.00000.mds", 100, check=None)  # (cached: opened and held, nothing downloaded)
    assert m._make_room(300) == remote.HELD_OPEN and held.exists() and not other.exists()
    lease.release()
    with open(held, "rb") as other_reader:  # (a lock of another open file: as another process's)
        fcntl.flock(other_reader, fcntl.LOCK_SH)
        assert m._make_room(300) == remote.HELD_OPEN and held.exists()
    # closed as a process's files are at its end, kill -9 included: the lock went with it
    assert m._make_room(300) == remote.MADE and not held.exists()


def test_a_shard_evicted_as_its_reader_opens_it_is_not_leased(cache, monkeypatch):
    """Evicted between its opening and its lock, a shard is not taken (its reader fetches it again): the file
    is checked through the descriptor, which still reads it, not through its path."""
    shard = put_shard(remote.mirror("s3://bucket/data"), "train", "shard.00000.mds", 100, age=10)
    flock = fcntl.flock

    def evicted_first(fd, op):  # the eviction's unlink comes just before the reader's lock
        shard.unlink(missing_ok=True)
        flock(fd, op)

    monkeypatch.setattr(remote.fcntl, "flock", evicted_first)
    assert remote.Lease.take(shard) is None


def test_reserving_room_counts_downloads_in_flight_and_clears_dead_ones(cache):
    """A live download's `.room` holds its bytes; a dead one's room and partial file are removed; a shard larger
    than the whole limit is one sentence saying to raise data.cache_limit."""
    m = remote.mirror("s3://bucket/data")
    kept = put_shard(m, "train", "shard.00000.mds", 100, age=10)
    names = (".shard.00001.mds.room", ".shard.00002.mds.room", ".shard.00002.mds.part")  # 1: alive, 2: dead
    live, dead_room, dead_part = (m.root / "train" / n for n in names)
    for path, size in ((live, 150), (dead_room, 100), (dead_part, 10)):
        path.write_bytes(b"\0" * size)
    with contextlib.ExitStack() as stack:
        for i in (1, 3):  # the downloads of shards 1 and 3 are alive: their locks are held
            fcntl.flock(stack.enter_context(open(m.root / "train" / f".shard.0000{i}.mds.lock", "a")), fcntl.LOCK_EX)
        room = m.root / "train" / ".shard.00003.mds.room"
        m._reserve(room, 50, "shard.00003.mds")  # 100 + 150 + 50 fit in 300: nothing evicted
        assert room.stat().st_size == 50 and kept.exists() and live.exists()
        assert not dead_room.exists() and not dead_part.exists()
        assert m._make_room(101) == remote.IN_FLIGHT  # the rooms in flight hold 200: 101 more cannot fit
        assert kept.exists() and live.exists() and room.exists()  # so the cached shard stays while it waits
        assert m._make_room(100) == remote.MADE and not kept.exists()  # 200 + 100 fit once the shard goes
    with pytest.raises(UserError, match=r"data.cache_limit \(300 bytes\) cannot hold the shard 'big'"):
        m._reserve(m.root / "train" / ".big.room", 301, "big")


def test_not_found_is_told_apart_from_failures_worth_a_retry():
    """A missing file (FileNotFoundError, S3's 404 / NoSuchKey / NoSuchBucket) is not retried; others are."""
    from botocore.exceptions import ClientError

    s3_error = lambda code: ClientError({"Error": {"Code": code, "Message": "m"}}, "GetObject")  # noqa: E731
    assert remote._not_found(FileNotFoundError("x"))
    assert all(remote._not_found(s3_error(c)) for c in ("404", "NoSuchKey", "NoSuchBucket"))
    assert not remote._not_found(s3_error("500")) and not remote._not_found(TimeoutError("slow"))


def test_a_limit_below_one_shard_per_reading_process_is_one_sentence(cache):
    """Each process reading remote data keeps one shard open: a limit that cannot hold one per process of the node
    (they would wait for each other forever) is one sentence with the minimum."""
    remote.check_room_for_readers(3, 100)  # 300 bytes hold them
    with pytest.raises(UserError, match=r"data.cache_limit \(300 bytes\) cannot hold the shards read at once on "
                       r"this node: 4 processes .* to at least 400 bytes\.$"):  # fmt: skip
        remote.check_room_for_readers(4, 100)
