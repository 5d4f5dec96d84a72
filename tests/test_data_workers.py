"""prepare on several cores gives the same shards as on one; pinned batches need CUDA."""

import filecmp
import json

import pytest
import torch

from lmlab.config import load_config, validate
from lmlab.data.batches import Batches
from lmlab.data.shards import prepare
from lmlab.errors import LmlabError
from lmlab.data.encode import ParallelEncoder
from lmlab.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok(small_corpus):
    return train_tokenizer([small_corpus[0]], 512)


def test_shards_do_not_depend_on_the_number_of_workers(small_corpus, tok, tmp_path, monkeypatch):
    monkeypatch.setattr("lmlab.data.shards.CHUNK_CHARS", 20_000)  # many chunks, so both workers get several
    train, valid = small_corpus
    one = prepare([train, valid], tok, tmp_path / "one", shard_tokens=30_000, workers=1)  # hash split
    two = prepare([train, valid], tok, tmp_path / "two", shard_tokens=30_000, workers=2)
    assert one["splits"] == two["splits"] and len(one["splits"]["train"]["shards"]) > 1
    names = [n for s in one["splits"].values() for n in s["shards"]]
    names += [n.replace(".npy", ".docs.npy") for n in names]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "one", tmp_path / "two", names + ["meta.json"], shallow=False)
    assert not mismatch and not errors
    assert json.loads((tmp_path / "two" / "meta.json").read_text())["splits"]["val"]["documents"] > 0


def test_parallel_encoder_keeps_order_and_ids(tok, small_corpus):
    texts = small_corpus[1].read_text(encoding="utf-8").split("<|endoftext|>")
    chunks = [(i, texts[i:i + 7]) for i in range(0, len(texts), 7)]
    with ParallelEncoder(tok, workers=2) as encoder:
        results = list(encoder.map(iter(chunks)))
    assert [payload for payload, _ in results] == [payload for payload, _ in chunks]
    for (_, part), (_, (ids, lengths)) in zip(chunks, results):
        assert ids.tolist() == [i for text in part for i in tok.encode(text)]
        assert lengths.tolist() == [len(tok.encode(text)) for text in part]


def test_bad_worker_counts(small_corpus, tok, tmp_path):
    with pytest.raises(LmlabError, match="workers"):
        prepare([small_corpus[0]], tok, tmp_path / "x", workers=-1)
    config = load_config(None, [])
    config.data.workers = -2
    with pytest.raises(LmlabError, match="data.workers must be >= 1"):
        validate(config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_pin_memory_without_cuda_is_a_clear_error(small_corpus, tok, tmp_path):
    shards = prepare([small_corpus[0]], tok, tmp_path / "s", val_files=[small_corpus[1]], workers=1)["dir"]
    with pytest.raises(LmlabError, match="pin_memory=True needs CUDA"):
        Batches(shards, "train", 2, 16, pin_memory=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_batches_are_the_same_batches(small_corpus, tok, tmp_path):
    shards = prepare([small_corpus[0]], tok, tmp_path / "s", val_files=[small_corpus[1]], workers=1)["dir"]
    plain, pinned = Batches(shards, "train", 4, 32, seed=3), Batches(shards, "train", 4, 32, seed=3, pin_memory=True)
    (x, y), (px, py) = plain.get(5), pinned.get(5)
    assert px.is_pinned() and py.is_pinned() and torch.equal(x, px) and torch.equal(y, py)
