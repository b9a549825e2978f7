"""`dist-clm prepare`: documents -> token ids (+EOS) -> MDS shards of fixed-size chunks + manifest.

Layout of a prepared directory:

    manifest.json   written last; its presence (under the final name) marks the directory complete
    tokenizer/      the tokenizer that produced the ids (save_pretrained), so training needs nothing else
    train/, val/    MDS shards (mosaicml-streaming's MDSWriter): one sample = one chunk of the token stream

Each split's token stream is its documents in corpus order, each followed by EOS, cut into chunks of exactly
`chunk_tokens` tokens (the last one shorter). A chunk stores its tokens and `doc_bounds`: the offsets where
documents start inside it, then its length. Chunks rather than documents are the samples because streaming's
per-sample overhead (~0.1 ms) would dominate with short documents; the block size is chosen at train time.
Documents go to the validation split by a hash of their text, so the split is the same on every run.

Tokenization runs in `num_proc` worker processes on batches whose boundaries do not depend on num_proc; the
writer consumes results in order, so the shards are the same, byte for byte, for any num_proc. Everything
is written into `.NAME.partial/` and renamed to NAME when complete: a killed prepare leaves only the partial
directory, which the next prepare into NAME removes (saying so) before starting over; a full disk ends the
prepare with one sentence and nothing left behind.

Every shard file's size and hash (format.shard_hash(), through MDSWriter's own `hashes`) are in its split's
index.json, so readers can tell a truncated or changed shard from a good one (shards.ShardFiles checks them).
The layout readers rely on is format.py's.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import socket
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_clm import __version__, console
from dist_clm.data import _encode, sources
from dist_clm.data.format import FORMAT, MANIFEST, SPLITS, shard_hash
from dist_clm.data.remote import is_remote, refuse_complete_remote, upload_last
from dist_clm.data.tokenizer import fingerprint, load_tokenizer, vocab_size
from dist_clm.errors import UserError
from dist_clm.fsutil import atomic_dir, refuse_non_empty


@contextmanager
def _space_for(what: Path) -> Iterator[None]:
    """A full disk (or quota) while writing `what` becomes one sentence: it is the user's to fix, not a bug."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        problem = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        raise UserError(f"{problem} while writing '{what}'; free space or choose another --out.") from None


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0
    chunks: int = 0


class ChunkWriter:
    """Accumulates a split's token stream and writes it to MDS as fixed-size chunks with document starts."""

    def __init__(
        self,
        out: Path,
        dtype: np.dtype,
        chunk_tokens: int,
        compression: str | None,
        shard_bytes: int,
        label: Path,
        remote: str | None = None,
        with_mask: bool = False,
    ):
        self.dtype, self.chunk_tokens, self.with_mask = dtype, chunk_tokens, with_mask
        self.label = label  # the split's final path, for messages (`out` is inside the partial directory)
        self.writer_args = dict(
            # with `remote`, streaming's writer uploads each shard as it closes (and index.json at the end)
            out=(str(out), remote) if remote else str(out),
            keep_local=True,
            compression=compression,
            size_limit=shard_bytes,
            columns={"tokens": f"ndarray:{dtype.name}", "doc_bounds": "ndarray:uint32"}
            | ({"loss_mask": "ndarray:uint8"} if with_mask else {}),
        )
        self._writer = None  # made on first use: importing streaming takes seconds, the tokenizers meanwhile run
        self.pending: list[np.ndarray] = []  # documents (with EOS) not yet written, in order
        self.pending_masks: list[np.ndarray] = []  # their loss masks (with_mask)
        self.pending_tokens = 0
        self.starts: list[int] = []  # stream offsets of the documents that start in `pending`
        self.written = 0  # stream offset of the first pending token
        self.stats = SplitStats()

    def add(self, ids: np.ndarray, mask: np.ndarray | None = None) -> None:
        self.starts.append(self.written + self.pending_tokens)
        self.pending.append(ids)
        if self.with_mask:
            self.pending_masks.append(mask.astype(np.uint8))
        self.pending_tokens += len(ids)
        self.stats.documents += 1
        self.stats.tokens += len(ids)
        if self.pending_tokens >= self.chunk_tokens:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.pending:
            return
        stream = np.concatenate(self.pending)
        masks = np.concatenate(self.pending_masks) if self.with_mask else None
        starts = np.asarray(self.starts, dtype=np.int64) - self.written
        cut = len(stream) if final else len(stream) // self.chunk_tokens * self.chunk_tokens
        with _space_for(self.label):  # MDSWriter writes each shard file in this thread, when it is full
            for lo in range(0, cut, self.chunk_tokens):
                hi = min(lo + self.chunk_tokens, cut)
                inside = starts[(starts >= lo) & (starts < hi)] - lo
                bounds = np.append(inside, hi - lo).astype(np.uint32)  # never empty: MDS can't store empty arrays
                sample = {"tokens": stream[lo:hi], "doc_bounds": bounds}
                self.writer.write(sample | ({"loss_mask": masks[lo:hi]} if self.with_mask else {}))
                self.stats.chunks += 1
        self.starts = [int(s) + self.written for s in starts if s >= cut]
        self.written += cut
        self.pending = [stream[cut:]] if cut < len(stream) else []
        self.pending_masks = [masks[cut:]] if self.with_mask and cut < len(stream) else []
        self.pending_tokens = len(stream) - cut

    @property
    def writer(self):
        if self._writer is None:
            from streaming import MDSWriter

            # streaming's own per-file hashes: index.json then holds each shard's size and hash
            self._writer = MDSWriter(**self.writer_args, hashes=[shard_hash()])
        return self._writer

    def close(self) -> SplitStats:
        self._flush(final=True)
        with _space_for(self.label):
            self.writer.finish()
        return self.stats


def is_val(text: str, val_fraction: float) -> bool:
    """Whether a document goes to the validation split (a function of its text alone)."""
    return _encode.digest_is_val(_encode.digest(text), val_fraction)


def _batches(docs: Iterable[str], stats: dict) -> Iterator[list[str]]:
    """Non-empty documents in batches of at most 256 documents or ~1 MB of text (not a function of num_proc,
    so the output is the same for every num_proc). Empty documents are counted in `stats`."""
    batch: list[str] = []
    chars = 0
    for text in docs:
        if not text:
            stats["empty"] += 1
            continue
        batch.append(text)
        chars += len(text)
        if len(batch) >= 256 or chars >= 1 << 20:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class _Pipeline:
    """Tokenizes batches in order, in the background, while the caller writes: with num_proc 1 in one thread
    (encode_batch releases the GIL and uses every core itself), else in `num_proc` spawned worker processes
    (they import only numpy+tokenizers). At most 8 * num_proc batches (~1 MB each) are in flight: memory stays
    bounded, and the workers keep going while the writer is still importing streaming (seconds)."""

    def __init__(self, batches: Iterator[list[str]], tok_json: str, eos: int, dtype: str, num_proc: int):
        self.batches, self.num_proc, self.cap = batches, num_proc, 8 * max(1, num_proc)
        self.window: deque = deque()
        self._start(tok_json, eos, dtype)

    def _start(self, tok_json: str, eos: int, dtype: str) -> None:
        self.key = (tok_json, eos, dtype)
        if self.num_proc <= 1:
            _encode.init(tok_json, eos, dtype)
            self.executor = ThreadPoolExecutor(1)
        else:
            ctx = multiprocessing.get_context("spawn")
            self.executor = ProcessPoolExecutor(
                self.num_proc, mp_context=ctx, initializer=_encode.init, initargs=(tok_json, eos, dtype)
            )
        try:
            self.window = deque((b, self.executor.submit(_encode.encode, b)) for b, _ in self.window)
            self._fill()
        except BaseException:  # e.g. a bad record met while reading the first batches
            self.close()
            raise

    def _fill(self) -> None:
        while len(self.window) < self.cap:
            batch = next(self.batches, None)
            if batch is None:
                return
            self.window.append((batch, self.executor.submit(_encode.encode, batch)))

    def use(self, tok_json: str, eos: int, dtype: str) -> None:
        """Make sure the work is done with this tokenizer; batches in flight with another are redone."""
        if (tok_json, eos, dtype) != self.key:
            self.executor.shutdown(cancel_futures=True)
            self._start(tok_json, eos, dtype)

    def __iter__(self):
        while self.window:
            batch, fut = self.window.popleft()
            result = fut.result()
            self._fill()
            yield batch, result

    def close(self) -> None:
        self.executor.shutdown(cancel_futures=True)


def _tokenizer_json_guess(tokenizer_dir: str | Path) -> tuple[str, int, str] | None:
    """(tokenizer JSON, eos id, token dtype) read straight from tokenizer.json, so tokenizing can start while
    transformers (seconds to import) loads the tokenizer properly; None if the directory needs transformers."""
    d = Path(tokenizer_dir)
    try:
        from tokenizers import Tokenizer

        raw = Tokenizer.from_file(str(d / "tokenizer.json"))
        eos = json.loads((d / "tokenizer_config.json").read_text()).get("eos_token")
        eos_id = raw.token_to_id(eos["content"] if isinstance(eos, dict) else eos) if eos else None
    except Exception:
        return None
    if eos_id is None:
        return None
    return raw.to_str(), eos_id, _dtype_for(raw.get_vocab_size(with_added_tokens=True)).name


def _dtype_for(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16 if n_vocab <= 2**16 else np.uint32)


def _length_histogram(counts: Counter) -> list[list[int]]:
    """Document lengths (tokens with EOS) in power-of-two bins, from counts by bit length: [[low, high, n]]."""
    return [[1 << (b - 1), (1 << b) - 1, counts[b]] for b in sorted(counts)]


@dataclass(kw_only=True)
class PrepareOptions:
    """How `dist-clm prepare` reads a corpus and writes it (each field is the command's option of that name)."""

    dataset: str | None = None  # a Hugging Face dataset (hub name or local dataset directory), streamed
    dataset_config: str | None = None  # its configuration
    split: str = "train"  # the split of the dataset, or of a save_to_disk directory
    fmt: str = "text"  # text, or a fine-tuning format: chat, prompt-completion, preference (conversations.py)
    text_column: str = "text"  # text: the column (field) that holds a record's text
    block_size: int = 0  # fine-tuning formats: the training block size, whole conversations packed into it
    chat_template: str | None = None  # a chat template by name for a tokenizer that has none
    val_fraction: float = 0.05  # the share of records (by a hash of each) in the validation split
    dedup: bool = False  # drop exact duplicates (by the same hash)
    chunk_tokens: int = 16384  # tokens per MDS sample (fine-tuning formats: rounded down to whole blocks)
    shard_bytes: int = 1 << 26  # a shard file's size limit
    compression: str | None = None  # streaming's compression of the shard files (e.g. zstd)
    num_proc: int | None = None  # text: tokenizer processes (default: every core)
    progress: bool = True  # a progress bar

    def check(self, inputs: list[str] | None) -> None:
        from dist_clm.data.conversations import FORMATS

        if self.fmt not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {self.fmt!r}.")
        if self.fmt != "text" and self.block_size < 2:
            raise UserError(f"--format {self.fmt} packs whole conversations into blocks: give --block-size (the "
                            "training data.block_size), e.g. --block-size 2048.")  # fmt: skip
        if self.fmt != "text" and not (inputs or self.dataset):
            raise UserError(f"--format {self.fmt} needs its records: name jsonl/parquet files or --dataset.")
        if not 0 < self.val_fraction <= 1:
            raise UserError(f"--val-fraction must be more than 0 and at most 1 (1: evaluation-only data, a "
                            f"validation split alone), got {self.val_fraction}.")  # fmt: skip
        if self.chunk_tokens < 2:
            raise UserError(f"--chunk-tokens must be at least 2, got {self.chunk_tokens}.")
        if inputs and self.dataset:
            raise UserError("give either input files or --dataset, not both.")


def prepare(tokenizer_dir: str | Path, out_dir: str | Path, inputs: list[str] | None = None, **options) -> dict:
    """Tokenize a corpus once into MDS shards; returns the manifest (also written as manifest.json, last).

    The corpus is `inputs` (files, directories, globs, save_to_disk directories), or the Hugging Face
    dataset `dataset` (name or local dataset directory, streamed), or else the embedded default corpus.
    `out_dir` may be a URL (s3://bucket/prefix): the shards are uploaded as they close, the manifest last.
    `options`: PrepareOptions' fields.
    """
    o = PrepareOptions(**options)
    o.check(inputs)
    if is_remote(out_dir):  # written here first, then uploaded (shards as they close, the manifest last)
        url = str(out_dir).rstrip("/")
        refuse_complete_remote(url)
        with tempfile.TemporaryDirectory(prefix="dist-clm-prepare-") as staging:
            return _prepare(tokenizer_dir, Path(staging) / "data", url, inputs, o)
    out = Path(out_dir)
    refuse_non_empty(out)
    return _prepare(tokenizer_dir, out, None, inputs, o)


def _prepare(tokenizer_dir, out: Path, url: str | None, inputs: list[str] | None, o: PrepareOptions) -> dict:
    """The pipeline, for every format: records (sources.py) -> the format's stage (record -> token ids and a
    loss mask) -> the split chosen by each record's hash -> ChunkWriter per split -> the manifest, last; into
    the local directory `out` (and, with `url`, uploaded there as it is written)."""
    start, began, report = time.time(), time.monotonic(), sources.Report()
    if o.dataset:
        origin = {"dataset": o.dataset, "config": o.dataset_config, "split": o.split}
    elif inputs:
        origin = {"inputs": list(inputs), "files": 0}
    else:
        origin = {"inputs": ["<python standard library>"], "files": 0}
    stage = None
    try:
        records = _records(inputs, o, report, origin)
        if o.progress:  # (said before the slow part: workers start, the tokenizer loads, the first batches are read)
            console.info(f"prepare: {_what(o, inputs, origin.get('files', 0))} into {url or out}, {_how(o)}")
        stage = (_Text if o.fmt == "text" else _Conversations)(tokenizer_dir, o, records)
        with _space_for(out), atomic_dir(out, "prepare") as partial:  # (the outer one: fsync, rename)
            _save_tokenizer(stage, partial, out)
            split_stats, duplicates = _write_splits(
                stage, o, {s: partial / s for s in SPLITS}, {s: f"{url}/{s}" if url else None for s in SPLITS},
                {s: out / s for s in SPLITS}, dedup=o.dedup, since=began,
            )  # fmt: skip
            manifest = (
                _manifest(
                    stage.tok, tokenizer_dir, partial, stage.dtype, stage.max_id, stage.chunk_tokens, o.val_fraction
                )
                | stage.manifest(split_stats)
                | {  # fmt: skip
                    "duplicates_removed": duplicates if o.dedup else None,
                    "undecodable_documents": report.undecodable,
                    "sources": {**origin, **stage.source_fields},
                    "shards": {"compression": o.compression, "bytes_limit": o.shard_bytes},
                    "seconds": round(time.time() - start, 2),
                }
            )
            if o.fmt == "text":
                manifest["undecodable_examples"] = report.undecodable_examples
            _write_manifest(out, partial, manifest)
        if url:
            upload_last(out, url, [f"tokenizer/{name}" for name in manifest["tokenizer"]["files"]], MANIFEST)
    finally:
        if stage is not None:
            stage.close()
    return manifest


def _what(o: PrepareOptions, inputs: list[str] | None, files: int) -> str:
    """What a prepare reads, in words: the dataset, or its files."""
    if o.dataset:
        config = f" ({o.dataset_config})" if o.dataset_config else ""
        return f"the dataset {o.dataset}{config}, split {o.split}"
    return console.count(files, "file") + ("" if inputs else " of the Python standard library (no corpus named)")


def _how(o: PrepareOptions) -> str:
    if o.fmt == "text":
        return f"tokenizing with {console.count(_workers(o), 'worker')}"
    return f"{o.fmt} records rendered into blocks of {o.block_size} tokens"


def _workers(o: PrepareOptions) -> int:
    """The text stage's tokenizer processes: --num-proc, or the cores this process may use (SLURM's)."""
    return o.num_proc or len(os.sched_getaffinity(0)) or 1


def _save_tokenizer(stage, partial: Path, label: Path) -> None:
    with _space_for(label / "tokenizer"):
        stage.tok.save_pretrained(str(partial / "tokenizer"))  # (with a chat template the data used)


def _write_splits(stage, o: PrepareOptions, dirs: dict, remotes: dict, labels: dict, dedup: bool,
                  beat=None, since: float | None = None) -> tuple[dict[str, SplitStats], int]:  # fmt: skip
    """The stage's items into one ChunkWriter per split (each item's hash picks its split; with `dedup`, an
    item whose hash was seen is left out): (each split's figures, the duplicates left out). `beat`: a part's
    heartbeat, told the records and tokens written. `since`: the time.monotonic() the work began at (the
    progress's time and rate count from then: the workers tokenize from the start)."""
    writers = {
        s: ChunkWriter(dirs[s], stage.dtype, stage.chunk_tokens, o.compression, o.shard_bytes, labels[s], remotes[s],
                       with_mask=stage.with_mask)
        for s in SPLITS
    }  # fmt: skip
    bar = console.progress(unit=stage.unit, desc="prepare", enabled=o.progress, since=since)
    seen: set[bytes] = set()
    duplicates = 0
    for n, (digest, item) in enumerate(stage.items(bar)):
        if dedup:
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
        split = "val" if _encode.digest_is_val(digest, o.val_fraction) else "train"
        stage.add(split, item, writers[split])
        if beat is not None and n % 64 == 0:
            beat.state["tokens"] = sum(w.stats.tokens + w.pending_tokens for w in writers.values())
    bar.close()
    stage.finish(writers)
    return {s: w.close() for s, w in writers.items()}, duplicates


def _records(inputs: list[str] | None, o: PrepareOptions, report: sources.Report, origin: dict):
    """(where, record) of the corpus, lazily; `origin` gets the number of files."""
    from dist_clm.data import conversations

    columns = sources.Columns((o.text_column,), sources.TEXT_FIX) if o.fmt == "text" else conversations.columns(o.fmt)
    if o.dataset:
        return sources.dataset_by_name(o.dataset, o.dataset_config, o.split, columns)
    files = sources.resolve_inputs(inputs) if inputs else sources.default_corpus_files()
    origin["files"] = len(files)
    if o.fmt != "text":
        plain = next((f for f in files if sources.inner_suffix(f) in sources.TEXT_SUFFIXES), None)
        if plain is not None:
            raise UserError(
                f"--format {o.fmt} reads records ({', '.join(columns.names)}) from JSON lines, JSON, parquet, CSV "
                f"or a saved dataset, but '{plain}' is plain text; write its records as JSON lines, or prepare it "
                "without --format (pretraining text)."
            )
    return sources.iter_records(files, columns, report, o.split)


class _Text:
    """text: each record's text is a document, its ids followed by EOS, tokenized in batches by `num_proc`
    worker processes (_Pipeline), which start at once: the tokenizer's JSON is read straight from its file
    while transformers (seconds to import) loads it properly. A document's hash (from the workers) picks its
    split; empty documents are skipped and counted."""

    unit, with_mask = "doc", False

    def __init__(self, tokenizer_dir, o: PrepareOptions, records):
        self.o, self.stats = o, {"empty": 0}
        self.lengths: dict[str, Counter] = {s: Counter() for s in SPLITS}  # document lengths by bit length
        self.text_column, self.chunk_tokens, self.max_id = o.text_column, o.chunk_tokens, -1
        docs = (sources.as_text(record[o.text_column]) for _, record in records)
        num_proc = _workers(o)
        guess, self.pipeline = _tokenizer_json_guess(tokenizer_dir), None
        if guess:
            self.pipeline = _Pipeline(_batches(docs, self.stats), *guess, num_proc)  # starts tokenizing at once
        self.tok = load_tokenizer(tokenizer_dir)  # the authority on what the tokenizer is
        self.dtype = _dtype_for(vocab_size(self.tok))
        key = (self.tok.backend_tokenizer.to_str(), self.tok.eos_token_id, self.dtype.name)
        if self.pipeline is None:
            self.pipeline = _Pipeline(_batches(docs, self.stats), *key, num_proc)
        self.pipeline.use(*key)

    def items(self, bar):
        tokens = 0
        for batch, (flat, sizes, digests) in self.pipeline:
            self.max_id = max(self.max_id, int(flat.max()))
            offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
            for i in range(len(sizes)):
                yield digests[16 * i : 16 * i + 16], flat[offsets[i] : offsets[i + 1]]
            tokens += offsets[-1]
            bar.update(len(batch))
            bar.set_postfix(tokens=f"{tokens / 1e6:.1f}M", refresh=False)

    def add(self, split: str, ids: np.ndarray, writer: ChunkWriter) -> None:
        writer.add(ids)
        self.lengths[split][len(ids).bit_length()] += 1

    def finish(self, writers: dict) -> None:
        pass

    def manifest(self, split_stats: dict[str, SplitStats], check: bool = True) -> dict:
        if check:
            _check_splits(split_stats, self.o.val_fraction, "document")
        return {
            "splits": {
                s: {**vars(split_stats[s]), "length_histogram": _length_histogram(self.lengths[s])} for s in SPLITS
            },  # fmt: skip
            "empty_documents_skipped": self.stats["empty"],
        }

    @property
    def source_fields(self) -> dict:
        return {"text_column": self.text_column}

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()


class _Conversations:
    """chat, prompt-completion, preference: each record rendered (conversations.Renderer: token ids and a loss
    mask; a pair: its chosen and its rejected conversation), its hash (of the record) picking its split, then
    packed whole into blocks of block_size (conversations.Packer; a pair into two blocks side by side)."""

    unit, with_mask = "record", True

    def __init__(self, tokenizer_dir, o: PrepareOptions, records):
        from dist_clm.data import conversations as conv
        from dist_clm.data.tokenizer import use_chat_template

        self.o, self.records, self.columns = o, records, conv.COLUMNS[o.fmt]
        self.tok = load_tokenizer(tokenizer_dir)
        if o.fmt == "chat" or o.chat_template:
            use_chat_template(self.tok, o.chat_template, tokenizer_dir)
        self.render, self.dtype = conv.Renderer(self.tok, o.fmt), _dtype_for(vocab_size(self.tok))
        self.chunk_tokens = max(1, o.chunk_tokens // o.block_size) * o.block_size  # a block never straddles chunks
        self.lanes = 2 if o.fmt == "preference" else 1  # a pair: its chosen and rejected blocks, one after the other
        self.packers = {s: conv.Packer(o.block_size, self.tok.eos_token_id, self.lanes) for s in SPLITS}
        self.max_id = self.tok.eos_token_id

    def items(self, bar):
        for where, record in self.records:
            digest = _encode.digest(json.dumps(record, sort_keys=True, default=str))
            items = self.render.pair(record, where) if self.lanes == 2 else [self.render(record, where)]
            self.max_id = max(self.max_id, *(int(ids.max()) for ids, _ in items))
            yield digest, items
            bar.update(1)

    def add(self, split: str, items, writer: ChunkWriter) -> None:
        for block in self.packers[split].add(*items):
            for piece_ids, piece_mask in block:
                writer.add(piece_ids.astype(self.dtype), piece_mask)

    def finish(self, writers: dict) -> None:
        for name, packer in self.packers.items():
            for block in packer.finish():
                for piece_ids, piece_mask in block:
                    writers[name].add(piece_ids.astype(self.dtype), piece_mask)

    def manifest(self, split_stats: dict[str, SplitStats], check: bool = True) -> dict:
        for s in SPLITS:  # a split's documents are its conversations (the padding pieces are not counted)
            split_stats[s].documents = self.packers[s].stats["conversations"]
        dropped = sum(p.stats["dropped"] for p in self.packers.values())
        if check:
            check_conversations(split_stats, dropped, self.o)
        return {
            "splits": {s: {**vars(split_stats[s]), **self.packers[s].stats} for s in SPLITS},
            "fine_tuning": fine_tuning_fields(self.o, self.tok, self.lanes),
        }

    @property
    def source_fields(self) -> dict:
        return {"columns": list(self.columns)}

    def close(self) -> None:
        pass


def check_conversations(split_stats: dict[str, SplitStats], dropped: int, o: PrepareOptions) -> None:
    """A fine-tuning dataset keeps some conversations, and some in each split."""
    if dropped and not sum(st.documents for st in split_stats.values()):
        raise UserError(f"all {dropped} conversations were dropped: none keeps a learned token within "
                        f"--block-size {o.block_size}; raise --block-size.")  # fmt: skip
    _check_splits(split_stats, o.val_fraction, "conversation")


def fine_tuning_fields(o: PrepareOptions, tok, lanes: int) -> dict:
    templated = o.fmt == "chat" or o.chat_template
    return {
        "format": o.fmt,
        "objective": "dpo" if lanes == 2 else "sft",
        "pairs": lanes == 2,  # blocks 2k and 2k+1: the chosen and rejected answers of the same prompts
        "block_size": o.block_size,
        "chat_template": getattr(tok, "chat_template", None) if templated else None,
        "rules": "whole conversations packed into blocks of block_size tokens (first fit); one longer than "
        "a block keeps its first block_size tokens (truncated), one left with no learned token is dropped",
    }


def _check_splits(split_stats: dict[str, SplitStats], val_fraction: float, what: str) -> None:
    total = sum(st.documents for st in split_stats.values())
    if total == 0:
        raise UserError(f"the corpus holds no non-empty {what}; point prepare at files that contain some.")
    for s in SPLITS:
        if split_stats[s].documents == 0 and not (s == "train" and val_fraction >= 1):  # (1: eval-only data)
            raise UserError(
                f"the {s} split got no {what} ({total} in all with --val-fraction {val_fraction}); use a larger "
                "corpus or change --val-fraction."
            )


def _manifest(tok, tokenizer_dir, partial: Path, dtype, max_id: int, chunk_tokens: int, val_fraction: float) -> dict:
    """The manifest entries every prepared directory has (the splits and the sources are the caller's)."""
    return {
        "format": FORMAT,
        "dist_clm_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer": {
            "fingerprint": fingerprint(tok),
            "vocab_size": vocab_size(tok),
            "eos_id": tok.eos_token_id,
            "bos_id": tok.bos_token_id,
            "source": str(tokenizer_dir),
            "files": sorted(p.name for p in (partial / "tokenizer").iterdir()),
        },
        "token_dtype": dtype.name,
        "max_token_id": max_id,  # training checks it against the model's vocabulary
        "chunk_tokens": chunk_tokens,
        "val_fraction": val_fraction,
        "eval_only": val_fraction >= 1,  # a validation split alone: for eval --data, or weight 0 in data.mix
    }


def _write_manifest(out: Path, partial: Path, manifest: dict) -> None:
    with _space_for(out / MANIFEST):
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last file: marks the data complete


def prepare_part(tokenizer_dir: str | Path, out: str | Path, inputs: list[str] | None, tasks: int, index: int,
                 stage: str = "tokenize", **options) -> dict:  # fmt: skip
    """Task `index` of a prepare in `tasks` parts (parts.py: the layout; work_split.py: its records): runs its
    `stage` (with --dedup: hash, then dedup, then tokenize, each for every task before the next) unless that
    stage's marker says it is done; returns the marker. `out` may be s3://. `options`: PrepareOptions' fields."""
    from dist_clm.data import parts, work_split
    from dist_clm.data.store import store

    o = PrepareOptions(**options)
    o.check(inputs)
    if tasks < 1 or not 0 <= index < tasks:
        raise UserError(f"--task-index must be between 0 and --tasks - 1 ({tasks - 1}), got {index}.")
    if stage not in parts.STAGES:
        raise UserError(f"--stage must be one of {', '.join(parts.STAGES)}, got {stage!r}.")
    if stage != "tokenize" and not o.dedup:
        raise UserError(f"--stage {stage} belongs to --dedup (the exchange of hashes between parts); add --dedup "
                        "or leave --stage out.")  # fmt: skip
    st = store(out)
    files = _input_files(inputs, o)
    cuts = work_split.bounds(sum(files.values()), tasks)
    given = list(inputs) if inputs else [] if o.dataset else ["<python standard library>"]
    parts.check_job(st, {"tasks": tasks, "settings": parts.settings_of(o), "inputs": parts.inputs_record(files),
                         "task_bytes": [b - a for a, b in zip(cuts, cuts[1:], strict=False)],
                         "sources": {"inputs": given, "files": len(files)}})  # fmt: skip
    with parts.task_lock(st, index, tasks):
        return _run_part_stage(st, tokenizer_dir, inputs, files, cuts, o, tasks, index, stage)


def _run_part_stage(st, tokenizer_dir, inputs, files: dict, cuts: list[int], o: PrepareOptions, tasks: int,
                    index: int, stage: str) -> dict:  # fmt: skip
    from dist_clm.data import dedup as exchange
    from dist_clm.data import parts

    done = st.read_json(parts.marker(stage, index))
    if done is not None:
        print(f"part {index} of {tasks}: its {stage} stage is complete ({st.where(parts.marker(stage, index))})")
        return done
    if stage == "tokenize" and o.dedup:
        drop, duplicates = exchange.dropped_records(st, index, tasks)  # (refused here if a dedup is missing)
    beat = parts.Heartbeat(st, stage, index, tasks, cuts[index + 1] - cuts[index])
    start = time.time()
    try:
        report = sources.Report()
        records = _task_records(inputs, files, o, report, tasks, index, beat)
        if stage == "hash":
            m = exchange.hash_stage(st, index, tasks, records, o.fmt, o.text_column)
        elif stage == "dedup":
            m = exchange.dedup_stage(st, index, tasks, beat)
        else:
            if o.dedup:
                records = (r for n, r in enumerate(records) if n not in drop)
            m = _tokenize_part(st, tokenizer_dir, o, records, report, index, tasks, beat)
            m["duplicates_removed"] = duplicates if o.dedup else None
        m |= {"task": index, "tasks": tasks, "stage": stage, "settings": parts.settings_of(o),
              "seconds": round(time.time() - start, 2), "host": socket.gethostname(),
              "slurm_node": os.environ.get("SLURMD_NODENAME")}  # fmt: skip
        st.write_json(parts.marker(stage, index), m)  # last: the stage of this part is complete
    except UserError as e:
        beat.end("failed", str(e))
        raise
    except BaseException as e:
        beat.end("failed", f"{type(e).__name__}: {e}")
        raise
    beat.end("done")
    return m


def _input_files(inputs: list[str] | None, o: PrepareOptions) -> dict:
    """{file: size} of the corpus ({} for a Hugging Face dataset, which is split by its own shards)."""
    if o.dataset:
        return {}
    if inputs:
        return sources.list_inputs(inputs)
    return {p: p.stat().st_size for p in sources.default_corpus_files()}


def _task_records(inputs, files: dict, o: PrepareOptions, report: sources.Report, tasks: int, index: int, beat):
    from dist_clm.data import conversations, work_split

    columns = sources.Columns((o.text_column,), sources.TEXT_FIX) if o.fmt == "text" else conversations.columns(o.fmt)
    if o.dataset:
        records = work_split.dataset_share(o.dataset, o.dataset_config, o.split, columns, tasks, index)
    else:
        records = work_split.records(work_split.shares(files, tasks, index), columns, report, o.split,
                                     lambda n: beat.advance(nbytes=n))  # fmt: skip
    for r in records:
        beat.advance(records=1)
        yield r


def _tokenize_part(st, tokenizer_dir, o: PrepareOptions, records, report: sources.Report, index: int, tasks: int,
                   beat) -> dict:  # fmt: skip
    """The tokenize stage of a part: its records into train/part-NNNNN and val/part-NNNNN (a local OUT: written
    beside them as .part-NNNNN.partial, then renamed; a bucket: uploaded as shards close), the tokenizer into
    parts/part-NNNNN/tokenizer; returns the part's marker (written by the caller, last)."""
    from dist_clm.data import parts
    from dist_clm.data.store import LocalStore
    from dist_clm.fsutil import fsync_dir, fsync_tree

    name = parts.part_name(index)
    finals = {s: f"{s}/{name}" for s in SPLITS} | {"tokenizer": f"parts/{name}"}
    for leftover in finals.values():  # an earlier attempt's, whatever it left (its marker was never written)
        st.remove(leftover)
    local = isinstance(st, LocalStore)
    stage = None
    with tempfile.TemporaryDirectory(prefix="dist-clm-part-") as staging:
        if local:
            work = {k: st.root / v.replace(name, f".{name}.partial") for k, v in finals.items()}
            for w in work.values():
                shutil.rmtree(w, ignore_errors=True)
        else:
            work = {k: Path(staging) / k for k in finals}
        try:
            stage = (_Text if o.fmt == "text" else _Conversations)(tokenizer_dir, o, records)
            labels = {s: Path(st.where(finals[s])) for s in SPLITS}
            with _space_for(labels["train"]):
                remotes = {s: None if local else st.where(finals[s]) for s in SPLITS}
                split_stats, _ = _write_splits(stage, o, work, remotes, labels, dedup=False, beat=beat)
                _save_tokenizer(stage, work["tokenizer"], labels["train"])
            fields = stage.manifest(split_stats, check=False)
            marker = (
                _manifest(
                    stage.tok,
                    tokenizer_dir,
                    work["tokenizer"],
                    stage.dtype,
                    stage.max_id,
                    stage.chunk_tokens,
                    o.val_fraction,
                )  # fmt: skip
                | fields
                | {
                    "undecodable_documents": report.undecodable,
                    "undecodable_examples": report.undecodable_examples,
                    "source_fields": stage.source_fields,
                }  # fmt: skip
            )
            marker["shards"] = {s: _index_files(work[s]) for s in SPLITS}
        finally:
            if stage is not None:
                stage.close()
        if local:
            for k, w in work.items():
                fsync_tree(w)
                os.rename(w, st.root / finals[k])
                fsync_dir((st.root / finals[k]).parent)
        else:  # (the shards were uploaded as they closed, each split's index.json at its end)
            for f in marker["tokenizer"]["files"]:
                st.write_bytes(f"parts/{name}/tokenizer/{f}", (work["tokenizer"] / "tokenizer" / f).read_bytes())
    return marker


def _index_files(split_dir: Path) -> dict:
    """{file name: bytes} of the shard files a split's index.json lists."""
    from dist_clm.data.format import read_index

    out = {}
    for shard in read_index(split_dir):
        for key in ("raw_data", "zip_data"):
            if shard.get(key):
                out[shard[key]["basename"]] = shard[key]["bytes"]
    return out
