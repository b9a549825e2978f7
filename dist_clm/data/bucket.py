"""Reading and writing objects of an S3-compatible bucket (s3://bucket/key) with boto3, the client streaming
itself uses (a dependency through it), configured the same way: S3_ENDPOINT_URL for a server other than AWS,
credentials from the environment or the usual files.

What prepare needs of a bucket, and nothing more: listing a prefix (with a glob over the keys), reading an
object as a seekable file (ranged GETs: a task reads only its byte range of a large object, a parquet reader
only the row groups it asks for), and small whole objects (the records of a prepare in parts).
"""

from __future__ import annotations

import fnmatch
import io
import os
import threading
from functools import cache

from dist_clm.errors import UserError

_LOCAL = threading.local()


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def split_url(url: str) -> tuple[str, str]:
    """s3://bucket/a/b -> ('bucket', 'a/b')."""
    bucket, _, key = str(url).removeprefix("s3://").partition("/")
    if not bucket:
        raise UserError(f"'{url}' names no bucket; write it as s3://BUCKET/PATH.")
    return bucket, key


def client():
    """A boto3 S3 client for this thread (clients are cheap to share, sessions are not thread-safe to make)."""
    c = getattr(_LOCAL, "client", None)
    if c is None or getattr(_LOCAL, "pid", None) != os.getpid():
        import boto3
        from botocore.config import Config

        c = boto3.session.Session().client(
            "s3",
            endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None,
            config=Config(retries={"max_attempts": 6, "mode": "adaptive"}),
        )
        _LOCAL.client, _LOCAL.pid = c, os.getpid()
    return c


def _failed(url: str, e: Exception) -> UserError:
    endpoint = os.environ.get("S3_ENDPOINT_URL")
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(
        f"reading '{url}' failed ({detail}); check the URL, the credentials and that the storage"
        f"{f' at {endpoint}' if endpoint else ''} is reachable."
    )


def not_found(e: BaseException) -> bool:
    code = getattr(e, "response", {}).get("Error", {}).get("Code") if hasattr(e, "response") else None
    return code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound")


def list_objects(url: str) -> list[tuple[str, int]]:
    """(url, size) of every object under the prefix `url`, sorted by key; a glob (`*`, `?`, `[..]`) in `url`
    is matched against whole keys, the part before its first wildcard listed as the prefix."""
    bucket, key = split_url(url)
    wild = next((i for i, c in enumerate(key) if c in "*?["), None)
    prefix = key if wild is None else key[:wild]
    found = []
    try:
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                k = obj["Key"]
                if k.endswith("/"):
                    continue
                if wild is None:
                    if prefix and k != prefix and not prefix.endswith("/") and not k.startswith(prefix + "/"):
                        continue  # 's3://b/data' lists data and data/..., not data2
                elif not fnmatch.fnmatchcase(k, key):
                    continue
                found.append((f"s3://{bucket}/{k}", int(obj["Size"])))
    except Exception as e:  # noqa: BLE001 (botocore raises its own types)
        raise _failed(url, e) from None
    return sorted(found)


def get(url: str, start: int | None = None, end: int | None = None) -> bytes:
    """The object's bytes [start, end) (all of them by default). FileNotFoundError if it is not there."""
    bucket, key = split_url(url)
    extra = {} if start is None else {"Range": f"bytes={start}-{'' if end is None else end - 1}"}
    try:
        return client().get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
    except Exception as e:  # noqa: BLE001
        if not_found(e):
            raise FileNotFoundError(url) from None
        raise _failed(url, e) from None


def put(url: str, data: bytes) -> None:
    bucket, key = split_url(url)
    try:
        client().put_object(Bucket=bucket, Key=key, Body=data)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"writing '{url}' failed ({str(e).strip()[:200]}); check the bucket and rerun.") from None


def copy(src: str, dst: str) -> None:
    """A server-side copy (no bytes through this machine)."""
    sb, sk = split_url(src)
    db, dk = split_url(dst)
    try:
        client().copy_object(Bucket=db, Key=dk, CopySource={"Bucket": sb, "Key": sk})
    except Exception as e:  # noqa: BLE001
        raise UserError(f"copying '{src}' to '{dst}' failed ({str(e).strip()[:200]}); rerun.") from None


def delete_prefix(url: str) -> None:
    """Remove every object under `url`/ (what an interrupted part left)."""
    bucket, key = split_url(url)
    keys = [{"Key": u.removeprefix(f"s3://{bucket}/")} for u, _ in list_objects(url.rstrip("/") + "/")]
    for i in range(0, len(keys), 1000):
        client().delete_objects(Bucket=bucket, Delete={"Objects": keys[i : i + 1000], "Quiet": True})


@cache
def _size(url: str) -> int:
    bucket, key = split_url(url)
    try:
        return int(client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    except Exception as e:  # noqa: BLE001
        if not_found(e):
            raise FileNotFoundError(url) from None
        raise _failed(url, e) from None


class ObjectFile(io.RawIOBase):
    """An object as a seekable binary file: each read is a ranged GET (wrap it in io.BufferedReader so reads
    are large)."""

    def __init__(self, url: str, size: int | None = None):
        self.url, self.size, self.pos = url, _size(url) if size is None else size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        data = get(self.url, self.pos, self.pos + n)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def open_object(url: str, size: int | None = None, buffer: int = 1 << 22) -> io.BufferedReader:
    """A buffered, seekable reader of the object (4 MiB ranged GETs by default)."""
    return io.BufferedReader(ObjectFile(url, size), buffer_size=buffer)
