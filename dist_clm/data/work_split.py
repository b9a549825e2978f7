"""How the inputs of a prepare are shared among N tasks, so that no task waits on one huge file, and task I's
records: a pure function of (the inputs as listed, N, I), which every task computes for itself.

The inputs, in the order listed, lie end to end in one byte space of T bytes; task I owns the bytes
[T*I//N, T*(I+1)//N). Inside it:
- an uncompressed JSON-lines file (.jsonl, .ndjson) is cut at lines: a line is the task's whose range holds its
  first byte (sources.json_lines);
- a parquet file is cut at row groups: a row group is the task's whose range holds its first byte;
- any other file (compressed, a JSON array, CSV, a plain-text document) is read whole by the task whose range
  holds its first byte (a compressed stream cannot be entered in the middle; a plain-text file is one
  document, never cut);
- a `save_to_disk` directory is cut by rows (task I reads the I-th of N contiguous slices), a Hugging Face
  dataset by its own shards (`datasets.distributed.split_dataset_by_node`).
So the tasks together read every record exactly once, and, files being cut in order, task 0's records, then
task 1's, ... are the corpus's records in the order one task reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dist_clm.data import sources

LINES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class Share:
    """A task's share of one input: `kind` lines (bytes [lo, hi) of the file), row_groups ([lo, hi)), rows (slice
    lo of hi), or whole."""

    name: Path | str
    size: int
    kind: str
    lo: int = 0
    hi: int = 0


def _cuttable(name: Path | str) -> bool:
    compressed = sources.PurePosixPath(str(name)).suffix.lower() in sources.COMPRESSION_SUFFIXES
    return not compressed and sources.inner_suffix(name) in LINES


def bounds(total: int, tasks: int) -> list[int]:
    return [total * i // tasks for i in range(tasks + 1)]


def owner(offset: int, cuts: list[int]) -> int:
    """The task whose byte range holds `offset` (offsets at the very end: the last task)."""
    import bisect

    return min(bisect.bisect_right(cuts, offset) - 1, len(cuts) - 2)


def shares(files: dict[Path | str, int], tasks: int, index: int) -> list[Share]:
    """Task `index` of `tasks`: its shares of `files` ({name: size}, in corpus order)."""
    cuts = bounds(sum(files.values()), tasks)
    lo, hi = cuts[index], cuts[index + 1]
    out, offset = [], 0
    for name, size in files.items():
        if sources.is_hf_disk_dir(name):
            out.append(Share(name, size, "rows", index, tasks))
        elif _cuttable(name):
            a, b = max(lo, offset) - offset, min(hi, offset + size) - offset
            if a < b:
                out.append(Share(name, size, "lines", a, b))
        elif sources.inner_suffix(name) == ".parquet" and offset < hi and offset + size > lo:
            meta = sources.parquet_file(name).metadata
            mine = [g for g in range(meta.num_row_groups)
                    if owner(offset + sources.row_group_start(meta.row_group(g)), cuts) == index]  # fmt: skip
            if mine:
                out.append(Share(name, size, "row_groups", mine[0], mine[-1] + 1))
        elif sources.inner_suffix(name) != ".parquet" and owner(offset, cuts) == index:
            out.append(Share(name, size, "whole"))
        offset += size
    return out


def share_bytes(share: Share) -> int:
    """About how many bytes of the file a share reads (for progress and the time left)."""
    if share.kind == "lines":
        return share.hi - share.lo
    if share.kind == "rows":
        return share.size // share.hi
    if share.kind == "row_groups":
        meta = sources.parquet_file(share.name).metadata
        return sum(sources.row_group_bytes(meta.row_group(g)) for g in range(share.lo, share.hi))
    return share.size


def records(shares_: list[Share], columns: sources.Columns, report: sources.Report, split: str,
            done: Callable[[int], None]) -> Iterator[tuple[str, dict]]:  # fmt: skip
    """(where, record) of every share, in order; `done(n)` as n more bytes are read."""
    for s in shares_:
        if s.kind == "lines":
            yield from sources.json_lines(s.name, columns, report, s.lo, s.hi, done)
        elif s.kind == "row_groups":
            yield from sources.parquet_records(s.name, columns, range(s.lo, s.hi), done)
        elif s.kind == "rows":
            ds = sources.disk_dataset(Path(s.name), split)
            yield from sources.dataset_records(ds.shard(num_shards=s.hi, index=s.lo, contiguous=True), columns,
                                               f"'{s.name}'")  # fmt: skip
            done(share_bytes(s))
        else:
            yield from sources.iter_records([s.name], columns, report, split)
            done(s.size)


def dataset_share(name: str, config: str | None, split: str, columns: sources.Columns, tasks: int,
                  index: int) -> Iterator[tuple[str, dict]]:  # fmt: skip
    """Task `index`'s records of a Hugging Face dataset: its own shards split between the tasks."""
    from datasets.distributed import split_dataset_by_node

    ds = split_dataset_by_node(sources.streamed_dataset(name, config, split), rank=index, world_size=tasks)
    yield from sources.dataset_records(ds, columns, f"dataset '{name}' (task {index} of {tasks})")
