"""Teacher-forced scoring: the log-probability and greedy hit of chosen target tokens.

Every evaluation in lmlab.evals reduces to one question: for a sequence of
token ids, how likely is each token of some suffix given the tokens before
it, and is it the model's greedy (argmax) choice? This module answers it.

Design choices:
- A target is always predicted from at most `context_length` preceding tokens
  (the model's positions stop there). A sequence longer than that is cut into
  windows: each target is scored exactly once, and a window reads the whole
  context it can, up to `context_length` tokens, so a target sees at least
  `context_length - stride` tokens of history (except near the start of the
  sequence, where there are fewer). stride = context_length scores the
  sequence in non-overlapping chunks, the last one reaching back to a full
  window; this is Hugging Face's "perplexity of fixed-length models" and
  lm-eval-harness's rolling log-likelihood.
- Windows of many sequences are batched together (right-padded; padding never
  influences earlier positions in a causal model), sorted by length, with the
  batch size set by a budget on logits elements so that a large vocabulary
  does not exhaust memory.
- Log-softmax runs in fp32 whatever the autocast precision, as the loss does
  in training.
"""

from dataclasses import dataclass

import numpy as np
import torch

from lmlab.device import autocast

LOGITS_BUDGET = 1 << 25  # logits elements per forward pass (128 MB in fp32)


@dataclass
class Scored:
    """Per-target results for one sequence: log-probabilities (nats) and greedy hits."""

    logprobs: np.ndarray  # float64, one per scored target
    correct: np.ndarray  # bool, True where argmax of the logits is the target


def windows(n_targets_end, first, context_length, stride):
    """(begin, score_from, end) windows that score targets first..n_targets_end-1 exactly once.

    Positions are in "pair" space: pair j reads input ids[j] and predicts ids[j+1];
    target t (the token at index t) is pair t-1. A window reads ids[begin:end]
    and scores the pairs score_from..end-1, each with every token of the window
    before it as context.
    """
    if not 0 < stride <= context_length:
        raise ValueError(f"stride must lie in 1..context_length ({context_length}), got {stride}")
    done, last = first - 1, n_targets_end - 1  # pairs done..last-1 remain
    out = []
    while done < last:
        end = min(max(done + stride, context_length), last)
        out.append((max(0, end - context_length), done, end))
        done = end
    return out


def _logprobs(model, rows, device, precision):
    """Yield (row index, log-softmax over the vocabulary at each input position) for id sequences `rows`.

    Each row holds at most context_length + 1 ids; its last id is never read as input.
    """
    vocab = model.config.vocab_size
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    was_training = model.training
    model.eval()
    try:
        start = 0
        while start < len(order):
            longest = max(len(rows[order[start]]) - 1, 1)
            batch = order[start:start + max(1, LOGITS_BUDGET // (longest * vocab))]
            start += len(batch)
            x = torch.zeros(len(batch), longest, dtype=torch.long)
            for row, i in enumerate(batch):
                ids = torch.as_tensor(rows[i][:-1], dtype=torch.long)
                x[row, :len(ids)] = ids
            with autocast(precision, device):
                logits = model(x.to(device))
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for row, i in enumerate(batch):
                yield i, logprobs[row, :len(rows[i]) - 1]
    finally:
        model.train(was_training)


@torch.no_grad()
def score(model, sequences, stride=None, device=None, precision="fp32"):
    """Score `sequences`, a list of (ids, first): the targets ids[first:], each given all ids before it.

    Returns one `Scored` per sequence. A sequence longer than the model's context
    is scored in sliding windows with the given stride (default: the context length).
    """
    context_length = model.config.context_length
    stride = stride or context_length
    device = device or next(model.parameters()).device
    pieces = []  # (sequence index, window ids, number of pairs skipped at the window start)
    for index, (ids, first) in enumerate(sequences):
        ids = np.asarray(ids, dtype=np.int64)
        if not 1 <= first <= len(ids):
            raise ValueError(f"first must lie in 1..len(ids), got {first} for {len(ids)} ids")
        for begin, score_from, end in windows(len(ids), first, context_length, stride):
            pieces.append((index, ids[begin:end + 1], score_from - begin))

    found = [None] * len(pieces)
    for i, logprobs in _logprobs(model, [p[1] for p in pieces], device, precision):
        _, ids, skip = pieces[i]
        targets = torch.from_numpy(ids[1 + skip:]).to(logprobs.device)
        kept = logprobs[skip:]
        found[i] = (kept.gather(-1, targets[:, None]).squeeze(-1).double().cpu().numpy(),
                    (kept.argmax(-1) == targets).cpu().numpy())
    results = [([], []) for _ in sequences]
    for (index, _, _), (logprobs, hits) in zip(pieces, found):  # windows were made in target order
        results[index][0].append(logprobs)
        results[index][1].append(hits)
    return [Scored(np.concatenate(lp) if lp else np.zeros(0), np.concatenate(ok) if ok else np.zeros(0, dtype=bool))
            for lp, ok in results]


@torch.no_grad()
def next_token_logprobs(model, contexts, device=None, precision="fp32"):
    """For (context ids, candidate ids) pairs: the log-probability (np.float64) of each candidate right after its context.

    One forward pass serves all candidates of a context (multiple choice with one-token
    answers, like the letters A-D). A context longer than the window keeps its last ids.
    """
    context_length = model.config.context_length
    device = device or next(model.parameters()).device
    rows = [list(ids[-context_length:]) + [0] for ids, _ in contexts]  # the appended id is never read
    out = [None] * len(rows)
    for i, logprobs in _logprobs(model, rows, device, precision):
        out[i] = logprobs[-1, list(contexts[i][1])].double().cpu().numpy()
    return out
