"""Turning "a corpus" into an ordered stream of documents (strings).

A corpus is a list of inputs: files, directories (searched recursively) and glob patterns. Files ending in
`.jsonl` hold one JSON object per line and give one document per line (its `text_column`); every other
file is one document. With no inputs at all, the embedded default corpus is used: a few hundred `.py`
files of the running Python's own standard library, which every machine has.
"""

from __future__ import annotations

import glob
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from dist_clm.errors import UserError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".py", ".jsonl"}  # what a directory search picks up
_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "__pycache__"}


def default_corpus_files(n: int = 300) -> list[Path]:
    """`n` standard-library source files spread evenly over the sorted list (tests and site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))
    if len(files) <= n:
        return files
    step = len(files) / n
    return [files[int(i * step)] for i in range(n)]


def resolve_inputs(inputs: list[str]) -> list[Path]:
    """Expand files, directories and globs into a sorted, de-duplicated list of files."""
    found: dict[Path, None] = {}
    for item in inputs:
        if glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            files = [m for m in matches if m.is_file()]
            if not files:
                raise UserError(
                    f"input pattern '{item}' matches no files; check the pattern or quote it for the shell."
                )
        else:
            p = Path(item)
            if not p.exists():
                raise UserError(f"input path '{item}' does not exist; give existing files, directories or globs.")
            if p.is_dir():
                files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
                if not files:
                    raise UserError(
                        f"directory '{item}' holds no text files ({', '.join(sorted(TEXT_SUFFIXES))}); "
                        "name the files directly or use a glob."
                    )
            else:
                files = [p]
        for f in files:
            found.setdefault(f, None)
    return list(found)


def iter_documents(files: list[Path], text_column: str = "text") -> Iterator[str]:
    """Yield every document of every file, in order. Empty documents are yielded too (callers count them)."""
    for f in files:
        if f.suffix == ".jsonl":
            yield from _jsonl_documents(f, text_column)
        else:
            yield _read_text(f)


def _read_text(f: Path) -> str:
    try:
        return f.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"file '{f}' is not valid UTF-8 (byte {e.start}); convert it to UTF-8 or leave it out."
        ) from None


def _jsonl_documents(f: Path, text_column: str) -> Iterator[str]:
    for n, line in enumerate(_read_text(f).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"line {n} of '{f}' is not valid JSON; fix it or remove the line.") from None
        if not isinstance(record, dict) or text_column not in record:
            cols = ", ".join(record) if isinstance(record, dict) else "none (not an object)"
            raise UserError(f"line {n} of '{f}' has no '{text_column}' field (fields: {cols}); set --text-column.")
        text = record[text_column]
        yield text if isinstance(text, str) else ("" if text is None else str(text))
