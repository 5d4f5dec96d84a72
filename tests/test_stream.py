"""data.packing = "stream": rows read documents segment by segment, deterministically, rank by rank."""

import numpy as np
import pytest
import torch

from lmlab.data.batches import Batches
from lmlab.data.shards import prepare
from lmlab.data.tokenizer import train_tokenizer

T = 32


@pytest.fixture(scope="module")
def shards(small_corpus, tmp_path_factory):
    train, valid = small_corpus
    tok = train_tokenizer([train], 512)
    return prepare([train], tok, tmp_path_factory.mktemp("stream") / "shards", val_files=[valid], shard_tokens=20_000)


def loader(shards, split="train", batch_size=4, cap=32, streams=0, seed=5, **kw):
    return Batches(shards["dir"], split, batch_size, T, packing="stream", seed=seed, segments_per_document=cap,
                   streams=streams, **kw)


def document(batches, doc):
    return np.asarray(batches.shards[batches.doc_shard[doc]][batches.doc_begin[doc]:batches.doc_end[doc]], np.int64)


def test_a_row_reads_its_documents_segment_after_segment(shards):
    """Each row's targets, joined over steps, are whole documents (capped), one after another; flags mark starts."""
    batches = loader(shards, cap=3)
    seen = [[] for _ in range(4)]
    starts = [[] for _ in range(4)]
    for step in range(40):
        x, y = batch = batches.get(step, 0)
        for row in range(4):
            keep = y[row] != -100
            assert torch.equal(x[row, 1:][keep[:-1] & keep[1:]], y[row, :-1][keep[:-1] & keep[1:]])
            if batch.new_doc[row]:
                starts[row].append(step)
            seen[row].append(torch.cat([x[row, :1], y[row][keep]]).numpy())
    docs_read = 0
    for row in range(4):
        assert starts[row][0] == 0
        for a, b in zip(starts[row], starts[row][1:]):
            # the segments between two starts are one document's first tokens (at most 3 segments)
            tokens = np.concatenate([seen[row][a]] + [s[1:] for s in seen[row][a + 1:b]])
            doc, segment = batches.stream.locate(row, a)
            assert segment == 0 and b - a <= 3
            full = document(batches, doc)
            assert np.array_equal(tokens, full[:len(tokens)])
            assert len(tokens) == min(len(full), 3 * T + 1)
            docs_read += 1
    assert docs_read > 8


def test_the_order_is_a_function_of_seed_and_step_and_shuffled_per_epoch(shards):
    a, b, c = loader(shards), loader(shards), loader(shards, seed=6)
    for step in (0, 7, 300):
        assert all(torch.equal(p, q) for p, q in zip(a.get(step, 1), b.get(step, 1)))  # a fresh loader = a resumed run
    assert not torch.equal(a.get(0, 0)[0], c.get(0, 0)[0])
    s = a.stream
    assert not np.array_equal(s._order(0), s._order(1)) and sorted(s._order(1)) == list(range(len(s.segments)))
    # an epoch of one row: every document dealt to it once, then the next epoch starts
    docs, ends = s._epoch(2, 0)
    firsts = [s.locate(2, step)[0] for step in range(int(ends[-1])) if s.locate(2, step)[1] == 0]
    assert firsts == list(docs)
    assert s.locate(2, int(ends[-1])) == (int(s._epoch(2, 1)[0][0]), 0)


def test_rows_belong_to_the_whole_step_so_ranks_split_them(shards):
    """Global micro-batch m holds rows m*B.. whatever the rank count: 1 process x 2 micro = 2 ranks x 1 micro."""
    one = loader(shards, streams=8)
    for step in (0, 5, 33):
        whole = [one.get(step, m) for m in (0, 1)]
        for rank in (0, 1):
            ranked = loader(shards, streams=8, rank=rank, world_size=2).get(step, rank)
            assert all(torch.equal(p, q) for p, q in zip(whole[rank], ranked))
            assert torch.equal(whole[rank].new_doc, ranked.new_doc)
    firsts = {one.stream.locate(row, 0)[0] for row in range(8)}
    assert len(firsts) == 8  # different rows, different documents


def test_validation_subset_is_seed_free_consecutive_and_split_by_rows(shards):
    a = list(loader(shards, "val", seed=1).fixed(5))
    b = list(loader(shards, "val", seed=9).fixed(5))
    assert len(a) == 5 and all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert a[0].new_doc.all()
    v = loader(shards, "val")
    assert np.array_equal(a[0][0][1].numpy(), document(v, 1)[:T])  # row 1 reads document 1 from its start
    if not a[1].new_doc[1]:
        assert np.array_equal(a[1][0][1].numpy(), document(v, 1)[T:2 * T])
    halves = [list(loader(shards, "val").fixed(5).for_rank(r, 2)) for r in (0, 1)]
    for step in range(5):
        assert torch.equal(halves[0][step][0], a[step][0][0::2]) and torch.equal(halves[1][step][0], a[step][0][1::2])


def test_other_packings_are_unchanged_by_the_new_keyword(shards):
    plain = Batches(shards["dir"], "train", 4, T, packing="concat", seed=5).get(3, 1)
    keyed = Batches(shards["dir"], "train", 4, T, packing="concat", seed=5, segments_per_document=2, streams=9).get(3, 1)
    assert all(torch.equal(p, q) for p, q in zip(plain, keyed)) and not hasattr(plain, "new_doc")


def test_bundled_books_corpus_reads_as_chapters_and_matches_its_record():
    """559 train chapters of three novels, Frankenstein's 27 held out; the sha256s are those SOURCES.md records."""
    import hashlib
    import lzma

    from lmlab.config import load_config
    from lmlab.data.corpora import CORPORA_DIR, bundled_corpus
    from lmlab.data.documents import iter_documents

    train, valid = bundled_corpus("books")
    record = (CORPORA_DIR / "SOURCES.md").read_text(encoding="utf-8")
    for path, count in ((train[0], 559), (valid[0], 27)):
        assert hashlib.sha256(lzma.decompress(path.read_bytes())).hexdigest() in record
        assert sum(ends for _, ends in iter_documents(path)) == count
    first = next(text for text, _ in iter_documents(valid[0]))
    assert first.startswith("Frankenstein;") and "Letter 1" in first
    config = load_config("cpu-books-memory")
    assert (config.data.corpus, config.data.packing, config.model.memory) == ("books", "stream", 128)


def test_bundled_books_text_has_no_mojibake():
    """War and Peace came with UTF-8 read as Windows-1252 ("NatÃ¡sha"); SOURCES.md records the repair."""
    import lzma

    from lmlab.data.corpora import bundled_corpus

    for path in bundled_corpus("books")[0] + bundled_corpus("books")[1]:
        text = lzma.decompress(path.read_bytes()).decode("utf-8")
        for sequence in ("Ã", "Â", "â€", "Å“", "Ã©", "\x81", "\x8d", "\x9d"):
            assert sequence not in text, (path.name, sequence)
    assert "Natásha" in lzma.decompress(bundled_corpus("books")[0][0].read_bytes()).decode("utf-8")
