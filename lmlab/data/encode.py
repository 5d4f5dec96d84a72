"""Encoding on several cores: the same ids whatever the number of workers.

Design choices:
- `ParallelEncoder` spreads encoding over N processes, one core each (the
  Rust batch encoder's own threads gave no speed-up on the 2-core test
  machine). Each text is encoded on its own, so the ids do not depend on the
  number of workers, and results come back in submission order.
"""

import collections
import contextlib
import itertools
import multiprocessing
import os
import sys

import numpy as np

from tokenizers import Tokenizer as HFTokenizer

from lmlab.errors import LmlabError



def all_cores():
    """Cores this process may run on (the CPU affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def encode_chunk(hf, texts):
    """(ids of all texts end to end as uint32, number of ids of each text) with an HF tokenizer."""
    encode = getattr(hf, "encode_batch_fast", hf.encode_batch)
    return _flat([e.ids for e in encode(list(texts), add_special_tokens=False)])


def _flat(ids):
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum())), lengths


@contextlib.contextmanager
def _one_thread():
    """Keep HF tokenizers' batch encoder on the calling thread (it reads this variable on every call)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


_worker_hf = None  # the tokenizer of a worker process


def _start_worker(spec):
    global _worker_hf
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: N workers use N cores
    _worker_hf = HFTokenizer.from_str(spec)


def _encode_in_worker(texts):
    return encode_chunk(_worker_hf, texts)


class ParallelEncoder:
    """Encode chunks of texts on `workers` cores: in this process for 1, else in worker processes.

    `map(items)` takes (payload, texts) pairs and yields (payload, (ids, lengths)) in the
    order given, reading `items` lazily with at most 2 chunks per worker in flight, so a
    stream larger than memory stays streamed. On Linux workers are forked, as torch's
    DataLoader does (spawn would re-run a calling script that lacks an
    `if __name__ == "__main__"` guard); they only touch the tokenizer, rebuilt from its
    JSON, never torch. Elsewhere they are spawned. Any other
    object with `encode_batch(texts) -> lists of ids` encodes in this process.
    """

    def __init__(self, tokenizer, workers=0):
        self.hf = getattr(tokenizer, "hf", None)
        self.tokenizer = tokenizer
        workers = workers or all_cores()
        if workers < 1:
            raise LmlabError(f"workers must be >= 1 (or 0 for every core), got {workers}")
        self.workers = workers if self.hf is not None else 1
        self.pool = None
        if self.workers > 1:
            method = "fork" if sys.platform == "linux" else "spawn"
            with _one_thread():  # inherited by forked workers: tokenizers then skips its after-fork warning
                self.pool = multiprocessing.get_context(method).Pool(
                    workers, initializer=_start_worker, initargs=(self.hf.to_str(),))

    def map(self, items):
        if self.pool is None:
            for payload, texts in items:
                if self.hf is None:
                    yield payload, _flat(self.tokenizer.encode_batch(texts))
                    continue
                with _one_thread():
                    result = encode_chunk(self.hf, texts)
                yield payload, result
            return
        pending = collections.deque()
        for payload, texts in items:
            pending.append((payload, self.pool.apply_async(_encode_in_worker, (texts,))))
            if len(pending) >= 2 * self.workers:
                payload, result = pending.popleft()
                yield payload, result.get()
        while pending:
            payload, result = pending.popleft()
            yield payload, result.get()

    def close(self):
        if self.pool is not None:
            self.pool.terminate()  # every result has been collected, or the caller is failing anyway
            self.pool.join()
            self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
