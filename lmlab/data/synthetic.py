"""Synthetic corpora written on first use: `data.corpus = "copy"` and `"repeat"`.

The copy corpus: every document is a run of random lowercase letters, a `|`,
then the same letters again (`qhzkd|qhzkd`). Nothing but the first half
predicts the second, so a model can only lower its loss on second halves by
copying: a corpus made for the copy probe (`lmlab eval --probe copy
--separator "|"`) and experiments/induction.

Design choices:
- Deterministic: numpy's generator with a fixed seed, so every install writes
  the same bytes (tests/test_synthetic.py: the same seed writes the same bytes). The
  files are written once under the data cache (cache_dir/corpora/copy-v2/),
  atomically (a temporary directory renamed into place), and then are
  ordinary .txt files: tokenizer, shards and their cache work unchanged.
- Half-lengths are log-uniform in 1..64 letters (median 8): many short
  copies, which gave the only try that left the unigram plateau (halves of
  1..16 letters: validation loss 3.27 against 3.52 after 8,000 steps, where
  uniform 1..64 stayed flat; experiments/induction/RESULT.md), and long ones
  up to about one 128-token window at vocabulary 300 (~1.1 letters per
  token), so the copy is trained at every distance the probe asks about.
  A 2-layer d_model-128 model at batch 32, constant lr 3e-3, forms a copying
  mechanism on it near step 1,500 (experiments/induction); batch 8 did not.
- Letters without spaces: the byte-level pre-tokenizer splits at `|`, so both
  halves are tokenized identically and the copy is exact in tokens too.

The repeat corpus: every document is 16 random letters written 6 times over
(96 letters, no separator). At vocabulary 258 (bytes only) each letter is one
token, so with `model.context_length = 16` and `data.packing = "stream"`
segment k+1 of a document is segment k again: only a model that carries
memory across the segment boundary (`model.memory`) can predict it
(experiments/memory-copy). Small on purpose (2,000 + 50 documents): it checks
the memory, it does not train a language model.
"""

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from lmlab.data.documents import EOT

VERSION = 2  # bump when the recipe below changes: the files live under a versioned name
COPY = {"seed": 0, "train_documents": 150_000, "val_documents": 2_000, "min_letters": 1, "max_letters": 64}
LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))
REPEAT = {"seeds": (0, 1), "documents": (2_000, 50), "letters": 16, "times": 6}
SYNTHETIC = ("copy", "repeat")


def copy_documents(n, rng, min_letters=1, max_letters=64, separator="|"):
    """n documents `letters|letters`, half-lengths log-uniform in min_letters..max_letters."""
    lengths = np.floor(np.exp(rng.uniform(np.log(min_letters), np.log(max_letters + 1), size=n))).astype(int)
    for length in lengths:
        half = "".join(rng.choice(LETTERS, size=int(length)))
        yield f"{half}{separator}{half}"


def write_copy_corpus(out_dir, seed=0, train_documents=150_000, val_documents=2_000, min_letters=1, max_letters=64):
    """Write train.txt and valid.txt (documents separated by end-of-text lines) into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, n, stream in (("train.txt", train_documents, 0), ("valid.txt", val_documents, 1)):
        rng = np.random.default_rng([seed, stream])
        with open(out_dir / name, "w", encoding="utf-8", newline="\n") as f:
            for doc in copy_documents(n, rng, min_letters, max_letters):
                f.write(f"{doc}\n{EOT}\n")
    return out_dir / "train.txt", out_dir / "valid.txt"


def write_repeat_corpus(out_dir, seeds=(0, 1), documents=(2_000, 50), letters=16, times=6):
    """Write train.txt and valid.txt of documents that are `letters` random letters repeated `times` times."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, seed, n in zip(("train.txt", "valid.txt"), seeds, documents):
        rng = np.random.default_rng(seed)
        with open(out_dir / name, "w", encoding="utf-8", newline="\n") as f:
            for _ in range(n):
                f.write("".join(rng.choice(LETTERS, size=letters)) * times + f"\n{EOT}\n")
    return out_dir / "train.txt", out_dir / "valid.txt"


WRITERS = {"copy": lambda out: write_copy_corpus(out, **COPY), "repeat": lambda out: write_repeat_corpus(out, **REPEAT)}


def synthetic_corpus(name, root):
    """(train_files, val_files) of a synthetic corpus, written under root/corpora/ on first use."""
    entry = Path(root).expanduser() / "corpora" / f"{name}-v{VERSION}"
    files = [entry / "train.txt"], [entry / "valid.txt"]
    if (entry / "valid.txt").is_file():
        return files
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        WRITERS[name](tmp)
        os.rename(tmp, entry)
    except OSError:
        if not (entry / "valid.txt").is_file():  # not just another process winning the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files
