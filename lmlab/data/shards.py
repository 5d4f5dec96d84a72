"""Documents in, token shards out: `lmlab prepare`.

Design choices:
- Shards are plain .npy arrays (uint16 when the vocab fits, else uint32) that
  are memory-mapped at training time; each has a .docs.npy index of document
  starts, so document packing needs no scan. meta.json is written last and the
  whole directory is built under a temporary name and renamed into place: a
  directory with meta.json is complete, and a crash leaves nothing behind.
- Tokenizing runs on `workers` cores (default: all) through
  lmlab.data.encode.ParallelEncoder: this process reads and writes, worker
  processes encode chunks of documents, results are taken in order. Every
  document is encoded on its own, so the shards are byte-identical whatever
  the number of workers (tests/test_data_workers.py checks 1 against 2).
- Without val files, a document goes to val when crc32(text) falls below
  val_fraction: the split is stable across runs and file orders, and duplicate
  documents land on the same side.
"""

import json
import os
import shutil
import uuid
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmlab import atomic
from lmlab.data.documents import check_file, iter_documents
from lmlab.data.encode import ParallelEncoder
from lmlab.data.integrity import checksums
from lmlab.errors import LmlabError

CHUNK_CHARS = 1 << 20  # text per chunk sent to an encoding worker: a few hundred documents, little memory


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
    tmp = atomic.temp_dir(out_dir.parent, prefix=f".{out_dir.name}.tmp-")
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
            "sha256": checksums(tmp, [name for info in splits.values() for name in info["shards"]]),  # integrity.py
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
