"""Reading documents: files streamed in, (text, ends) pieces out.

Design choices:
- Files are streamed, never read whole: .txt (documents separated by
  <|endoftext|>), .jsonl (one object per line), .parquet (needs pyarrow), each
  optionally .gz / .xz / .bz2 compressed. A document longer than PIECE_CHARS
  (e.g. a book with no separators) is yielded in line-aligned pieces, as
  (text, ends) pairs; `ends` is True on the last piece of a document.
- The tokenizer trainer and `prepare` both read through `iter_documents`, so
  the separator between documents is never learned into merges.
"""

import bz2
import codecs
import gzip
import json
import lzma
import os
from pathlib import Path


from lmlab.errors import LmlabError

EOT = "<|endoftext|>"  # separates documents in .txt files; the one special token every lmlab tokenizer has

COMPRESSED = {".gz": lambda f: gzip.GzipFile(fileobj=f, mode="rb"), ".xz": lzma.LZMAFile, ".bz2": bz2.BZ2File}
LINE_BYTES = 1 << 22  # text files are read in lines of at most this many bytes (a <|endoftext|> must not straddle two)
PIECE_CHARS = 1 << 22  # a longer document is yielded in line-aligned pieces of about this size


def check_file(path):
    """The path of an existing regular file, or an LmlabError saying what is wrong."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise LmlabError(f"{path} is a directory, not a data file; list the files inside it instead")
    if not path.exists():
        raise LmlabError(f"data file {path} does not exist")
    return path


def file_kind(path):
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
    kind, compression = file_kind(path)
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
