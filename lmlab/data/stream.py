"""data.packing = "stream": each batch row reads one document in consecutive segments, step after step.

    row g at step s  ->  segment j of document d  (x = tokens[jT : jT+T], y shifted by one)

Design choices:
- A row is a stream. Row g of the whole step (g = global micro-batch x
  batch_size + row, so it is the same row whatever the number of processes)
  reads its documents one after another, one segment of context_length tokens
  per step. The last segment of a document is padded (targets -100), and the
  next step starts the row's next document. `new_doc` marks the rows that
  start a document, so the model's memory (lmlab/model/memory.py) resets there.
- Which document a row reads at a step is a function of (seed, step, row)
  only, like the other packings: in epoch e the documents are shuffled by
  default_rng([seed, e]) and dealt round-robin to the `streams` rows (row g
  gets order[g::streams]; with fewer documents than rows, rows share them).
  Each row moves through its own epochs at its own pace. So resuming at step N
  reads exactly the data a run that never stopped would read, with nothing to
  save, and a rank reads its own rows only.
- data.segments_per_document caps the segments a document gives (the PG-19
  notebook's seg_num): a long book contributes its first N x context_length
  tokens per epoch.
- The validation subset is seed-free: row r reads the documents r, r + rows,
  ... in file order, segment by segment, so consecutive micro-batches of the
  subset continue each other and a model with memory carries it through.
  Under torchrun each rank takes its share of the rows, for every micro-batch.
"""

import numpy as np
import torch

IGNORE = -100


class Batch(tuple):
    """(x, y), which unpacks as before, plus `new_doc`: a bool tensor, True on rows that start a document."""

    def __new__(cls, x, y, new_doc):
        batch = super().__new__(cls, (x, y))
        batch.new_doc = new_doc
        return batch


class Streams:
    """The segment each row reads at each step, for one split's documents (held by a Batches)."""

    def __init__(self, batches, segments_per_document, streams, shuffle=True):
        self.batches, self.cap, self.streams, self.shuffle = batches, segments_per_document, streams, shuffle
        lengths = batches.doc_end - batches.doc_begin  # tokens, the eot after the document included
        per_doc = -(-(lengths - 1) // batches.context_length)  # segments that cover every target
        self.segments = np.clip(per_doc, 1, segments_per_document).astype(np.int64)
        self._orders = {}  # epoch -> shuffled documents
        self._rows = {}  # row -> [(epoch docs, cumulative segments)], grown as the row reads on

    def _order(self, epoch):
        """The documents of `epoch` in reading order (kept for the last few epochs asked for)."""
        if epoch not in self._orders:
            n = len(self.segments)
            self._orders[epoch] = (np.random.default_rng([self.batches.seed, epoch]).permutation(n)
                                   if self.shuffle else np.arange(n))
            while len(self._orders) > 4:
                self._orders.pop(next(iter(self._orders)))
        return self._orders[epoch]

    def _epoch(self, row, epoch):
        docs = self._order(epoch)[row % len(self.segments)::self.streams]
        return docs, np.cumsum(self.segments[docs])

    def locate(self, row, step):
        """(document, segment index within it) that `row` reads at `step`."""
        epochs = self._rows.setdefault(row, [])
        done = 0
        for epoch in range(step + 1):  # an epoch holds at least one segment, so this ends
            if epoch == len(epochs):
                epochs.append(self._epoch(row, epoch))
            docs, ends = epochs[epoch]
            if step < done + ends[-1]:
                i = int(np.searchsorted(ends, step - done, side="right"))
                begin = ends[i - 1] if i else 0
                return int(docs[i]), int(step - done - begin)
            done += int(ends[-1])
        raise AssertionError("unreachable")

    def arrays(self, places):
        """x, y (rows, T) int64 and new_doc (rows,) bool for a list of (document, segment)."""
        b, T = self.batches, self.batches.context_length
        x = np.full((len(places), T), b.pad_id, dtype=np.int64)
        y = np.full((len(places), T), IGNORE, dtype=np.int64)
        new_doc = np.zeros(len(places), dtype=bool)
        for row, (doc, segment) in enumerate(places):
            begin = b.doc_begin[doc] + segment * T
            tokens = b.shards[b.doc_shard[doc]][begin:min(b.doc_end[doc], begin + T + 1)]
            x[row, :len(tokens) - 1] = tokens[:-1]
            y[row, :len(tokens) - 1] = tokens[1:]
            new_doc[row] = segment == 0
        return x, y, new_doc

    def get(self, step, micro):
        """Micro-batch `micro` (global index) of step `step`: rows micro*batch_size .. (+batch_size)."""
        size = self.batches.batch_size
        return self.tensors([self.locate(micro * size + r, step) for r in range(size)])

    def tensors(self, places):
        x, y, new_doc = self.arrays(places)
        x, y, new_doc = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(new_doc)
        if self.batches.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return Batch(x, y, new_doc)

    def longest(self):
        """Segments of the longest document (before the cap): 1 means streaming carries nothing over."""
        lengths = self.batches.doc_end - self.batches.doc_begin
        return int(-(-(lengths.max() - 1) // self.batches.context_length)) if len(lengths) else 0


class StreamSubset:
    """The fixed validation subset of stream packing: n consecutive steps of the rows this rank holds."""

    def __init__(self, streams, n_batches, rows):
        self.streams, self.n_batches, self.rows = streams, n_batches, list(rows)

    def for_rank(self, rank, world_size):
        """This rank's share: its rows (rank, rank + world_size, ...) at every step of the subset."""
        return StreamSubset(self.streams, self.n_batches, self.rows[rank::world_size])

    def __len__(self):
        return self.n_batches if self.rows else 0

    def __iter__(self):
        return (self.streams.tensors([self.streams.locate(r, step) for r in self.rows])
                for step in range(len(self)))
