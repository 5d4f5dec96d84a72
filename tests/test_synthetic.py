"""data.corpus = "copy": the synthetic copy corpus is deterministic, exact in tokens, and trains like any corpus."""

import hashlib

import numpy as np

from lmlab import load_config
from lmlab.data import synthetic
from lmlab.data.corpora import available_corpora, ensure_data
from lmlab.data.documents import iter_documents


def test_copy_documents_are_letters_a_bar_and_the_same_letters(tmp_path):
    train, valid = synthetic.write_copy_corpus(tmp_path, train_documents=200, val_documents=20, max_letters=10)
    docs = [text for text, _ in iter_documents(train)]
    assert len(docs) == 200 and len([text for text, _ in iter_documents(valid)]) == 20
    for doc in docs:
        first, second = doc.split("|")
        assert first == second and 1 <= len(first) <= 10 and first.isalpha() and first.islower()
    again, _ = synthetic.write_copy_corpus(tmp_path / "again", train_documents=200, val_documents=20, max_letters=10)
    assert again.read_bytes() == train.read_bytes()  # the same seed writes the same bytes
    other, _ = synthetic.write_copy_corpus(tmp_path / "other", seed=1, train_documents=200, val_documents=20)
    assert other.read_bytes() != train.read_bytes()


def test_corpus_copy_is_written_once_and_its_halves_tokenize_alike(tmp_path):
    assert "copy" in available_corpora()
    config = load_config(None, ["data.corpus=copy", "data.tokenizer_vocab_size=300", f"data.cache_dir={tmp_path}"])
    tokenizer, shards = ensure_data(config.data, log=lambda *_: None)
    files = synthetic.synthetic_corpus("copy", tmp_path)
    digest = hashlib.sha256(files[1][0].read_bytes()).hexdigest()
    assert synthetic.synthetic_corpus("copy", tmp_path) == files  # cached: not written again
    assert hashlib.sha256(files[1][0].read_bytes()).hexdigest() == digest
    bar = tokenizer.encode("|")
    assert len(bar) == 1
    for text, _ in list(iter_documents(files[1][0]))[:200]:
        ids = tokenizer.encode(text)
        cut = ids.index(bar[0])
        assert ids[:cut] == ids[cut + 1:]  # the copy is exact in tokens too
    from lmlab.evals.probes import token_counts

    counts = token_counts(shards, "train")
    assert 27 < np.count_nonzero(counts) < tokenizer.vocab_size  # letters, their merges, | and end-of-text only


def test_repeat_documents_repeat_one_segment_of_tokens(tmp_path):
    """data.corpus = "repeat": at vocabulary 258 a document is 6 copies of one 16-token segment."""
    assert "repeat" in available_corpora()
    (train,), (valid,) = synthetic.synthetic_corpus("repeat", tmp_path)
    docs = [text for text, _ in iter_documents(train)]
    assert len(docs) == 2_000 and len([text for text, _ in iter_documents(valid)]) == 50
    assert all(len(d) == 96 and d == d[:16] * 6 and d.isalpha() and d.islower() for d in docs)
    assert len(set(docs)) == len(docs)
    config = load_config(None, ["data.corpus=repeat", "data.tokenizer_vocab_size=258", f"data.cache_dir={tmp_path}"])
    tokenizer, _ = ensure_data(config.data, log=lambda *_: None)
    ids = tokenizer.encode(docs[0])
    assert len(ids) == 96 and ids == ids[:16] * 6  # one token per letter: segment k+1 is segment k
