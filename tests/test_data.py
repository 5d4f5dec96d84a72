"""Documents stream in, shards decode back to them exactly, and batches are deterministic."""

import gzip
import json
import lzma
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.data import documents
from lmlab.data import corpora
from lmlab.config import DataConfig
from lmlab.data.batches import Batches
from lmlab.data.shards import check_tokenizer, load_meta, prepare
from lmlab.data.documents import iter_documents
from lmlab.errors import LmlabError
from lmlab.data.tokenizer import EOT, Tokenizer, train_tokenizer

EOT_LINE = "<|endoftext|>\n"


def documents_of(path):
    """The documents of a corpus file by its convention: each one followed by a '<|endoftext|>' line."""
    text = Path(path).read_text(encoding="utf-8")
    return [d.strip() for d in text.split(EOT_LINE) if d.strip()]


def stream(shards_dir, split):
    meta = load_meta(shards_dir)
    return np.concatenate([np.load(Path(shards_dir) / name) for name in meta["splits"][split]["shards"]])


def leftovers(parent):
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def tok(small_corpus):
    return train_tokenizer([small_corpus[0]], 512)


@pytest.fixture(scope="module")
def shards(small_corpus, tok, tmp_path_factory):
    """Train and val shards of the small corpus, cut into several shards of 20k tokens."""
    train, valid = small_corpus
    return prepare([train], tok, tmp_path_factory.mktemp("prep") / "shards", val_files=[valid], shard_tokens=20_000)


# ---------------------------------------------------------------- reading documents


def test_text_documents_follow_the_separator_lines(small_corpus):
    train, _ = small_corpus
    pieces = list(iter_documents(train))
    assert all(ends for _, ends in pieces)
    assert [text for text, _ in pieces] == documents_of(train)
    assert len(pieces) == train.read_text(encoding="utf-8").splitlines().count(EOT)


def test_separators_inside_lines_and_whitespace(tmp_path):
    path = tmp_path / "inline.txt"
    path.write_text(f"  one\n{EOT}two{EOT}\n\n  {EOT}\n three \n", encoding="utf-8")
    assert list(iter_documents(path)) == [("one", True), ("two", True), ("three", True)]


def test_compressed_and_jsonl_files(tmp_path, small_corpus):
    train, _ = small_corpus
    expected = documents_of(train)[:50]
    raw = "".join(d + "\n" + EOT_LINE for d in expected).encode("utf-8")
    (tmp_path / "a.txt.xz").write_bytes(lzma.compress(raw))
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(raw))
    rows = "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(expected))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(rows.encode("utf-8")))
    (tmp_path / "b.jsonl").write_text(rows.replace('"text"', '"story"'), encoding="utf-8")
    for name in ("a.txt.xz", "a.txt.gz", "a.jsonl.gz"):
        assert [t for t, _ in iter_documents(tmp_path / name)] == expected
    assert [t for t, _ in iter_documents(tmp_path / "b.jsonl", text_key="story")] == expected


def test_bundled_chinese_corpus_reads_as_chapters():
    train, val = corpora.bundled_corpus("zh")
    chapters = [text for text, _ in iter_documents(val[0])]
    assert len(chapters) == 23 and chapters[0].startswith("第二十回")


def test_a_long_document_comes_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "PIECE_CHARS", 1000)
    lines = [f"line {i} of a book with no separators   " for i in range(500)]
    text = "\n\n  " + "\n".join(lines[:250]) + " " * 3000 + "\n".join(lines[250:]) + "\n\n"
    (tmp_path / "book.txt").write_text(text + EOT_LINE + "short one\n", encoding="utf-8")
    pieces = list(iter_documents(tmp_path / "book.txt"))
    ends = [e for _, e in pieces]
    assert len(pieces) > 10 and ends.count(True) == 2 and ends[-2:] == [True, True]
    assert "".join(t for t, _ in pieces[:-1]) == text.strip()
    assert max(len(t) for t, _ in pieces) < 5000  # about PIECE_CHARS, plus the 3000-space line
    assert pieces[-1] == ("short one", True)
    spaced = "a" * 1000 + "\n" + " " * 1000 + "\n" + "b"  # a piece of pure whitespace inside a document is kept
    (tmp_path / "spaced.txt").write_text(spaced + "\n", encoding="utf-8")
    assert "".join(t for t, _ in iter_documents(tmp_path / "spaced.txt")) == spaced


# ---------------------------------------------------------------- prepare


def test_shards_decode_back_to_the_documents(shards, small_corpus, tok):
    for split, path in zip(("train", "val"), small_corpus):
        docs = documents_of(path)
        assert tok.decode(stream(shards["dir"], split).tolist()) == "".join(d + EOT for d in docs)
        info = shards["splits"][split]
        assert info["documents"] == len(docs) == path.read_text(encoding="utf-8").splitlines().count(EOT)
        assert info["tokens"] == len(stream(shards["dir"], split))
        assert info["bytes"] == sum(len(d.encode("utf-8")) for d in docs)
    assert len(shards["splits"]["train"]["shards"]) > 3  # cut at 20k tokens


def test_meta_and_document_index(shards, tok):
    meta = load_meta(shards["dir"])
    assert meta["tokenizer_fingerprint"] == tok.fingerprint
    assert (meta["vocab_size"], meta["eot_id"], meta["pad_id"], meta["dtype"]) == (512, tok.eot_id, tok.pad_id, "uint16")
    assert Tokenizer.load(shards["dir"]).fingerprint == tok.fingerprint  # the shards carry their tokenizer
    directory, offset, starts = Path(shards["dir"]), 0, []
    for name in meta["splits"]["train"]["shards"]:
        array = np.load(directory / name)
        assert array.dtype == np.uint16 and len(array) <= 20_000
        starts += (np.load(directory / name.replace(".npy", ".docs.npy")) + offset).tolist()
        offset += len(array)
    tokens = stream(shards["dir"], "train")
    assert starts == [0] + (np.flatnonzero(tokens == tok.eot_id)[:-1] + 1).tolist()


def test_hash_split_is_disjoint_and_stable(small_corpus, tok, tmp_path):
    train, _ = small_corpus
    a = prepare([train], tok, tmp_path / "a", val_fraction=0.2)
    b = prepare([train], tok, tmp_path / "b", val_fraction=0.2)
    docs = documents_of(train)
    val_docs = [d for d in docs if zlib.crc32(d.encode("utf-8")) < 0.2 * 2**32]
    assert 0 < len(val_docs) < len(docs)
    assert a["splits"]["val"]["documents"] == len(val_docs)
    assert a["splits"]["train"]["documents"] == len(docs) - len(val_docs)
    decoded = {split: tok.decode(stream(a["dir"], split).tolist()).split(EOT)[:-1] for split in ("train", "val")}
    assert decoded["val"] == val_docs and not set(decoded["val"]) & set(decoded["train"])
    for split in ("train", "val"):
        assert np.array_equal(stream(a["dir"], split), stream(b["dir"], split))


def test_prepare_replaces_an_earlier_shards_directory(small_corpus, tok, tmp_path):
    train, valid = small_corpus
    prepare([valid], tok, tmp_path / "out", val_files=[valid])
    meta = prepare([train], tok, tmp_path / "out", val_files=[valid])
    assert load_meta(tmp_path / "out")["splits"]["train"]["tokens"] == meta["splits"]["train"]["tokens"]
    assert leftovers(tmp_path) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(LmlabError, match="not empty and holds no shards"):
        prepare([train], tok, tmp_path / "mine", val_files=[valid])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_large_vocab_uses_uint32(tmp_path, small_corpus):
    class Big:  # a tokenizer whose ids do not fit in 16 bits
        vocab_size, eot_id, pad_id, fingerprint = 70_000, 69_999, 69_999, "big"

        def encode_batch(self, texts):
            return [[65_536 + (ord(c) % 100) for c in t] for t in texts]

        def save(self, out_dir):
            pass

    meta = prepare([small_corpus[1]], Big(), tmp_path / "big", val_files=[small_corpus[1]])
    assert meta["dtype"] == "uint32" and stream(meta["dir"], "train").max() == 69_999


# ---------------------------------------------------------------- batches


def is_window_of(row, tokens):
    """Whether `row` occurs as a contiguous run in `tokens`."""
    hits = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(tokens, len(row))[:, 0] == row[0])
    return any(np.array_equal(tokens[h:h + len(row)], row) for h in hits)


def test_concat_batches_are_windows_with_shifted_targets(shards):
    batches = Batches(shards["dir"], "train", batch_size=8, context_length=64, seed=1)
    x, y = batches.get(0)
    assert x.shape == y.shape == (8, 64) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    tokens = stream(shards["dir"], "train").astype(np.int64)
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        assert is_window_of(np.append(row_x, row_y[-1]), tokens)


def test_batches_depend_only_on_seed_step_micro_rank(shards):
    def get(seed=1, step=5, micro=0, rank=0):
        return Batches(shards["dir"], "train", 4, 32, seed=seed, rank=rank, world_size=2).get(step, micro)

    first = get()
    assert all(torch.equal(a, b) for a, b in zip(first, get()))  # a fresh object (a resumed run) agrees
    for other in (get(seed=2), get(step=6), get(micro=1), get(rank=1)):
        assert not torch.equal(first[0], other[0])


def test_document_packing_starts_rows_at_documents_and_pads(shards, tok):
    batches = Batches(shards["dir"], "val", batch_size=16, context_length=320, packing="document", seed=3)
    x, y = batches.get(0)
    tokens = stream(shards["dir"], "val").astype(np.int64)
    starts = set([0] + (np.flatnonzero(tokens == tok.eot_id)[:-1] + 1).tolist())
    padded = cut = 0
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        n = int((row_y != -100).sum())
        assert (row_y[n:] == -100).all() and (row_x[n:] == tok.pad_id).all()
        assert np.array_equal(row_x[1:n], row_y[:n - 1])
        row = np.append(row_x[:n], row_y[n - 1])
        assert any(np.array_equal(tokens[s:s + n + 1], row) for s in starts)  # a row begins at a document start
        if n < 320:
            padded += 1
            assert row_y[n - 1] == tok.eot_id  # the document's end is a target
        else:
            cut += 1
    assert padded > 0 and cut > 0


def test_fixed_validation_subset_ignores_the_seed(shards):
    def fixed(seed, packing, rank=0, world_size=1):
        return list(Batches(shards["dir"], "val", 4, 32, packing=packing, seed=seed, rank=rank,
                            world_size=world_size).fixed(6))

    for packing in ("concat", "document"):
        a, b = fixed(1, packing), fixed(99, packing)
        assert len(a) == 6 and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
        halves = fixed(1, packing, 0, 2) + fixed(1, packing, 1, 2)
        assert len(halves) == 6
        assert sorted(h[0].sum().item() for h in halves) == sorted(p[0].sum().item() for p in a)
    first = fixed(1, "concat")[0][0]
    assert not torch.equal(first[0], first[1])  # windows are spread out, not repeated


def test_context_longer_than_the_split(shards):
    with pytest.raises(LmlabError, match="context"):
        Batches(shards["dir"], "train", 4, 50_000)


# ---------------------------------------------------------------- mistakes


@pytest.mark.parametrize("name, content, pattern", [
    ("missing.txt", None, "missing.txt does not exist"),
    ("adir", "dir", "adir is a directory"),
    ("bad.txt", b"first line\nsecond \xc3\x28 line\n", r"bad.txt is not valid UTF-8 at line 2 \(byte 18\)"),
    ("empty.txt", b"", "no documents in .*empty.txt"),
    ("blank.txt", b" \n\n" + EOT_LINE.encode() + b"\n", "no documents in .*blank.txt"),
])
def test_bad_input_leaves_no_output(tmp_path, tok, small_corpus, name, content, pattern):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(LmlabError, match=pattern):
        prepare([path], tok, tmp_path / "out", val_files=[small_corpus[1]])
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_jsonl_errors_name_file_and_line(tmp_path, tok):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(LmlabError, match=r"a.jsonl:2 is not valid JSON"):
        list(iter_documents(tmp_path / "a.jsonl"))
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n\n{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(LmlabError, match=r"b.jsonl:3 has no 'text' field \(fields: body\)"):
        prepare([tmp_path / "b.jsonl"], tok, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_corrupt_compressed_file(tmp_path):
    (tmp_path / "a.txt.xz").write_bytes(lzma.compress(b"some text\n" * 1000)[:60])
    with pytest.raises(LmlabError, match="cannot read .*a.txt.xz"):
        list(iter_documents(tmp_path / "a.txt.xz"))


def test_parquet_without_pyarrow_says_what_to_install(tmp_path):
    try:
        import pyarrow  # noqa: F401
        pytest.skip("pyarrow is installed")
    except ImportError:
        pass
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    with pytest.raises(LmlabError, match="pip install pyarrow"):
        list(iter_documents(tmp_path / "a.parquet"))


def test_all_documents_in_validation_is_an_error(tmp_path, tok):
    (tmp_path / "one.txt").write_text("just one document\n", encoding="utf-8")
    with pytest.raises(LmlabError, match="one.txt"):
        prepare([tmp_path / "one.txt"], tok, tmp_path / "out", val_fraction=0.5)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_shards_and_mismatched_tokenizer(shards, tmp_path, small_corpus):
    with pytest.raises(LmlabError, match="does not exist.*lmlab prepare"):
        load_meta(tmp_path / "nope")
    with pytest.raises(LmlabError, match="no meta.json.*lmlab prepare"):
        load_meta(tmp_path)
    other = train_tokenizer([small_corpus[1]], 300)
    with pytest.raises(LmlabError, match=f"shards in {shards['dir']} were made with tokenizer .* but the given tokenizer is {other.fingerprint}"):
        check_tokenizer(load_meta(shards["dir"]), other)


# ---------------------------------------------------------------- bundled corpora and the cache


def test_bundled_corpora():
    counts = {}
    for name in ("tinystories", "zh"):
        for split, files in zip(("train", "val"), corpora.bundled_corpus(name)):
            with lzma.open(files[0], "rt", encoding="utf-8") as f:
                counts[name, split] = sum(line == EOT_LINE for line in f)
    assert counts == {("tinystories", "train"): 8927, ("tinystories", "val"): 3762,
                      ("zh", "train"): 437, ("zh", "val"): 23}
    with pytest.raises(LmlabError, match="available: books, copy, repeat, tinystories, zh"):
        corpora.bundled_corpus("wikipedia")


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "env"))
    assert corpora.cache_dir(DataConfig()) == tmp_path / "env"
    assert corpora.cache_dir(DataConfig(cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    monkeypatch.delenv("LMLAB_CACHE")
    assert corpora.cache_dir(DataConfig()) == Path.home() / ".cache" / "lmlab"


def test_ensure_data_builds_once_then_reuses_the_cache(small_corpus, tmp_path, monkeypatch):
    train, valid = small_corpus
    cfg = DataConfig(corpus="", train_files=[str(train)], val_files=[str(valid)], tokenizer_vocab_size=300,
                     cache_dir=str(tmp_path))
    calls = []
    real_train = corpora.train_tokenizer
    monkeypatch.setattr(corpora, "train_tokenizer", lambda *a, **k: calls.append(a) or real_train(*a, **k))
    tok, shards_dir = corpora.ensure_data(cfg, log=lambda *_: None)
    assert len(calls) == 1 and tok.vocab_size == 300
    listing = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def refuse(*args, **kwargs):
        raise AssertionError("rebuilt a cached entry")

    monkeypatch.setattr(corpora, "train_tokenizer", refuse)
    monkeypatch.setattr(corpora, "prepare", refuse)
    tok2, shards_dir2 = corpora.ensure_data(cfg, log=lambda *_: None)
    assert (tok2.fingerprint, shards_dir2) == (tok.fingerprint, shards_dir)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == listing
    assert not any(p.name.startswith(".") for p in tmp_path.rglob("*"))
    # prepared shards and an explicit tokenizer skip the cache altogether
    given = DataConfig(shards=str(shards_dir), tokenizer=str(shards_dir), cache_dir=str(tmp_path / "unused"))
    assert corpora.ensure_data(given, log=lambda *_: None)[1] == shards_dir


def test_ensure_data_refuses_a_tokenizer_that_does_not_match(shards, small_corpus, tmp_path):
    other = train_tokenizer([small_corpus[1]], 300)
    other.save(tmp_path / "other")
    cfg = DataConfig(shards=shards["dir"], tokenizer=str(tmp_path / "other"))
    with pytest.raises(LmlabError, match="made with tokenizer"):
        corpora.ensure_data(cfg, log=lambda *_: None)


def test_ensure_data_rejects_corpus_and_files_together(small_corpus):
    with pytest.raises(LmlabError, match='data.corpus=""'):
        corpora.ensure_data(DataConfig(corpus="tinystories", train_files=[str(small_corpus[0])]), log=lambda *_: None)
