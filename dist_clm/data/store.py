"""Where a prepare in parts keeps its files: a local (shared) directory or a bucket prefix, behind one small
interface (names are relative, '/'-separated). Locally every write is atomic and durable (fsutil); in a bucket
an object appears whole when its upload ends, which is the same promise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dist_clm.data import bucket
from dist_clm.fsutil import atomic_write_bytes


class Store:
    url: str

    def read_bytes(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        """FileNotFoundError if there is no such file."""
        raise NotImplementedError

    def write_bytes(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def names(self, folder: str) -> list[str]:
        """The names of the files directly in `folder`."""
        raise NotImplementedError

    def remove(self, name: str) -> None:
        """A file or a whole folder, if there."""
        raise NotImplementedError

    def read_json(self, name: str) -> dict | None:
        """The JSON object in `name`, None if it is not there (or not a complete JSON object)."""
        try:
            value = json.loads(self.read_bytes(name))
        except (FileNotFoundError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def write_json(self, name: str, value: dict) -> None:
        self.write_bytes(name, json.dumps(value, indent=1, sort_keys=True).encode())

    def where(self, name: str = "") -> str:
        return f"{self.url}/{name}" if name else self.url

    def map(self, fn, items) -> list:
        """[fn(item) for item in items], in order; for a bucket 32 at a time (each read is a round trip)."""
        return [fn(item) for item in items]


class LocalStore(Store):
    def __init__(self, root: Path):
        self.root, self.url = Path(root), str(root)

    def read_bytes(self, name, start=None, end=None):
        with open(self.root / name, "rb") as f:
            if start is None:
                return f.read()
            f.seek(start)
            return f.read((end - start) if end is not None else -1)

    def write_bytes(self, name, data):
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)

    def names(self, folder):
        d = self.root / folder
        return sorted(p.name for p in d.iterdir() if p.is_file()) if d.is_dir() else []

    def remove(self, name):
        path = self.root / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


class BucketStore(Store):
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def map(self, fn, items) -> list:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(32) as pool:
            return list(pool.map(fn, items))

    def read_bytes(self, name, start=None, end=None):
        return bucket.get(self.where(name), start, end)

    def write_bytes(self, name, data):
        bucket.put(self.where(name), data)

    def names(self, folder):
        prefix = self.where(folder).rstrip("/") + "/"
        return sorted(
            u.removeprefix(prefix) for u, _ in bucket.list_objects(prefix) if "/" not in u.removeprefix(prefix)
        )

    def remove(self, name):
        url = self.where(name)
        bucket.delete_prefix(url)
        try:
            b, key = bucket.split_url(url)
            bucket.client().delete_object(Bucket=b, Key=key)
        except Exception:  # noqa: BLE001 (not there)
            pass


def store(out: str | Path) -> Store:
    return BucketStore(str(out)) if bucket.is_s3(str(out)) else LocalStore(Path(out))
