"""Every kind of corpus prepare reads, each with its own bad-input message."""

import csv
import gzip
import json

import pytest

from dist_clm.data import sources
from dist_clm.errors import UserError

DOCS = ["first document\nwith two lines", "second — ünïcödé", "third"]


def write_all_kinds(d):
    """The same three documents in every supported local format."""
    (d / "txt").mkdir()
    for i, t in enumerate(DOCS):
        (d / "txt" / f"{i}.txt").write_text(t)
    jsonl = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(DOCS))
    (d / "a.jsonl").write_text(jsonl)
    (d / "b.jsonl.gz").write_bytes(gzip.compress(jsonl.encode()))
    import zstandard

    (d / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl.encode()))
    (d / "d.json").write_text(json.dumps([{"text": t} for t in DOCS]))
    with open(d / "e.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([[i, t] for i, t in enumerate(DOCS)])
    with open(d / "f.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["text"])
        w.writerows([[t] for t in DOCS])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS, "n": [1, 2, 3]}), d / "g.parquet", row_group_size=2)
    (d / "h.txt.gz").write_bytes(gzip.compress(DOCS[0].encode()))
    (d / "i.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(DOCS[1].encode()))


@pytest.mark.parametrize(
    "name, want",
    [
        ("a.jsonl", DOCS),
        ("b.jsonl.gz", DOCS),
        ("c.jsonl.zst", DOCS),
        ("d.json", DOCS),
        ("e.csv", DOCS),
        ("f.tsv", DOCS),
        ("g.parquet", DOCS),
        ("h.txt.gz", DOCS[:1]),
        ("i.txt.zst", DOCS[1:2]),
        ("txt", DOCS),
    ],
)
def test_each_local_kind(tmp_path, name, want):
    write_all_kinds(tmp_path)
    files = sources.resolve_inputs([str(tmp_path / name)])
    assert list(sources.iter_documents(files)) == want


def test_directory_picks_up_every_kind_in_sorted_order(tmp_path):
    write_all_kinds(tmp_path)
    files = sources.resolve_inputs([str(tmp_path)])
    assert [f.name for f in files][:3] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst"]
    assert len(list(sources.iter_documents(files))) == 7 * 3 + 2 + 3


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"content": DOCS})
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert list(sources.iter_documents(sources.resolve_inputs([str(tmp_path / "one")]), "content")) == DOCS
    files = sources.resolve_inputs([str(tmp_path / "dict")])
    assert list(sources.iter_documents(files, "content", split="validation")) == DOCS[:1]
    with pytest.raises(UserError, match=r"has no split 'test' \(splits: train, validation\)"):
        list(sources.iter_documents(files, "content", split="test"))
    with pytest.raises(UserError, match=r"has no column 'text' \(columns: content\)"):
        list(sources.iter_documents(files, "text"))


def test_hf_dataset_by_name_streams(tmp_path):
    """load_dataset(name, ...) with a local dataset directory: the same call a user with network makes."""
    repo = tmp_path / "my_dataset"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "train.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in DOCS))
    (repo / "data" / "test.jsonl").write_text(json.dumps({"body": "held out"}) + "\n")
    assert list(sources.hf_dataset_documents(str(repo), None, "train", "body")) == DOCS
    assert list(sources.hf_dataset_documents(str(repo), None, "test", "body")) == ["held out"]
    with pytest.raises(UserError, match=r"has no column 'text' \(columns: body\)"):
        list(sources.hf_dataset_documents(str(repo), None, "train", "text"))
    with pytest.raises(UserError, match="cannot load the dataset"):
        list(sources.hf_dataset_documents(str(tmp_path / "nope"), None, "train", "text"))


@pytest.mark.parametrize(
    "name, columns",
    [
        ("a.jsonl", "text, id"),
        ("e.csv", "id, text"),
        ("g.parquet", "text, n"),
        ("d.json", "text"),
    ],
)
def test_missing_text_column_lists_the_columns(tmp_path, name, columns):
    write_all_kinds(tmp_path)
    with pytest.raises(UserError, match=rf"has no column 'body' \(columns: {columns}\); set --text-column"):
        list(sources.iter_documents([tmp_path / name], "body"))


def test_undecodable_bytes_are_reported_with_the_file_name(tmp_path, capsys):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "na\xefve"}\n')
    report = sources.Report()
    docs = list(sources.iter_documents(sources.resolve_inputs([str(tmp_path)]), report=report))
    assert docs == ["ok", "na\ufffdve", "caf\ufffd au lait"]
    assert report.undecodable == 2
    err = capsys.readouterr().err
    assert "bad.txt' is not valid UTF-8 at byte 3" in err and "line 2 of" in err


def test_reading_is_lazy(tmp_path):
    """Documents come out one at a time: a broken record late in a file is met only when reached."""
    (tmp_path / "x.jsonl").write_text(json.dumps({"text": "early"}) + "\n" + "{broken\n")
    it = sources.iter_documents([tmp_path / "x.jsonl"])
    assert next(it) == "early"
    with pytest.raises(UserError, match="line 2 of .* is not valid JSON"):
        next(it)
