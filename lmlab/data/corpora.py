"""Bundled corpora and the cache that turns a DataConfig into (tokenizer, shards).

Design choices:
- Two small real corpora ship inside the package (lmlab/data/corpora/<name>/
  {train,valid}.txt.xz; origin and licenses in lmlab/data/corpora/SOURCES.md), so
  `lmlab train` works offline on a fresh install.
- Built tokenizers and shards are cached under cache_dir, keyed by a hash of
  everything that determines them (files' paths, sizes and mtimes; vocab size
  and special tokens; tokenizer fingerprint; split settings). A second run with the same settings
  reuses them without retraining.
- Each cache entry is built under a temporary name and renamed into place, so
  a crash or two processes racing never leave a broken entry.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

from lmlab import atomic
from lmlab.data.documents import check_file
from lmlab.data.synthetic import SYNTHETIC, synthetic_corpus
from lmlab.data.shards import check_tokenizer, load_meta, prepare
from lmlab.errors import LmlabError
from lmlab.data.tokenizer import EOT, Tokenizer, check_special_tokens, train_tokenizer

CORPORA_DIR = Path(__file__).parent / "corpora"
CACHE_VERSION = 1  # bump when the tokenizer recipe or shard format changes, to invalidate old entries


def available_corpora():
    """The shipped corpora and the synthetic ones lmlab writes on first use (lmlab/data/synthetic.py)."""
    return sorted([p.name for p in CORPORA_DIR.iterdir() if (p / "train.txt.xz").is_file()] + list(SYNTHETIC))


def bundled_corpus(name, cache=None):
    """(train_files, val_files) of a corpus shipped with lmlab (a synthetic one is written under `cache`)."""
    if name in SYNTHETIC:
        return synthetic_corpus(name, cache or cache_dir(None))
    if name not in available_corpora():
        raise LmlabError(f"no bundled corpus named '{name}'; available: {', '.join(available_corpora())} "
                         "(or set data.corpus=\"\" and data.train_files)")
    return [CORPORA_DIR / name / "train.txt.xz"], [CORPORA_DIR / name / "valid.txt.xz"]


def cache_dir(data):
    """data.cache_dir, else $LMLAB_CACHE, else ~/.cache/lmlab (data None: the last two)."""
    return Path((data and data.cache_dir) or os.environ.get("LMLAB_CACHE") or "~/.cache/lmlab").expanduser()


def _key(*parts):
    """Short hash of JSON-able parts; files are described by resolved path, size and mtime."""
    def describe(part):
        if isinstance(part, Path):
            stat = part.stat()
            return [str(part.resolve()), stat.st_size, stat.st_mtime_ns]
        if isinstance(part, (list, tuple)):
            return [describe(p) for p in part]
        return part
    text = json.dumps([CACHE_VERSION] + [describe(p) for p in parts])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def resolve_files(data):
    if data.corpus:
        if data.train_files or data.val_files:
            raise LmlabError(f"data.corpus='{data.corpus}' and data.train_files/val_files are both set; "
                             "set data.corpus=\"\" to train on your own files")
        return bundled_corpus(data.corpus, cache_dir(data))
    if not data.train_files:
        raise LmlabError("no training data: set data.corpus, data.train_files or data.shards")
    return [check_file(f) for f in data.train_files], [check_file(f) for f in data.val_files]


def _cached_tokenizer(data, train_files, log):
    """The cached tokenizer for these files and settings, trained (and cached) on first use."""
    specials = check_special_tokens([EOT, *data.special_tokens])  # part of the key: other specials, other entry
    entry = cache_dir(data) / "tokenizers" / _key(train_files, data.tokenizer_vocab_size, specials, data.text_key)
    if (entry / "tokenizer.json").is_file():
        log(f"tokenizer: cached {entry}")
        return Tokenizer.load(entry)
    log(f"tokenizer: training a {data.tokenizer_vocab_size}-token byte-level BPE on "
        f"{', '.join(f.name for f in train_files)}")
    tokenizer = train_tokenizer(train_files, data.tokenizer_vocab_size, special_tokens=specials, text_key=data.text_key)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic.temp_dir(entry.parent, prefix=f".{entry.name}.tmp-")
    try:
        tokenizer.save(tmp)
        os.rename(tmp, entry)
    except OSError:
        if not (entry / "tokenizer.json").is_file():  # not just another process winning the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"tokenizer: {tokenizer.vocab_size} tokens ({tokenizer.fingerprint}) cached in {entry}")
    return tokenizer


def ensure_data(data, log=print):
    """(Tokenizer, shards_dir) for a DataConfig, building and caching whatever is missing."""
    if data.shards:
        meta = load_meta(data.shards)
        tokenizer = Tokenizer.load(data.tokenizer or data.shards, special_tokens=data.special_tokens)
        check_tokenizer(meta, tokenizer)
        return tokenizer, Path(data.shards).expanduser()
    train_files, val_files = resolve_files(data)
    if data.tokenizer:
        tokenizer = Tokenizer.load(data.tokenizer, special_tokens=data.special_tokens)
    else:
        tokenizer = _cached_tokenizer(data, train_files, log)
    split = val_files if val_files else data.val_fraction
    shards = cache_dir(data) / "shards" / _key(tokenizer.fingerprint, train_files, split, data.text_key)
    if (shards / "meta.json").is_file():
        log(f"shards: cached {shards}")
    else:
        log(f"shards: tokenizing into {shards}")
        meta = prepare(train_files, tokenizer, shards, val_files=val_files, val_fraction=data.val_fraction,
                       text_key=data.text_key, workers=data.workers)
        log("shards: " + ", ".join(f"{s} {i['tokens']:,} tokens / {i['documents']:,} documents"
                                   for s, i in meta["splits"].items()))
    check_tokenizer(load_meta(shards), tokenizer)
    return tokenizer, shards
