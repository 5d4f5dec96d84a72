"""Documents in, token shards out, deterministic batches back.

Design choices:
- Files are streamed, never read whole: .txt (documents separated by
  <|endoftext|>), .jsonl (one object per line), .parquet (needs pyarrow), each
  optionally .gz / .xz / .bz2 compressed. A document longer than PIECE_CHARS
  (e.g. a book with no separators) is yielded in line-aligned pieces, as
  (text, ends) pairs; `ends` is True on the last piece of a document.
- Shards are plain .npy arrays (uint16 when the vocab fits, else uint32) that
  are memory-mapped at training time; each has a .docs.npy index of document
  starts, so document packing needs no scan. meta.json is written last and the
  whole directory is built under a temporary name and renamed into place: a
  directory with meta.json is complete, and a crash leaves nothing behind.
- Tokenizing runs on `workers` cores (default: all) through
  lmlab.tokenizer.ParallelEncoder: this process reads and writes, worker
  processes encode chunks of documents, results are taken in order. Every
  document is encoded on its own, so the shards are byte-identical whatever
  the number of workers (tests/test_data_workers.py checks 1 against 2).
- Without val files, a document goes to val when crc32(text) falls below
  val_fraction: the split is stable across runs and file orders, and duplicate
  documents land on the same side.
- A batch depends only on (seed, step, micro, rank), so resuming at step N
  reproduces the data exactly and ranks see different data. Validation uses a
  fixed subset that does not depend on the seed, so runs are comparable.
"""

import bz2
import codecs
import gzip
import json
import lzma
import os
import shutil
import tempfile
import uuid
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lmlab import atomic
from lmlab.errors import LmlabError
from lmlab.tokenizer import EOT, ParallelEncoder

COMPRESSED = {".gz": lambda f: gzip.GzipFile(fileobj=f, mode="rb"), ".xz": lzma.LZMAFile, ".bz2": bz2.BZ2File}
LINE_BYTES = 1 << 22  # text files are read in lines of at most this many bytes (a <|endoftext|> must not straddle two)
PIECE_CHARS = 1 << 22  # a longer document is yielded in line-aligned pieces of about this size
CHUNK_CHARS = 1 << 20  # text per chunk sent to an encoding worker: a few hundred documents, little memory
IGNORE = -100  # target at padding positions; cross_entropy skips it


# ---------------------------------------------------------------- reading documents


def check_file(path):
    """The path of an existing regular file, or an LmlabError saying what is wrong."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise LmlabError(f"{path} is a directory, not a data file; list the files inside it instead")
    if not path.exists():
        raise LmlabError(f"data file {path} does not exist")
    return path


def _kind(path):
    """(format, compression suffix) from the file name, e.g. train.jsonl.gz -> ('jsonl', '.gz')."""
    name = path.name.lower()
    compression = next((s for s in COMPRESSED if name.endswith(s)), None)
    if compression:
        name = name[: -len(compression)]
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl", compression
    return ("parquet" if name.endswith(".parquet") else "text"), compression


def _lines(path, stream, compressed, limit=LINE_BYTES):
    """(line number, text) of a UTF-8 stream; bad bytes raise an error naming the line and byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()  # -sig: drop a Windows byte-order mark
    offset, number = 0, 1
    while True:
        chunk = stream.readline(limit)
        try:
            text = decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            of = " of the decompressed text" if compressed else ""
            raise LmlabError(f"{path} is not valid UTF-8 at line {number} (byte {offset + max(e.start, 0)}{of}); "
                             "re-encode it as UTF-8, e.g. iconv -f latin1 -t utf-8") from None
        if not chunk:
            return
        yield number, text
        offset += len(chunk)
        number += chunk.endswith(b"\n")


def _text_documents(lines, eot):
    """Split text on the eot string; strip each document; long ones come in pieces (trailing space held back)."""
    buf, size, started = [], 0, False

    def finish():
        text = "".join(buf)
        return text.rstrip() if started else text.strip()

    for _, line in lines:
        *ended, rest = line.split(eot)
        for part in ended:
            buf.append(part)
            text = finish()
            if text or started:
                yield text, True
            buf, size, started = [], 0, False
        buf.append(rest)
        size += len(rest)
        if size >= PIECE_CHARS:
            text = "".join(buf)
            body = text.rstrip() if started else text.strip()
            tail = text[len(text.rstrip()):] if body or started else ""  # leading space of a document is dropped
            if body:
                yield body, False
                started = True
            buf, size = [tail], len(tail)
    text = finish()
    if text or started:
        yield text, True


def json_rows(path, numbered_lines):
    """(line number, object) of each non-blank JSONL line; a bad line is an error naming file:line."""
    for number, line in numbered_lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise LmlabError(f"{path}:{number} is not valid JSON; a .jsonl file holds one JSON object per line") from None
        if not isinstance(row, dict):
            raise LmlabError(f"{path}:{number} is not a JSON object")
        yield number, row


def _jsonl_documents(path, lines, text_key):
    for number, row in json_rows(path, lines):
        if text_key not in row:
            raise LmlabError(f"{path}:{number} has no {text_key!r} field (fields: {', '.join(row)}); "
                             "set data.text_key / --text-key to the field holding the text")
        text = row[text_key]
        if text is not None and not isinstance(text, str):
            raise LmlabError(f"{path}:{number}: field {text_key!r} is not a string")
        if text and text.strip():
            yield text.strip(), True


def _parquet_documents(path, stream, text_key):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LmlabError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.ParquetFile(stream)
    except Exception as e:  # pyarrow raises its own error types
        raise LmlabError(f"{path} is not a valid Parquet file ({e})") from None
    if text_key not in table.schema_arrow.names:
        raise LmlabError(f"{path} has no column {text_key!r} (columns: {', '.join(table.schema_arrow.names)}); "
                         "set data.text_key / --text-key")
    for batch in table.iter_batches(columns=[text_key], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text.strip(), True


def iter_documents(path, text_key="text", eot=EOT, progress=None):
    """Stream (text, ends) pieces of the documents in one file; `ends` marks a document's last piece.

    Most documents come whole as (text, True). `progress`, if given, is called now and then
    with the number of on-disk bytes read since its last call.
    """
    path = check_file(path)
    kind, compression = _kind(path)
    with open(path, "rb") as raw:
        stream = COMPRESSED[compression](raw) if compression else raw
        if kind == "parquet":
            documents = _parquet_documents(path, stream, text_key)
        elif kind == "jsonl":
            documents = _jsonl_documents(path, _lines(path, stream, compression, limit=-1), text_key)
        else:
            documents = _text_documents(_lines(path, stream, compression), eot)
        reported = 0
        try:
            for i, piece in enumerate(documents):
                yield piece
                if progress and i % 256 == 255:
                    position = raw.tell()
                    progress(position - reported)
                    reported = position
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise LmlabError(f"cannot read {path}: {e}") from None
        if progress:
            progress(os.path.getsize(path) - reported)


# ---------------------------------------------------------------- writing shards


class _ShardWriter:
    """One split's token stream, written as .npy shards of shard_tokens tokens plus document-start indexes."""

    def __init__(self, directory, split, dtype, eot_id, shard_tokens):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.eot_id, self.shard_tokens = eot_id, shard_tokens
        self.pending = []  # uint32 id arrays (and eot ids) not yet moved into chunks
        self.chunks, self.buffered = [], 0  # numpy arrays not yet written to a shard
        self.starts = []  # document starts (offsets in the whole split stream) not yet written
        self.written = 0  # tokens already in shard files
        self.tokens = self.documents = self.bytes = 0
        self.in_document = False
        self.shards = []

    def add(self, ids, ends, nbytes):
        """One piece of a document: its ids (an integer array), whether it ends the document, its UTF-8 bytes."""
        if not self.in_document:
            self.starts.append(self.tokens)
            self.documents += 1
        self.pending.append(ids)
        if ends:
            self.pending.append(np.array([self.eot_id], dtype=np.uint32))
        self.tokens += len(ids) + ends
        self.bytes += nbytes
        self.in_document = not ends

    def commit(self):
        """Move the pending ids into numpy; write every full shard."""
        if self.pending:
            chunk = np.concatenate(self.pending).astype(self.dtype, copy=False)
            self.chunks.append(chunk)
            self.buffered += len(chunk)
            self.pending = []
        while self.buffered >= self.shard_tokens:
            self._write(self.shard_tokens)

    def close(self):
        self.commit()
        if self.buffered:
            self._write(self.buffered)
        return {"shards": self.shards, "tokens": self.tokens, "documents": self.documents, "bytes": self.bytes,
                "bytes_per_token": round(self.bytes / self.tokens, 4) if self.tokens else 0.0}

    def _write(self, n):
        stream = np.concatenate(self.chunks)
        shard, rest = stream[:n], stream[n:]
        self.chunks, self.buffered = ([rest] if len(rest) else []), len(rest)
        starts = np.array([s for s in self.starts if s < self.written + n], dtype=np.int64) - self.written
        self.starts = [s for s in self.starts if s >= self.written + n]
        name = f"{self.split}_{len(self.shards):06d}.npy"
        np.save(self.directory / name, shard)
        np.save(self.directory / name.replace(".npy", ".docs.npy"), starts)
        self.shards.append(name)
        self.written += n


def _as_list(files):
    return [files] if isinstance(files, (str, Path)) else list(files or ())


def _check_out_dir(out_dir):
    if out_dir.exists() and not out_dir.is_dir():
        raise LmlabError(f"output {out_dir} is a file; give a directory for the shards")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "meta.json").exists():
        raise LmlabError(f"output directory {out_dir} is not empty and holds no shards (no meta.json); "
                         "choose a new or empty directory")


def _publish(tmp, out_dir):
    """Rename a finished directory into place, replacing an older one (atomic when out_dir is absent)."""
    try:
        os.rename(tmp, out_dir)  # works when out_dir is absent or an empty directory
    except OSError:
        _check_out_dir(out_dir)
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)


def _is_val(text, val_fraction):
    return zlib.crc32(text.encode("utf-8")) < val_fraction * 2**32


def _chunks(path, split, val_fraction, text_key, progress):
    """(pieces, texts) chunks of about CHUNK_CHARS of one file; a piece is (ends, split, UTF-8 bytes).

    `split` None means choose per document by content hash; a document's first piece decides.
    """
    pieces, texts, size, current = [], [], 0, None
    for text, ends in iter_documents(path, text_key=text_key, progress=progress):
        if current is None:
            current = split or ("val" if _is_val(text, val_fraction) else "train")
        pieces.append((ends, current, len(text.encode("utf-8"))))
        texts.append(text)
        size += len(text)
        current = None if ends else current
        if size >= CHUNK_CHARS:
            yield pieces, texts
            pieces, texts, size = [], [], 0
    if texts:
        yield pieces, texts


def _write_chunks(encoded, writers):
    """Hand the encoded chunks, in order, to the split writers."""
    for pieces, (ids, lengths) in encoded:
        bounds = np.cumsum(lengths)
        for (ends, where, nbytes), stop, length in zip(pieces, bounds, lengths):
            writers[where].add(ids[stop - length:stop], ends, nbytes)
        for writer in writers.values():
            writer.commit()


def prepare(files, tokenizer, out_dir, val_files=(), val_fraction=0.05, text_key="text", shard_tokens=50_000_000,
            workers=0):
    """Tokenize `files` into train / val .npy shards + meta.json in out_dir; returns the meta dict.

    Every document is followed by the tokenizer's eot id. With val_files, files -> train and
    val_files -> val; without, a document goes to val when crc32(text) < val_fraction.
    `workers` processes encode (0 = every core); the shards do not depend on it.
    """
    files, val_files = [check_file(f) for f in _as_list(files)], [check_file(f) for f in _as_list(val_files)]
    if not files:
        raise LmlabError("no training files given")
    if not val_files and not 0 < val_fraction < 1:
        raise LmlabError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    if shard_tokens <= 0:
        raise LmlabError(f"shard_tokens must be positive, got {shard_tokens}")
    if workers < 0:
        raise LmlabError(f"workers must be >= 1, or 0 for every core, got {workers}")
    out_dir = Path(out_dir).expanduser()
    _check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        writers = {split: _ShardWriter(tmp, split, dtype, tokenizer.eot_id, shard_tokens) for split in ("train", "val")}
        total = sum(f.stat().st_size for f in files + val_files)
        sources = [(path, "train" if val_files else None) for path in files] + [(path, "val") for path in val_files]
        with tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=None) as bar, \
                ParallelEncoder(tokenizer, workers) as encoder:
            chunks = (chunk for path, split in sources
                      for chunk in _chunks(path, split, val_fraction, text_key, bar.update))
            _write_chunks(encoder.map(chunks), writers)
        splits = {split: writer.close() for split, writer in writers.items()}
        names = ", ".join(str(f) for f in files)
        if splits["train"]["documents"] == 0 and (val_files or splits["val"]["documents"] == 0):
            raise LmlabError(f"no documents in {names}: the files are empty or hold only whitespace")
        if splits["train"]["documents"] == 0:
            raise LmlabError(f"no training documents in {names}: all {splits['val']['documents']} went to validation; "
                             "separate documents with <|endoftext|> lines or pass validation files")
        if splits["val"]["documents"] == 0:
            where = ", ".join(str(f) for f in val_files) if val_files else f"{names} (val_fraction {val_fraction})"
            raise LmlabError(f"no validation documents from {where}; separate documents with <|endoftext|> lines, "
                             "raise the val fraction, or pass validation files")
        tokenizer.save(tmp)
        meta = {
            "format": 1,
            "tokenizer_fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id, "pad_id": tokenizer.pad_id,
            "dtype": np.dtype(dtype).name,
            "splits": splits,  # bytes = UTF-8 bytes of the document texts, for bits-per-byte
            "sources": {"train": [{"file": str(f), "bytes": f.stat().st_size} for f in files],
                        "val": [{"file": str(f), "bytes": f.stat().st_size} for f in val_files]},
            "val_fraction": None if val_files else val_fraction,
            "text_key": text_key, "shard_tokens": shard_tokens,
        }
        atomic.write_text(tmp / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dict(meta, dir=str(out_dir))


def load_meta(shards_dir):
    """meta.json of a prepared shards directory (with 'dir' added), or an error saying to run lmlab prepare."""
    shards_dir = Path(shards_dir).expanduser()
    how = f"make it with: lmlab prepare FILES --tokenizer DIR --out {shards_dir}"
    if not shards_dir.is_dir():
        raise LmlabError(f"shards directory {shards_dir} does not exist; {how}")
    path = shards_dir / "meta.json"
    if not path.is_file():
        raise LmlabError(f"{shards_dir} has no meta.json (not prepared, or preparation did not finish); {how}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LmlabError(f"{path} is not valid JSON; {how}") from None
    if meta.get("format") != 1:
        raise LmlabError(f"{path} has shard format {meta.get('format')!r}, which this lmlab cannot read; {how}")
    return dict(meta, dir=str(shards_dir))


def check_tokenizer(meta, tokenizer):
    """Refuse to train on shards made with a different tokenizer."""
    made, given = meta["tokenizer_fingerprint"], tokenizer.fingerprint
    if made != given:
        where = meta.get("dir", "the shards directory")
        raise LmlabError(f"shards in {where} were made with tokenizer {made} but the given tokenizer is {given}; "
                         f"re-run lmlab prepare with this tokenizer or pass the tokenizer from {where}")


# ---------------------------------------------------------------- reading batches


REBUILD = "re-run lmlab prepare (or delete that cache directory to have it rebuilt)"


def _load_shard(path, index=False):
    """A memory-mapped shard (or its document index); a missing, truncated or foreign file is an LmlabError."""
    try:
        shard = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise LmlabError(f"shard {path} is missing: {REBUILD}") from None
    except (ValueError, OSError, EOFError) as e:
        raise LmlabError(f"shard {path} is truncated or damaged ({e}): {REBUILD}") from None
    if shard.ndim != 1 or shard.dtype not in ((np.int64,) if index else (np.uint16, np.uint32)):
        raise LmlabError(f"shard {path} is not a token shard (shape {shard.shape}, {shard.dtype}): {REBUILD}")
    return shard


class Batches:
    """(x, y) micro-batches of one split; y is x shifted by one token.

    packing="concat": random windows of context_length+1 tokens over the joined
    documents (a window never crosses a shard end). packing="document": each row is
    one random document from its start, cut to context_length+1 tokens and padded
    with pad_id; targets at padding are -100 and the eot after the document is a target.

    pin_memory=True returns page-locked host tensors, so that a CUDA copy with
    non_blocking=True is asynchronous and overlaps the step (it needs CUDA).
    A batch costs ~0.3 ms on CPU, <0.1% of the quick start's step (benchmarks/RESULTS.md):
    no worker processes needed.
    """

    def __init__(self, shards_dir, split, batch_size, context_length, packing="concat", seed=0, rank=0, world_size=1,
                 pin_memory=False):
        meta = load_meta(shards_dir)
        if split not in meta["splits"]:
            raise LmlabError(f"no split {split!r} in {shards_dir}; splits: {', '.join(meta['splits'])}")
        if packing not in ("concat", "document"):
            raise LmlabError(f"packing must be concat or document, got {packing!r}")
        if seed < 0 or not 0 <= rank < world_size:
            raise LmlabError(f"need seed >= 0 and 0 <= rank < world_size, got seed={seed} rank={rank} world_size={world_size}")
        if pin_memory and not torch.cuda.is_available():
            raise LmlabError("pin_memory=True needs CUDA (pinned host memory only speeds up copies to a GPU)")
        self.meta, self.split, self.packing, self.pin_memory = meta, split, packing, pin_memory
        self.batch_size, self.context_length = batch_size, context_length
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.pad_id = meta["pad_id"]
        info = meta["splits"][split]
        directory = Path(meta["dir"])
        self.shards = [_load_shard(directory / name) for name in info["shards"]]
        if sum(len(s) for s in self.shards) != info["tokens"]:
            raise LmlabError(f"the {split} shards in {directory} hold {sum(len(s) for s in self.shards):,} tokens but "
                             f"meta.json says {info['tokens']:,}; they were changed after lmlab prepare: {REBUILD}")
        self.tokens, self.documents, self.bytes = info["tokens"], info["documents"], info["bytes"]
        window = context_length + 1
        if packing == "concat":
            # every shard contributes all its window starts: shards are chosen in proportion to their size
            self.starts = np.array([max(len(s) - window + 1, 0) for s in self.shards], dtype=np.int64)
            if self.starts.sum() == 0:
                raise LmlabError(f"the {split} split of {directory} has {self.tokens:,} tokens (per shard at most), "
                                 f"fewer than context_length+1 = {window}; use a shorter context or more data")
        else:
            shard_of, begin, end = [], [], []
            for i, name in enumerate(info["shards"]):
                starts = _load_shard(directory / name.replace(".npy", ".docs.npy"), index=True)
                shard_of.append(np.full(len(starts), i))
                begin.append(starts)
                end.append(np.append(starts[1:], len(self.shards[i])))
            if not shard_of or sum(len(s) for s in shard_of) == 0:
                raise LmlabError(f"the {split} split of {directory} has no documents")
            self.doc_shard, self.doc_begin, self.doc_end = map(np.concatenate, (shard_of, begin, end))

    def _rows(self, picks):
        """Tensors (x, y) for global window starts (concat) or document indices (document), pinned if asked."""
        x, y = self._arrays(picks)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        return (x.pin_memory(), y.pin_memory()) if self.pin_memory else (x, y)

    def _arrays(self, picks):
        window = self.context_length + 1
        if self.packing == "concat":
            ends = np.cumsum(self.starts)
            shard = np.searchsorted(ends, picks, side="right")
            offsets = picks - (ends[shard] - self.starts[shard])
            rows = np.stack([self.shards[s][o:o + window] for s, o in zip(shard, offsets)]).astype(np.int64)
            return rows[:, :-1].copy(), rows[:, 1:].copy()
        x = np.full((len(picks), self.context_length), self.pad_id, dtype=np.int64)
        y = np.full((len(picks), self.context_length), IGNORE, dtype=np.int64)
        for row, doc in enumerate(picks):
            begin = self.doc_begin[doc]
            tokens = self.shards[self.doc_shard[doc]][begin:min(self.doc_end[doc], begin + window)]
            x[row, :len(tokens) - 1] = tokens[:-1]
            y[row, :len(tokens) - 1] = tokens[1:]
        return x, y

    def _population(self):
        return int(self.starts.sum()) if self.packing == "concat" else len(self.doc_begin)

    def get(self, step, micro=0):
        """The micro-batch for (step, micro): a function of (seed, step, micro, rank) only."""
        rng = np.random.default_rng([self.seed, step, micro, self.rank])
        return self._rows(rng.integers(0, self._population(), size=self.batch_size))

    def fixed(self, n_batches):
        """The fixed validation subset: n micro-batches, independent of the seed (this rank's share of them).

        concat: windows evenly spaced over the whole split; document: the first documents.
        """
        count, population = n_batches * self.batch_size, self._population()
        if self.packing == "concat":
            picks = np.arange(count, dtype=np.int64) * population // count
        else:
            picks = np.arange(count, dtype=np.int64) % population
        return FixedBatches(self, picks.reshape(n_batches, self.batch_size)[self.rank::self.world_size])


class FixedBatches:
    """A re-iterable list of (x, y) micro-batches, built on the fly from memory-mapped shards."""

    def __init__(self, batches, picks):
        self.batches, self.picks = batches, picks

    def __len__(self):
        return len(self.picks)

    def __iter__(self):
        return (self.batches._rows(p) for p in self.picks)


def unigram_loss(train, val_batches, max_tokens=50_000_000):
    """Cross-entropy (nats/token) of the fixed validation subset under the train split's unigram frequencies.

    The loss a model gets by ignoring context entirely: a trained model should be far below it.
    Counts come from up to `max_tokens` train tokens, add-one smoothed so no target has probability 0.
    """
    vocab = train.meta["vocab_size"]
    counts = np.ones(vocab, dtype=np.float64)
    budget = max_tokens
    for shard in train.shards:
        part = np.asarray(shard[:budget])
        counts += np.bincount(part, minlength=vocab)[:vocab]
        budget -= len(part)
        if budget <= 0:
            break
    log_probs = np.log(counts / counts.sum())
    total, count = 0.0, 0
    for _, y in val_batches:
        targets = y[y != IGNORE].numpy()
        total -= log_probs[targets].sum()
        count += len(targets)
    return total / max(count, 1)
