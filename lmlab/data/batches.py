"""Token shards in, deterministic (x, y) batches out.

Design choices:
- A batch depends only on (seed, step, micro, rank), so resuming at step N
  reproduces the data exactly and ranks see different data. Validation uses a
  fixed subset that does not depend on the seed, so runs are comparable.
- Shards are memory-mapped; a missing, truncated or foreign one is one clear error.
"""

from pathlib import Path

import numpy as np
import torch

from lmlab.data import integrity
from lmlab.data.shards import load_meta
from lmlab.data.stream import Streams, StreamSubset
from lmlab.errors import LmlabError

IGNORE = -100  # target at padding positions; cross_entropy skips it


REBUILD = "re-run lmlab prepare (or delete that cache directory to have it rebuilt)"


def _load_shard(path, meta, index=False):
    """A memory-mapped shard (or its document index); a missing, truncated, foreign or changed file is an LmlabError."""
    try:
        shard = np.load(path, mmap_mode="r", allow_pickle=False)
        integrity.verify(meta, path, REBUILD)  # its sha256 against meta.json's, once per process
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
    packing="stream": each row reads one document in consecutive segments across
    steps (lmlab/data/stream.py); `streams` is the number of rows in a whole step
    (batch_size x grad_accum), and batches carry a `new_doc` flag per row.

    pin_memory=True returns page-locked host tensors, so that a CUDA copy with
    non_blocking=True is asynchronous and overlaps the step (it needs CUDA).
    A batch costs ~0.3 ms on CPU, <0.1% of the quick start's step (benchmarks/RESULTS.md):
    no worker processes needed.
    """

    def __init__(self, shards_dir, split, batch_size, context_length, packing="concat", seed=0, rank=0, world_size=1,
                 pin_memory=False, segments_per_document=32, streams=0):
        meta = load_meta(shards_dir)
        if split not in meta["splits"]:
            raise LmlabError(f"no split {split!r} in {shards_dir}; splits: {', '.join(meta['splits'])}")
        if packing not in ("concat", "document", "stream"):
            raise LmlabError(f"packing must be concat, document or stream, got {packing!r}")
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
        self.shards = [_load_shard(directory / name, meta) for name in info["shards"]]
        self.shard_paths = [directory / name for name in info["shards"]]
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
                starts = _load_shard(directory / name.replace(".npy", ".docs.npy"), meta, index=True)
                shard_of.append(np.full(len(starts), i))
                begin.append(starts)
                end.append(np.append(starts[1:], len(self.shards[i])))
            if not shard_of or sum(len(s) for s in shard_of) == 0:
                raise LmlabError(f"the {split} split of {directory} has no documents")
            self.doc_shard, self.doc_begin, self.doc_end = map(np.concatenate, (shard_of, begin, end))
        if packing == "stream":
            self.stream = Streams(self, segments_per_document, streams or batch_size)

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
            integrity.check_ids(rows, self.meta["vocab_size"], lambda r, c: (self.shard_paths[shard[r]], offsets[r] + c),
                                REBUILD)
            return rows[:, :-1].copy(), rows[:, 1:].copy()
        x = np.full((len(picks), self.context_length), self.pad_id, dtype=np.int64)
        y = np.full((len(picks), self.context_length), IGNORE, dtype=np.int64)
        for row, doc in enumerate(picks):
            begin = self.doc_begin[doc]
            tokens = self.shards[self.doc_shard[doc]][begin:min(self.doc_end[doc], begin + window)]
            path = self.shard_paths[self.doc_shard[doc]]
            integrity.check_ids(tokens[None, :], self.meta["vocab_size"], lambda r, c, p=path, b=begin: (p, b + c),
                                REBUILD)
            x[row, :len(tokens) - 1] = tokens[:-1]
            y[row, :len(tokens) - 1] = tokens[1:]
        return x, y

    def _population(self):
        return int(self.starts.sum()) if self.packing == "concat" else len(self.doc_begin)

    def get(self, step, micro=0):
        """The micro-batch for (step, micro): a function of (seed, step, micro, rank) only."""
        if self.packing == "stream":  # micro is the global micro-batch index (training/step.py)
            return self.stream.get(step, micro)
        rng = np.random.default_rng([self.seed, step, micro, self.rank])
        return self._rows(rng.integers(0, self._population(), size=self.batch_size))

    def fixed(self, n_batches):
        """The fixed validation subset: n micro-batches, independent of the seed (this rank's share of them).

        concat: windows evenly spaced over the whole split; document: the first documents;
        stream: n consecutive segments of batch_size rows reading the documents in file order.
        """
        if self.packing == "stream":
            subset = StreamSubset(Streams(self, self.stream.cap, self.batch_size, shuffle=False), n_batches,
                                  range(self.batch_size))
            return subset.for_rank(self.rank, self.world_size)
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

    def for_rank(self, rank, world_size):
        """This rank's share of the subset under torchrun."""
        return FixedBatches(self.batches, self.picks[rank::world_size])


def unigram_loss(train, val_batches, max_tokens=50_000_000):
    """Cross-entropy (nats/token) of the fixed validation subset under the train split's unigram frequencies.

    The loss a model gets by ignoring context entirely: a trained model should be far below it.
    Counts come from up to `max_tokens` train tokens, add-one smoothed so no target has probability 0.
    """
    vocab = train.meta["vocab_size"]
    counts = np.ones(vocab, dtype=np.float64)
    budget = max_tokens
    for shard, path in zip(train.shards, train.shard_paths):
        part = np.asarray(shard[:budget])
        counted = np.bincount(part, minlength=vocab)
        if len(counted) > vocab:  # an id beyond the vocabulary: a damaged shard, refused before the first step
            integrity.check_ids(part[None, :], vocab, lambda r, c, p=path: (p, c), REBUILD)
        counts += counted
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
