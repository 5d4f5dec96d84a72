"""Shared fixtures: a small slice of the bundled TinyStories corpus and a tiny model config.

Tests train real models on real text, kept small enough to run in seconds.
"""

import lzma
from pathlib import Path

import pytest

CORPORA = Path(__file__).resolve().parent.parent / "lmlab" / "data" / "corpora"
EOT_LINE = "<|endoftext|>\n"


def tinystories_documents(split="train", n=None):
    """The first n stories of a bundled TinyStories split, each ending with its separator line."""
    with lzma.open(CORPORA / "tinystories" / f"{split}.txt.xz", "rt", encoding="utf-8") as f:
        text = f.read()
    stories = [s + EOT_LINE for s in text.split(EOT_LINE) if s.strip()]
    return stories[:n]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """(train.txt, valid.txt): 400 and 60 real stories, about 330 KB and 50 KB."""
    root = tmp_path_factory.mktemp("corpus")
    train, valid = root / "train.txt", root / "valid.txt"
    train.write_text("".join(tinystories_documents("train", 400)), encoding="utf-8")
    valid.write_text("".join(tinystories_documents("valid", 60)), encoding="utf-8")
    return train, valid


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One cache for the session, so the tokenizer and shards are built once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny_overrides(small_corpus, data_cache, tmp_path):
    """KEY=VALUE overrides for a ~100k-parameter model trained for 30 steps on the small corpus."""
    from evals_support import tiny_overrides as overrides

    return overrides(small_corpus, data_cache, tmp_path / "runs")
