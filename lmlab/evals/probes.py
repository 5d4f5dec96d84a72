"""Working-memory probes: copy, reverse, and the gain a model gets from its history.

Copy / reverse: a sequence, a separator, then the same sequence again (or
reversed). The score is teacher-forced greedy next-token accuracy on the
repeated half: at each position the model sees the true tokens so far and is
right when its argmax is the next one. A model that holds the first half in
working memory copies it; one that does not can only guess.

Design choices:
- Two kinds of sequence. "random": tokens drawn at random, so nothing but the
  first half predicts the second. Which tokens is `random_tokens`: "seen"
  (the default) draws uniformly from the tokens that occur in the training
  shards, "frequency" in proportion to how often they occur there, "vocab"
  uniformly from the whole vocabulary. A token that never occurs in training
  keeps its initial embedding, which a model cannot tell from its neighbours
  (nor its output row from the next); a sequence of such tokens tests the
  untrained weights, not the memory, and a small corpus on a large vocabulary
  leaves many of them (the copy corpus at vocabulary 300 uses 70 of the 299
  ordinary tokens: drawn from the whole vocabulary, three tokens in four are
  ones the model has never read). Special
  tokens are never drawn, nor the separator's tokens (a separator inside the
  first half would be a second start of the copy).
  "meaningful": spans of real text (the run's validation split, or any text
  file), taken from the token stream with the end-of-text tokens removed, so a
  model can also predict them from language alone. For that reason every
  result carries `first_accuracy` and `first_loss`, measured on the first
  occurrence of the same sequences (no copy to look at): the copy gain is the
  difference.
- Lengths run from a few tokens to twice the context. A probe longer than the
  context (1 + 2L + 1 > context_length) is read in sliding windows, every target
  seeing the last context_length - stride to context_length tokens; once L
  nears the context length, the first half leaves the window and accuracy has
  to fall to the no-copy level. `in_context` marks the lengths whose whole
  probe fits in one window.
- Every probe starts with the end-of-text token, as every training document
  follows one: a sequence that opens the window cold is one training never
  shows (a model that copies on the copy corpus scored 0.41 at length 4 without
  it, 0.94 with it). A single-token separator makes the probe 2L + 2 tokens.
- The separator is the end-of-text token by default (a boundary the model knows
  from training); `separator` takes any text instead. `shots` puts that many
  demonstrations (another sequence of the same kind and length, separator,
  its copy / reversal, separator) before the probe.
- History gain: for random positions in the real token stream, the next-token
  loss and accuracy of the same target span (16 tokens by default) when the
  model reads 0, 1, 2, 4, ... tokens of preceding context, up to what fits in
  the window. If the numbers do not move with the context length, the model is
  not using its history.
- Everything is drawn from numpy's generator seeded with `seed`: the same model
  and seed give the same figures.
"""

import numpy as np

from lmlab.evals.bpb import token_byte_lengths
from lmlab.errors import LmlabError
from lmlab.evals.scoring import score

PROBES = ("copy", "reverse", "history")
RANDOM_TOKENS = ("seen", "frequency", "vocab")  # what random probe sequences draw from (random_pool)
MAX_STREAM_TOKENS = 2_000_000  # tokens of real text read for meaningful spans and history positions


def default_lengths(context_length):
    """4, 6, 8, 12, 16, 24, ... up to twice the context, plus the longest probe that fits one window."""
    lengths = {(context_length - 2) // 2}  # end-of-text, L, separator, L
    power = 4
    while power <= 2 * context_length:
        lengths.update(n for n in (power, power * 3 // 2) if n <= 2 * context_length)
        power *= 2
    return sorted(n for n in lengths if n >= 2)


def default_contexts(context_length, span):
    """0, 1, 2, 4, ... tokens of history, up to the most that fits in the window with the span."""
    most = context_length - span
    contexts, c = [0], 1
    while c < most:
        contexts.append(c)
        c *= 2
    return contexts + [most]


def text_stream(tokenizer, files, text_key="text", max_tokens=MAX_STREAM_TOKENS):
    """The token stream of text files as training reads it: each document followed by end-of-text."""
    from lmlab.evals.perplexity import read_documents

    ids, total = [], 0
    documents = read_documents(files, text_key=text_key)
    for encoded in tokenizer.encode_batch([text for _, text in documents]):
        ids.extend(encoded + [tokenizer.eot_id])
        total += len(encoded) + 1
        if total >= max_tokens:
            break
    return np.array(ids[:max_tokens], dtype=np.int64)


def shard_stream(shards_dir, split="val", max_tokens=MAX_STREAM_TOKENS):
    """The first max_tokens tokens of a prepared split."""
    from pathlib import Path

    from lmlab.data.shards import load_meta

    meta = load_meta(shards_dir)
    parts, total = [], 0
    for name in meta["splits"][split]["shards"]:
        shard = np.load(Path(meta["dir"]) / name, mmap_mode="r")
        parts.append(np.asarray(shard[:max_tokens - total], dtype=np.int64))
        total += len(parts[-1])
        if total >= max_tokens:
            break
    return np.concatenate(parts)


def token_counts(shards_dir, split="train", chunk=1 << 24):
    """How often each token id occurs in a prepared split (all of it, read in chunks)."""
    from pathlib import Path

    from lmlab.data.shards import load_meta

    meta = load_meta(shards_dir)
    counts = np.zeros(0, dtype=np.int64)
    for name in meta["splits"][split]["shards"]:
        shard = np.load(Path(meta["dir"]) / name, mmap_mode="r")
        for start in range(0, len(shard), chunk):
            part = np.bincount(np.asarray(shard[start:start + chunk]))
            if len(part) > len(counts):
                counts = np.pad(counts, (0, len(part) - len(counts)))
            counts[:len(part)] += part
    return counts


def random_pool(tokenizer, counts=None, mode="seen"):
    """(token ids, probabilities or None) random probe sequences draw from; specials never.

    mode "vocab": every ordinary token, uniformly. "seen": those with counts > 0, uniformly.
    "frequency": those, in proportion to their counts. `counts` (token_counts of the
    training split) is needed for the last two.
    """
    if mode not in RANDOM_TOKENS:
        raise LmlabError(f"unknown random-token mode {mode!r}; choose {', '.join(RANDOM_TOKENS)}")
    ordinary = token_byte_lengths(tokenizer) > 0
    if mode == "vocab":
        return np.flatnonzero(ordinary), None
    if counts is None:
        raise LmlabError(f"random tokens '{mode}' need the training shards' token counts; use 'vocab' without them")
    counts = np.pad(np.asarray(counts, dtype=np.float64), (0, max(0, len(ordinary) - len(counts))))[:len(ordinary)]
    counts[~ordinary] = 0
    ids = np.flatnonzero(counts > 0)
    if len(ids) < 2:
        raise LmlabError(f"the training data holds {len(ids)} distinct ordinary token(s); too few for random probes")
    return ids, (counts[ids] / counts[ids].sum() if mode == "frequency" else None)


def without_tokens(pool, ids):
    """A random pool (ids, probabilities or None) without the given ids, probabilities renormalised.

    The copy probe takes the separator's tokens out: a random sequence holding the separator
    would mark a second place where the copy starts, which no training document of a copy
    corpus shows (at vocabulary 300 the copy corpus's `|` is one of 70 tokens, in 3 of 5
    sequences of 64).
    """
    tokens, p = pool
    keep = ~np.isin(tokens, ids)
    if keep.sum() < 2:
        raise LmlabError("without the separator's tokens fewer than two tokens are left for random probes")
    if p is None:
        return tokens[keep], None
    return tokens[keep], p[keep] / p[keep].sum()


class _Sampler:
    """Draws probe sequences of one kind: random tokens (from `pool`) or spans of real text."""

    def __init__(self, kind, tokenizer, stream, rng, pool):
        self.kind, self.rng = kind, rng
        if kind == "random":
            self.tokens, self.p = pool
        else:
            byte_lengths = token_byte_lengths(tokenizer)
            self.text = stream[byte_lengths[stream] > 0]  # end-of-text tokens out: one continuous text

    def draw(self, length):
        if self.kind == "random":
            return self.rng.choice(self.tokens, size=length, p=self.p)
        if len(self.text) <= length:
            raise LmlabError(f"the text for meaningful probes has only {len(self.text):,} tokens, too few for a "
                             f"span of {length}; give a longer text (--probe-text) or shorter lengths")
        start = int(self.rng.integers(0, len(self.text) - length))
        return self.text[start:start + length]


def _probe_sequence(sampler, length, shots, sep, transform, eot_id):
    """(tokens, first scored target) of one probe: end-of-text, shots demos, sequence, separator, copy.

    The leading end-of-text is the boundary every training document follows: without it the
    sequence opens a window cold, which training never shows, and a model that learned to copy
    on the copy corpus scored 0.41 at length 4 instead of 0.94 (experiments/induction/RESULT.md).
    """
    parts = [np.array([eot_id], dtype=np.int64)]
    for _ in range(shots):
        demo = sampler.draw(length)
        parts += [demo, sep, transform(demo), sep]
    start = sum(len(p) for p in parts)
    s = sampler.draw(length)
    return np.concatenate(parts + [s, sep, transform(s)]), start


def copy_probe(model, tokenizer, stream, task="copy", lengths=None, samples=32, shots=0, separator=None,
               stride=None, seed=0, device=None, precision="fp32", random_tokens="seen", counts=None):
    """Copy (or reverse) accuracy per length and position, for random and meaningful sequences.

    Random sequences draw from `random_pool(tokenizer, counts, random_tokens)`: `counts` are the
    training split's token counts (token_counts), needed unless random_tokens is "vocab".
    """
    if task not in ("copy", "reverse"):
        raise LmlabError(f"unknown probe task {task!r}; choose copy or reverse")
    context_length = model.config.context_length
    lengths = sorted(set(lengths or default_lengths(context_length)))
    stride = stride or max(1, context_length // 8)
    sep = np.array(tokenizer.encode(separator) if separator else [tokenizer.eot_id], dtype=np.int64)
    if len(sep) == 0:
        raise LmlabError("the probe separator is empty; give some text or leave it out (end-of-text)")
    pool = without_tokens(random_pool(tokenizer, counts, random_tokens), sep)

    def transform(s):
        return s if task == "copy" else s[::-1]

    result = {"kind": "probe", "probe": task, "context_length": context_length, "stride": stride,
              "samples": samples, "shots": shots, "seed": seed,
              "separator": separator if separator else tokenizer.eot, "lengths": lengths,
              "random_tokens": random_tokens, "random_pool": int(len(pool[0]))}
    for kind in ("random", "meaningful"):
        sampler = _Sampler(kind, tokenizer, stream, np.random.default_rng([seed, kind == "meaningful"]), pool)
        rows = []
        for length in lengths:
            # each probe reads as a training document: end-of-text, (demos,) sequence, separator, copy
            sequences = [_probe_sequence(sampler, length, shots, sep, transform, tokenizer.eot_id)
                         for _ in range(samples)]
            scored = score(model, sequences, stride=stride, device=device, precision=precision)
            # scored targets run from the first occurrence's first token (its predecessor is the
            # end-of-text or a demo's separator): the first occurrence, the separator, then the
            # repeated half (the last `length`). The first occurrence is counted from its second token.
            second = np.stack([s.correct[-length:] for s in scored])
            second_loss = np.stack([-s.logprobs[-length:] for s in scored])
            first = np.concatenate([s.correct[1:length] for s in scored])
            first_loss = np.concatenate([-s.logprobs[1:length] for s in scored])
            rows.append({
                "length": length, "in_context": len(sequences[0][0]) <= context_length,
                "accuracy": float(second.mean()), "loss": float(second_loss.mean()),
                "first_accuracy": float(first.mean()) if first.size else None,
                "first_loss": float(first_loss.mean()) if first.size else None,
                "per_position": [round(float(a), 4) for a in second.mean(axis=0)],
            })
        result[kind] = rows
    return result


def history_probe(model, stream, contexts=None, span=16, samples=64, seed=0, device=None, precision="fp32"):
    """Loss and accuracy of the same target spans with 0, 1, 2, 4, ... tokens of preceding context."""
    context_length = model.config.context_length
    if not 1 <= span < context_length:
        raise LmlabError(f"history span must lie in 1..{context_length - 1} tokens, got {span}")
    contexts = sorted(set(contexts or default_contexts(context_length, span)))
    if contexts[0] < 0 or contexts[-1] + span > context_length:
        raise LmlabError(f"history contexts must lie in 0..{context_length - span} tokens "
                         f"(context {context_length} minus the span {span}), got {contexts[0]}..{contexts[-1]}")
    most = contexts[-1]
    if len(stream) < most + span + 2:
        raise LmlabError(f"the text for the history probe has only {len(stream):,} tokens; give a longer text")
    rng = np.random.default_rng([seed, 2])
    positions = rng.integers(most, len(stream) - span - 1, size=samples)
    sequences = [(stream[t - c:t + span + 1], c + 1) for c in contexts for t in positions]
    scored = score(model, sequences, device=device, precision=precision)
    rows = []
    for i, c in enumerate(contexts):
        block = scored[i * samples:(i + 1) * samples]
        loss = float(np.mean([-s.logprobs.mean() for s in block]))
        accuracy = float(np.mean([s.correct.mean() for s in block]))
        rows.append({"context": c, "loss": loss, "accuracy": accuracy})
    for row in rows:
        row["loss_gain"] = rows[0]["loss"] - row["loss"]
        row["accuracy_gain"] = row["accuracy"] - rows[0]["accuracy"]
    return {"kind": "probe", "probe": "history", "context_length": context_length, "span": span,
            "samples": samples, "seed": seed, "contexts": rows}


def probe_summary(result):
    """A few numbers of a probe result, for metrics.jsonl during training."""
    if result["probe"] == "history":
        last = result["contexts"][-1]
        return {"history_loss_gain": last["loss_gain"], "history_accuracy_gain": last["accuracy_gain"]}
    name = result["probe"]
    out = {}
    for kind in ("random", "meaningful"):
        inside = [row["accuracy"] for row in result[kind] if row["in_context"]]
        out[f"{name}_acc_{kind}"] = float(np.mean(inside)) if inside else None
    return out
