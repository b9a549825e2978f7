"""Turning "a corpus" into an ordered, lazy stream of documents (strings).

A corpus is one of:
- inputs: local files, directories (searched recursively) and glob patterns, or objects of a bucket
  (`s3://bucket/prefix`, every object under it; `s3://bucket/dir/*.parquet`, a glob over the keys). By suffix
  (after an optional `.gz` / `.zst` compression suffix): `.jsonl`/`.ndjson`/`.json` hold records (one document
  per record, its `text_column`), `.parquet` and `.csv`/`.tsv` hold rows (same), every other file is one document;
- a directory written by `datasets` `save_to_disk` (detected by its `state.json` / `dataset_dict.json`);
- a Hugging Face dataset by name or local dataset directory, through `datasets.load_dataset` with
  `streaming=True` (the code path is the same with or without network).
Nothing reads a whole corpus into memory: files are read record by record, parquet by row groups, HF datasets
as iterable (streaming) datasets, objects of a bucket through ranged reads (bucket.py). With no inputs at all,
the embedded default corpus is used: a few hundred `.py` files of the running Python's own standard library,
which every machine has.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from dist_clm import console
from dist_clm.data import bucket
from dist_clm.data.bucket import is_s3
from dist_clm.errors import UserError

RECORD_SUFFIXES = {".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".tsv"}
TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".py"}
COMPRESSION_SUFFIXES = {".gz", ".zst", ".zstd"}
_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "__pycache__"}
_HF_DISK_MARKERS = ("state.json", "dataset_dict.json")  # what `save_to_disk` writes


def default_corpus_files(n: int = 300) -> list[Path]:
    """`n` standard-library source files spread evenly over the sorted list (tests and site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))
    if len(files) <= n:
        return files
    step = len(files) / n
    return [files[int(i * step)] for i in range(n)]


@dataclass
class Report:
    """What reading the corpus ran into: counted in the manifest, a few examples named."""

    undecodable: int = 0  # documents with bytes that are not UTF-8 (kept, bad bytes replaced by U+FFFD)
    undecodable_examples: list[str] = field(default_factory=list)

    def bad_bytes(self, where: str, position: int) -> None:
        self.undecodable += 1
        if len(self.undecodable_examples) < 5:
            self.undecodable_examples.append(f"{where} (byte {position})")
            console.warning(f"{where} is not valid UTF-8 at byte {position}; bad bytes replaced")


def inner_suffix(path: Path | str) -> str:
    """`a.jsonl.gz` -> `.jsonl`; `a.txt` -> `.txt` (a path or an object's URL)."""
    suffixes = [s.lower() for s in PurePosixPath(str(path)).suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _wanted(path: Path | str) -> bool:
    return inner_suffix(path) in TEXT_SUFFIXES | RECORD_SUFFIXES


def is_hf_disk_dir(path: Path | str) -> bool:
    return isinstance(path, Path) and path.is_dir() and any((path / m).is_file() for m in _HF_DISK_MARKERS)


def resolve_inputs(inputs: list[str]) -> list[Path | str]:
    """Expand files, directories, globs and bucket URLs into a de-duplicated list, each item's files sorted
    (save_to_disk dirs kept whole; a bucket's objects as URLs)."""
    return list(list_inputs(inputs))


def list_inputs(inputs: list[str]) -> dict[Path | str, int]:
    """resolve_inputs' files with their sizes in bytes (a save_to_disk directory: its files together)."""
    found: dict[Path | str, int] = {}
    for item in inputs:
        if is_s3(item):
            objects = [(url, size) for url, size in bucket.list_objects(item) if _wanted(url)]
            if not objects:
                known = ", ".join(sorted(TEXT_SUFFIXES | RECORD_SUFFIXES))
                raise UserError(f"'{item}' holds no objects of a known kind ({known}, optionally .gz/.zst); "
                                "check the URL, or name the objects with a glob.")  # fmt: skip
            for url, size in objects:
                found.setdefault(url, size)
            continue
        if glob.has_magic(item):
            files = [m for m in sorted(Path(m) for m in glob.glob(item, recursive=True)) if m.is_file()]
            if not files:
                raise UserError(
                    f"input pattern '{item}' matches no files; check the pattern or quote it for the shell."
                )
        else:
            p = Path(item)
            if not p.exists():
                raise UserError(f"input path '{item}' does not exist; give existing files, directories or globs.")
            if is_hf_disk_dir(p):
                files = [p]
            elif p.is_dir():
                files = sorted(f for f in p.rglob("*") if f.is_file() and _wanted(f))
                if not files:
                    known = ", ".join(sorted(TEXT_SUFFIXES | RECORD_SUFFIXES))
                    raise UserError(
                        f"directory '{item}' holds no files of a known kind ({known}, optionally .gz/.zst); "
                        "name the files directly or use a glob."
                    )
            else:
                files = [p]
        for f in files:
            if f not in found:
                found[f] = (
                    sum(g.stat().st_size for g in f.rglob("*") if g.is_file()) if f.is_dir() else f.stat().st_size
                )
    return found


def open_bytes(path: Path | str) -> io.BufferedIOBase:
    """The file's stored bytes, seekable: a local file, or a bucket's object through ranged reads."""
    return bucket.open_object(str(path)) if is_s3(str(path)) else open(path, "rb")  # noqa: SIM115


def _open_binary(path: Path | str) -> io.BufferedReader:
    """A buffered binary stream of the file's (decompressed) bytes; never inflated whole."""
    suffix = PurePosixPath(str(path)).suffix.lower()
    if suffix == ".gz":
        raw = gzip.GzipFile(fileobj=open_bytes(path), mode="rb")  # noqa: SIM115 (the caller closes the stream)
    elif suffix in (".zst", ".zstd"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(open_bytes(path), closefd=True)
    elif is_s3(str(path)):
        return bucket.open_object(str(path))
    else:
        raw = open(path, "rb", buffering=0)  # noqa: SIM115
    return io.BufferedReader(raw, buffer_size=1 << 16)


def _decode(data: bytes, where: str, report: Report) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        report.bad_bytes(where, e.start)
        return data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Columns:
    """The columns a record must have, and what to tell a user whose records lack them."""

    names: tuple[str, ...]
    fix: str  # the end of the sentence for a missing column, e.g. "set --text-column to one of them"

    def check(self, record, where: str) -> dict:
        """`record`'s values of these columns, or one sentence why it has none."""
        if not isinstance(record, dict):
            wanted = f"a '{self.names[0]}' field" if len(self.names) == 1 else ", ".join(self.names)
            raise UserError(f"{where} is not a JSON object; each record must be an object with {wanted}.")
        missing = [c for c in self.names if c not in record]
        if missing:
            raise self.missing(where, missing[0], record)
        return {c: record[c] for c in self.names}

    def missing(self, where: str, column: str, present) -> UserError:
        return UserError(
            f"{where} has no column '{column}' (columns: {', '.join(map(str, present)) or 'none'}); {self.fix}."
        )


def as_text(value) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def json_lines(path: Path | str, columns: Columns, report: Report, lo: int, hi: int,
               done=None) -> Iterator[tuple[str, dict]]:  # fmt: skip
    """The JSON lines of an uncompressed file that start in bytes [lo, hi) (a line belongs to the range holding
    its first byte: tasks reading adjacent ranges read every line once); `done(n)`: n more bytes were read."""
    with open_bytes(path) as stream:
        if lo > 0:
            stream.seek(lo - 1)
            if stream.read(1) != b"\n":
                stream.readline()  # the rest of a line that began before lo
        pos = stream.tell()
        while pos < hi:
            line = stream.readline()
            if not line:
                break
            where = f"the line at byte {pos} of '{path}'"
            pos += len(line)
            if done is not None:
                done(len(line))
            if not line.strip():
                continue
            try:
                record = json.loads(_decode(line, where, report))
            except json.JSONDecodeError:
                raise UserError(f"{where} is not valid JSON; fix it or remove the line.") from None
            yield where, columns.check(record, where)


def _json_records(path: Path, columns: Columns, report: Report) -> Iterator[tuple[str, dict]]:
    with _open_binary(path) as stream:
        if stream.peek(1 << 16).lstrip()[:1] == b"[":  # one JSON array: parsed whole (JSON lines stream)
            try:
                records = json.loads(_decode(stream.read(), str(path), report))
            except json.JSONDecodeError as e:
                raise UserError(f"'{path}' is not valid JSON ({e.msg} at line {e.lineno}); fix the file.") from None
            for n, record in enumerate(records, 1):
                where = f"record {n} of '{path}'"
                yield where, columns.check(record, where)
            return
        for n, line in enumerate(stream, 1):
            if not line.strip():
                continue
            where = f"line {n} of '{path}'"
            try:
                record = json.loads(_decode(line, where, report))
            except json.JSONDecodeError:
                raise UserError(f"{where} is not valid JSON; fix it or remove the line.") from None
            yield where, columns.check(record, where)


def parquet_file(path: Path | str):
    """pyarrow's reader of a parquet file (a bucket's object: only the parts read are fetched)."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(bucket.open_object(str(path)) if is_s3(str(path)) else path)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"'{path}' is not a readable parquet file ({e}).") from None


def parquet_records(path: Path | str, columns: Columns, row_groups: range | None = None,
                    done=None) -> Iterator[tuple[str, dict]]:  # fmt: skip
    """The rows of a parquet file, or of its `row_groups`, one row group at a time (`done(n)`: n bytes of the
    file were read)."""
    pf = parquet_file(path)
    columns.check(dict.fromkeys(pf.schema_arrow.names), f"'{path}'")
    groups = range(pf.num_row_groups) if row_groups is None else row_groups
    n = sum(pf.metadata.row_group(g).num_rows for g in range(groups.start)) if groups else 0
    for g in groups:
        for batch in pf.iter_batches(row_groups=[g], columns=list(columns.names), batch_size=4096):
            for row in batch.to_pylist():
                n += 1
                yield f"row {n} of '{path}'", row
        if done is not None:
            done(row_group_bytes(pf.metadata.row_group(g)))


def row_group_start(rg) -> int:
    """The file offset where a parquet row group's data begins."""
    return min((c.dictionary_page_offset or c.data_page_offset) for c in map(rg.column, range(rg.num_columns)))


def row_group_bytes(rg) -> int:
    """The bytes a parquet row group takes in its file."""
    return sum(rg.column(i).total_compressed_size for i in range(rg.num_columns))


def _csv_records(path: Path, columns: Columns, report: Report) -> Iterator[tuple[str, dict]]:
    csv.field_size_limit(sys.maxsize)  # documents are long; the default limit is 128 KiB
    with _open_binary(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.DictReader(text, delimiter="\t" if inner_suffix(path) == ".tsv" else ",")
        columns.check(dict.fromkeys(reader.fieldnames or []), f"'{path}'")
        for n, row in enumerate(reader, 2):
            where = f"row at line {n} of '{path}'"
            record = {}
            for c in columns.names:
                value = as_text(row[c])
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as e:
                    report.bad_bytes(where, e.start)
                    value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                record[c] = value
            yield where, record


def dataset_records(ds, columns: Columns, where: str) -> Iterator[tuple[str, dict]]:
    """The rows of a `datasets` dataset (in memory, memory-mapped or streamed), batch by batch."""
    names = list(ds.column_names or []) if getattr(ds, "column_names", None) is not None else None
    if names is None and getattr(ds, "features", None) is not None:
        names = list(ds.features)
    if names is not None:
        columns.check(dict.fromkeys(names), where)
    n = 0
    for batch in ds.iter(batch_size=1024):
        columns.check(batch, where)
        for values in zip(*(batch[c] for c in columns.names), strict=True):
            n += 1
            yield f"row {n} of {where}", dict(zip(columns.names, values, strict=True))


def disk_dataset(path: Path, split: str):
    """One split of a `save_to_disk` directory (memory-mapped Arrow: rows are read, not loaded)."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"'{path}' has no split '{split}' (splits: {', '.join(ds)}); set --split.")
        ds = ds[split]
    return ds


def streamed_dataset(name: str, config: str | None, split: str):
    """A Hugging Face dataset by hub name or local dataset directory, streamed (never held whole)."""
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        problem = str(e).strip().rstrip(".")
        raise UserError(f"cannot load the dataset '{name}' (config {config}, split {split}): {problem}.") from None


def iter_records(files: list[Path | str], columns: Columns, report: Report | None = None,
                 split: str = "train") -> Iterator[tuple[str, dict]]:  # fmt: skip
    """(where, {column: value}) for every record of every input, in order: JSON lines or a JSON array, parquet
    rows (only those columns read), CSV/TSV rows, a save_to_disk directory's `split`; any other file is one
    record whose first column is its whole text."""
    report = report if report is not None else Report()
    for f in files:
        kind = inner_suffix(f)
        if is_hf_disk_dir(f):
            yield from dataset_records(disk_dataset(f, split), columns, f"'{f}'")
        elif kind in (".jsonl", ".ndjson", ".json"):
            yield from _json_records(f, columns, report)
        elif kind == ".parquet":
            yield from parquet_records(f, columns)
        elif kind in (".csv", ".tsv"):
            yield from _csv_records(f, columns, report)
        else:
            with _open_binary(f) as raw:
                yield f"'{f}'", {columns.names[0]: _decode(raw.read(), f"'{f}'", report)}


def dataset_by_name(name: str, config: str | None, split: str, columns: Columns) -> Iterator[tuple[str, dict]]:
    """The records of a Hugging Face dataset (hub name or local dataset directory), streamed."""
    yield from dataset_records(streamed_dataset(name, config, split), columns, f"dataset '{name}'")


TEXT_FIX = "set --text-column to one of them"


def hf_dataset_documents(name: str, config: str | None, split: str, column: str) -> Iterator[str]:
    """The documents (`column`) of a Hugging Face dataset, streamed."""
    for _, record in dataset_by_name(name, config, split, Columns((column,), TEXT_FIX)):
        yield as_text(record[column])


def iter_documents(files: list[Path], text_column: str = "text", report: Report | None = None,
                   split: str = "train") -> Iterator[str]:  # fmt: skip
    """Every document (a record's text column) of every input, in order; empty ones too (callers count them)."""
    for _, record in iter_records(files, Columns((text_column,), TEXT_FIX), report, split):
        yield as_text(record[text_column])
