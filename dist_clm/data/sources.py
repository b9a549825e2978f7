"""Turning "a corpus" into an ordered, lazy stream of documents (strings).

A corpus is one of:
- local inputs: files, directories (searched recursively) and glob patterns. By suffix (after an optional
  `.gz` / `.zst` compression suffix): `.jsonl`/`.ndjson`/`.json` hold records (one document per record, its
  `text_column`), `.parquet` and `.csv`/`.tsv` hold rows (same), every other file is one document;
- a directory written by `datasets` `save_to_disk` (detected by its `state.json` / `dataset_dict.json`);
- a Hugging Face dataset by name or local dataset directory, through `datasets.load_dataset` with
  `streaming=True` (the code path is the same with or without network).
Nothing reads a whole corpus into memory: files are read record by record, parquet by row groups, HF datasets
as iterable (streaming) datasets. With no inputs at all, the embedded default corpus is used: a few hundred
`.py` files of the running Python's own standard library, which every machine has.
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
from pathlib import Path

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
            print(f"warning: {where} is not valid UTF-8 at byte {position}; bad bytes replaced", file=sys.stderr)


def inner_suffix(path: Path) -> str:
    """`a.jsonl.gz` -> `.jsonl`; `a.txt` -> `.txt`."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _wanted(path: Path) -> bool:
    return inner_suffix(path) in TEXT_SUFFIXES | RECORD_SUFFIXES


def is_hf_disk_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in _HF_DISK_MARKERS)


def resolve_inputs(inputs: list[str]) -> list[Path]:
    """Expand files, directories and globs into a sorted, de-duplicated list (save_to_disk dirs kept whole)."""
    found: dict[Path, None] = {}
    for item in inputs:
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
            found.setdefault(f, None)
    return list(found)


def _open_binary(path: Path) -> io.BufferedReader:
    """A buffered binary stream of the file's (decompressed) bytes; never inflated whole."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        raw = gzip.open(path, "rb")  # noqa: SIM115 (the caller closes the stream)
    elif suffix in (".zst", ".zstd"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)  # noqa: SIM115
    else:
        raw = open(path, "rb", buffering=0)  # noqa: SIM115
    return io.BufferedReader(raw, buffer_size=1 << 16)


def _decode(data: bytes, where: str, report: Report) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        report.bad_bytes(where, e.start)
        return data.decode("utf-8", errors="replace")


def _missing_column(where: str, column: str, columns) -> UserError:
    return UserError(
        f"{where} has no column '{column}' (columns: {', '.join(map(str, columns)) or 'none'}); "
        "set --text-column to one of them."
    )


def _as_text(value) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def _json_records(path: Path, column: str, report: Report) -> Iterator[str]:
    with _open_binary(path) as stream:
        if stream.peek(1 << 16).lstrip()[:1] == b"[":  # one JSON array: parsed whole (JSON lines stream)
            try:
                records = json.loads(_decode(stream.read(), str(path), report))
            except json.JSONDecodeError as e:
                raise UserError(f"'{path}' is not valid JSON ({e.msg} at line {e.lineno}); fix the file.") from None
            for n, record in enumerate(records, 1):
                yield _record_text(record, column, f"record {n} of '{path}'")
            return
        for n, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(_decode(line, f"line {n} of '{path}'", report))
            except json.JSONDecodeError:
                raise UserError(f"line {n} of '{path}' is not valid JSON; fix it or remove the line.") from None
            yield _record_text(record, column, f"line {n} of '{path}'")


def _record_text(record, column: str, where: str) -> str:
    if not isinstance(record, dict):
        raise UserError(f"{where} is not a JSON object; each record must be an object with a '{column}' field.")
    if column not in record:
        raise _missing_column(where, column, record)
    return _as_text(record[column])


def _parquet_rows(path: Path, column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise UserError(f"'{path}' is not a readable parquet file ({e}).") from None
    if column not in pf.schema_arrow.names:
        raise _missing_column(f"'{path}'", column, pf.schema_arrow.names)
    for batch in pf.iter_batches(columns=[column], batch_size=4096):  # one row group at a time
        for value in batch.column(0).to_pylist():
            yield _as_text(value)


def _csv_rows(path: Path, column: str, report: Report) -> Iterator[str]:
    csv.field_size_limit(sys.maxsize)  # documents are long; the default limit is 128 KiB
    with _open_binary(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.DictReader(text, delimiter="\t" if inner_suffix(path) == ".tsv" else ",")
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise _missing_column(f"'{path}'", column, reader.fieldnames or [])
        for n, row in enumerate(reader, 2):
            value = _as_text(row[column])
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                report.bad_bytes(f"row at line {n} of '{path}'", e.start)
                value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            yield value


def _hf_rows(ds, column: str, where: str) -> Iterator[str]:
    names = list(ds.column_names or []) if getattr(ds, "column_names", None) is not None else None
    if names is None and getattr(ds, "features", None) is not None:
        names = list(ds.features)
    if names is not None and column not in names:
        raise _missing_column(where, column, names)
    for batch in ds.iter(batch_size=1024):
        if column not in batch:
            raise _missing_column(where, column, list(batch))
        for value in batch[column]:
            yield _as_text(value)


def disk_dataset(path: Path, split: str):
    """One split of a `save_to_disk` directory (memory-mapped Arrow: rows are read, not loaded)."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"'{path}' has no split '{split}' (splits: {', '.join(ds)}); set --split.")
        ds = ds[split]
    return ds


def _disk_rows(path: Path, column: str, split: str) -> Iterator[str]:
    yield from _hf_rows(disk_dataset(path, split), column, f"'{path}'")


def streamed_dataset(name: str, config: str | None, split: str):
    """A Hugging Face dataset by hub name or local dataset directory, streamed (never held whole)."""
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        problem = str(e).strip().rstrip(".")
        raise UserError(f"cannot load the dataset '{name}' (config {config}, split {split}): {problem}.") from None


def hf_dataset_documents(name: str, config: str | None, split: str, column: str) -> Iterator[str]:
    yield from _hf_rows(streamed_dataset(name, config, split), column, f"dataset '{name}'")


def iter_documents(
    files: list[Path], text_column: str = "text", report: Report | None = None, split: str = "train"
) -> Iterator[str]:
    """Yield every document of every input, in order. Empty documents are yielded too (callers count them)."""
    report = report if report is not None else Report()
    for f in files:
        kind = inner_suffix(f)
        if is_hf_disk_dir(f):
            yield from _disk_rows(f, text_column, split)
        elif kind in (".jsonl", ".ndjson", ".json"):
            yield from _json_records(f, text_column, report)
        elif kind == ".parquet":
            yield from _parquet_rows(f, text_column)
        elif kind in (".csv", ".tsv"):
            yield from _csv_rows(f, text_column, report)
        else:
            with _open_binary(f) as raw:
                yield _decode(raw.read(), f"'{f}'", report)
