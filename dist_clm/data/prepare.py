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
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_clm import __version__
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


def prepare(
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    inputs: list[str] | None = None,
    *,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    val_fraction: float = 0.05,
    chunk_tokens: int = 16384,
    text_column: str = "text",
    compression: str | None = None,
    shard_bytes: int = 1 << 26,
    num_proc: int | None = None,
    dedup: bool = False,
    progress: bool = True,
    fmt: str = "text",
    block_size: int = 0,
    chat_template: str | None = None,
) -> dict:
    """Tokenize a corpus once into MDS shards; returns the manifest (also written as manifest.json, last).

    The corpus is `inputs` (files, directories, globs, save_to_disk directories), or the Hugging Face
    dataset `dataset` (name or local dataset directory, streamed), or else the embedded default corpus.
    `out_dir` may be a URL (s3://bucket/prefix): the shards are uploaded as they close, the manifest last.
    `fmt` chat or prompt-completion: fine-tuning records, packed whole into blocks of `block_size` tokens with
    a loss mask (data/conversations.py); a tokenizer without a chat template takes `chat_template` (a name).
    """
    from dist_clm.data.conversations import FORMATS

    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}.")
    if fmt != "text" and block_size < 2:
        raise UserError(f"--format {fmt} packs whole conversations into blocks: give --block-size (the training "
                        "data.block_size), e.g. --block-size 2048.")  # fmt: skip
    if fmt != "text" and not (inputs or dataset):
        raise UserError(f"--format {fmt} needs its records: name jsonl/parquet files or --dataset.")
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}.")
    if chunk_tokens < 2:
        raise UserError(f"--chunk-tokens must be at least 2, got {chunk_tokens}.")
    if inputs and dataset:
        raise UserError("give either input files or --dataset, not both.")
    options = dict(
        dataset=dataset, dataset_config=dataset_config, split=split, val_fraction=val_fraction,
        chunk_tokens=chunk_tokens, text_column=text_column, compression=compression, shard_bytes=shard_bytes,
        num_proc=num_proc or os.cpu_count() or 1, dedup=dedup, progress=progress, fmt=fmt, block_size=block_size,
        chat_template=chat_template,
    )  # fmt: skip
    if is_remote(out_dir):  # written here first, then uploaded (shards as they close, the manifest last)
        url = str(out_dir).rstrip("/")
        refuse_complete_remote(url)
        with tempfile.TemporaryDirectory(prefix="dist-clm-prepare-") as staging:
            return _prepare(tokenizer_dir, Path(staging) / "data", url, inputs, **options)
    out = Path(out_dir)
    refuse_non_empty(out)
    return _prepare(tokenizer_dir, out, None, inputs, **options)


def _prepare(tokenizer_dir, out: Path, url: str | None, inputs, *, dataset, dataset_config, split, val_fraction,
             chunk_tokens, text_column, compression, shard_bytes, num_proc, dedup, progress, fmt, block_size,
             chat_template) -> dict:  # fmt: skip
    """`prepare` into the local directory `out` (and, with `url`, uploaded there as it is written)."""
    from tqdm.auto import tqdm

    if fmt != "text":
        return _prepare_conversations(
            tokenizer_dir, out, url, inputs, dataset=dataset, dataset_config=dataset_config, split=split,
            val_fraction=val_fraction, chunk_tokens=chunk_tokens, compression=compression, shard_bytes=shard_bytes,
            dedup=dedup, progress=progress, fmt=fmt, block_size=block_size, chat_template=chat_template,
        )  # fmt: skip

    report = sources.Report()
    if dataset:
        files: list[Path] = []
        docs = sources.hf_dataset_documents(dataset, dataset_config, split, text_column)
        origin = {"dataset": dataset, "config": dataset_config, "split": split}
    else:
        files = sources.resolve_inputs(inputs) if inputs else sources.default_corpus_files()
        docs = sources.iter_documents(files, text_column, report, split)
        origin = {"inputs": list(inputs) if inputs else ["<python standard library>"], "files": len(files)}
    stats = {"empty": 0, "duplicates": 0}
    seen: set[bytes] = set()
    lengths: dict[str, Counter] = {s: Counter() for s in SPLITS}  # document lengths by bit length
    start = time.time()
    pipeline = None
    try:
        guess = _tokenizer_json_guess(tokenizer_dir)
        if guess:
            pipeline = _Pipeline(_batches(docs, stats), *guess, num_proc)  # starts tokenizing at once
        tok = load_tokenizer(tokenizer_dir)  # the authority on what the tokenizer is
        n_vocab, eos = vocab_size(tok), tok.eos_token_id
        dtype = _dtype_for(n_vocab)
        key = (tok.backend_tokenizer.to_str(), eos, dtype.name)
        if pipeline is None:
            pipeline = _Pipeline(_batches(docs, stats), *key, num_proc)
        pipeline.use(*key)
        with _space_for(out), atomic_dir(out, "prepare") as partial:  # (the outer one: fsync, rename)
            with _space_for(out / "tokenizer"):
                tok.save_pretrained(str(partial / "tokenizer"))
            writers = {
                s: ChunkWriter(
                    partial / s, dtype, chunk_tokens, compression, shard_bytes, out / s, f"{url}/{s}" if url else None
                )
                for s in SPLITS
            }
            bar = tqdm(unit="doc", desc="prepare", disable=not progress, smoothing=0.1)
            tokens, max_id = 0, -1
            for batch, (flat, sizes, digests) in pipeline:
                max_id = max(max_id, int(flat.max()))
                offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
                for i, n in enumerate(sizes.tolist()):
                    d = digests[16 * i : 16 * i + 16]
                    if dedup:
                        if d in seen:
                            stats["duplicates"] += 1
                            continue
                        seen.add(d)
                    name = "val" if _encode.digest_is_val(d, val_fraction) else "train"
                    writers[name].add(flat[offsets[i] : offsets[i + 1]])
                    lengths[name][n.bit_length()] += 1
                tokens += offsets[-1]
                bar.update(len(batch))
                bar.set_postfix(tokens=f"{tokens / 1e6:.1f}M", refresh=False)
            bar.close()
            split_stats = {s: w.close() for s, w in writers.items()}
            _check_splits(split_stats, val_fraction, "document")
            manifest = _manifest(tok, tokenizer_dir, partial, dtype, max_id, chunk_tokens, val_fraction) | {
                "splits": {
                    s: {**vars(split_stats[s]), "length_histogram": _length_histogram(lengths[s])} for s in SPLITS
                },
                "empty_documents_skipped": stats["empty"],
                "duplicates_removed": stats["duplicates"] if dedup else None,
                "undecodable_documents": report.undecodable,
                "undecodable_examples": report.undecodable_examples,
                "sources": {**origin, "text_column": text_column},
                "shards": {"compression": compression, "bytes_limit": shard_bytes},
                "seconds": round(time.time() - start, 2),
            }
            _write_manifest(out, partial, manifest)
        if url:
            upload_last(out, url, [f"tokenizer/{name}" for name in manifest["tokenizer"]["files"]], MANIFEST)
    finally:
        if pipeline is not None:
            pipeline.close()
    return manifest


def _check_splits(split_stats: dict[str, SplitStats], val_fraction: float, what: str) -> None:
    total = sum(st.documents for st in split_stats.values())
    if total == 0:
        raise UserError(f"the corpus holds no non-empty {what}; point prepare at files that contain some.")
    for s in SPLITS:
        if split_stats[s].documents == 0:
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
    }


def _write_manifest(out: Path, partial: Path, manifest: dict) -> None:
    with _space_for(out / MANIFEST):
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last file: marks the data complete


def _prepare_conversations(tokenizer_dir, out: Path, url: str | None, inputs, *, dataset, dataset_config, split,
                           val_fraction, chunk_tokens, compression, shard_bytes, dedup, progress, fmt, block_size,
                           chat_template) -> dict:  # fmt: skip
    """Fine-tuning records (conversations.py) -> whole conversations packed into blocks, with loss masks."""
    from tqdm.auto import tqdm

    from dist_clm.data import conversations as conv
    from dist_clm.data.tokenizer import use_chat_template

    start, report, columns = time.time(), sources.Report(), conv.COLUMNS[fmt]
    if dataset:
        records = conv.hf_dataset_records(dataset, dataset_config, split, columns)
        origin = {"dataset": dataset, "config": dataset_config, "split": split}
    else:
        files = sources.resolve_inputs(inputs)
        records = conv.iter_records(files, columns, report, split)
        origin = {"inputs": list(inputs), "files": len(files)}
    tok = load_tokenizer(tokenizer_dir)
    if fmt == "chat" or chat_template:
        use_chat_template(tok, chat_template, tokenizer_dir)
    render, dtype = conv.Renderer(tok, fmt), _dtype_for(vocab_size(tok))
    chunk_tokens = max(1, chunk_tokens // block_size) * block_size  # a block never straddles two chunks
    lanes = 2 if fmt == "preference" else 1  # a pair: its chosen and rejected blocks, one after the other
    packers = {s: conv.Packer(block_size, tok.eos_token_id, lanes) for s in SPLITS}
    seen: set[bytes] = set()
    duplicates, max_id = 0, -1
    with _space_for(out), atomic_dir(out, "prepare") as partial:
        with _space_for(out / "tokenizer"):
            tok.save_pretrained(str(partial / "tokenizer"))  # (with the chat template the data was rendered with)
        writers = {
            s: ChunkWriter(partial / s, dtype, chunk_tokens, compression, shard_bytes, out / s,
                           f"{url}/{s}" if url else None, with_mask=True)
            for s in SPLITS
        }  # fmt: skip
        bar = tqdm(unit="record", desc="prepare", disable=not progress, smoothing=0.1)
        for where, record in records:
            d = _encode.digest(json.dumps(record, sort_keys=True, default=str))
            if dedup:
                if d in seen:
                    duplicates += 1
                    continue
                seen.add(d)
            items = render.pair(record, where) if lanes == 2 else [render(record, where)]
            max_id = max(max_id, *(int(ids.max()) for ids, _ in items))
            name = "val" if _encode.digest_is_val(d, val_fraction) else "train"
            for block in packers[name].add(*items):
                for piece_ids, piece_mask in block:
                    writers[name].add(piece_ids.astype(dtype), piece_mask)
            bar.update(1)
        bar.close()
        for name, packer in packers.items():
            for block in packer.finish():
                for piece_ids, piece_mask in block:
                    writers[name].add(piece_ids.astype(dtype), piece_mask)
        split_stats = {s: w.close() for s, w in writers.items()}
        for s in SPLITS:  # a split's documents are its conversations (the padding pieces are not counted)
            split_stats[s].documents = packers[s].stats["conversations"]
        dropped = sum(p.stats["dropped"] for p in packers.values())
        if dropped and not sum(p.stats["conversations"] for p in packers.values()):
            raise UserError(f"all {dropped} conversations were dropped: none keeps a learned token within --block-size "
                            f"{block_size}; raise --block-size.")  # fmt: skip
        _check_splits(split_stats, val_fraction, "conversation")
        manifest = _manifest(
            tok, tokenizer_dir, partial, dtype, max(max_id, tok.eos_token_id), chunk_tokens, val_fraction
        ) | {  # fmt: skip
            "splits": {s: {**vars(split_stats[s]), **packers[s].stats} for s in SPLITS},
            "fine_tuning": {
                "format": fmt,
                "objective": "dpo" if lanes == 2 else "sft",
                "pairs": lanes == 2,  # blocks 2k and 2k+1: the chosen and rejected answers of the same prompts
                "block_size": block_size,
                "chat_template": getattr(tok, "chat_template", None) if fmt == "chat" or chat_template else None,
                "rules": "whole conversations packed into blocks of block_size tokens (first fit); one longer than "
                "a block keeps its first block_size tokens (truncated), one left with no learned token is dropped",
            },
            "duplicates_removed": duplicates if dedup else None,
            "undecodable_documents": report.undecodable,
            "sources": {**origin, "columns": list(columns)},
            "shards": {"compression": compression, "bytes_limit": shard_bytes},
            "seconds": round(time.time() - start, 2),
        }
        _write_manifest(out, partial, manifest)
    if url:
        upload_last(out, url, [f"tokenizer/{name}" for name in manifest["tokenizer"]["files"]], MANIFEST)
    return manifest
