"""Repetition of generated text, measured: the share of repeated n-grams under greedy and sampled decoding.

A small model decoded greedily tends to fall into loops ("他道：“你道：“你道..."), and
sampling breaks them up. Eyeballing samples says that much; this module puts
a number on it, next to the same number for the real text that follows the
same prompts (real text repeats itself too: names, "the", punctuation).

Design choices:
- The measure: of the n-grams of a continuation, the share that already
  occurred earlier in the same continuation (position i repeats when tokens
  i..i+n-1 equal tokens j..j+n-1 for some j < i). 0 means every n-gram is
  new; a loop of period p drives the share of every n to 1 as the loop
  grows. Counts are pooled over samples (repeated / total n-grams), so long
  continuations weigh more than ones cut short by end-of-text. 1 - share is
  the "distinct-n" of the text-generation literature, computed per sequence.
- Counted on tokens, the unit the model decodes: for the bundled Chinese
  tokenizer most common characters are single tokens.
- Prompts are spans of the run's validation text (end-of-text tokens
  removed, as the copy probe's meaningful spans), drawn from numpy's
  generator seeded with `seed`; the reference continuation is the text that
  follows each prompt, cut to the same length as the longest generation.
- Three decodings: greedy; temperature 0.8 with top-k 50 (the training
  loop's sample setting and `lmlab generate`'s default); temperature 1 with
  no truncation (the model's own distribution). Each sampled continuation is
  seeded (seed + sample index), so a rerun gives the same figures.
"""

import numpy as np

from lmlab.evals.bpb import token_byte_lengths
from lmlab.errors import LmlabError

NS = (1, 2, 4, 8)
DECODINGS = (
    ("greedy", dict(temperature=0.0, top_k=0)),
    ("t=0.8, top-k 50", dict(temperature=0.8, top_k=50)),
    ("t=1.0", dict(temperature=1.0, top_k=0)),
)


def repeated_ngrams(ids, n):
    """(repeated, total): of the n-grams of `ids`, how many occurred earlier in `ids`, and how many there are."""
    seen, repeated = set(), 0
    total = max(len(ids) - n + 1, 0)
    for i in range(total):
        gram = tuple(ids[i:i + n])
        if gram in seen:
            repeated += 1
        seen.add(gram)
    return repeated, total


def repeated_share(sequences, n):
    """Pooled share of repeated n-grams over several sequences; None when none is n tokens long."""
    counts = [repeated_ngrams(list(s), n) for s in sequences]
    total = sum(t for _, t in counts)
    return sum(r for r, _ in counts) / total if total else None


def _prompts(tokenizer, stream, samples, prompt_tokens, new_tokens, rng):
    """(prompt, reference continuation) pairs: spans of real text and the text right after them."""
    text = stream[token_byte_lengths(tokenizer)[stream] > 0]
    span = prompt_tokens + new_tokens
    if len(text) <= span:
        raise LmlabError(f"the text for prompts has only {len(text):,} tokens, too few for a prompt of "
                         f"{prompt_tokens} and {new_tokens} new tokens")
    starts = rng.integers(0, len(text) - span, size=samples)
    return [(text[s:s + prompt_tokens].tolist(), text[s + prompt_tokens:s + span].tolist()) for s in starts]


def _row(name, tokenizer, continuations):
    lengths = [len(c) for c in continuations]
    return {"decoding": name, "mean_tokens": float(np.mean(lengths)),
            "repeated_share": {str(n): repeated_share(continuations, n) for n in NS},
            "example": tokenizer.decode(continuations[0])}


def repetition_eval(model, tokenizer, stream, samples=32, prompt_tokens=16, new_tokens=128, seed=0,
                    device=None, precision="fp32"):
    """Repeated n-gram shares of `samples` continuations per decoding, and of the real text after the prompts."""
    from lmlab.model.sampling import generate_ids

    del device, precision  # generation runs where the model is, in fp32
    rng = np.random.default_rng(seed)
    pairs = _prompts(tokenizer, stream, samples, prompt_tokens, new_tokens, rng)
    rows = []
    for name, decoding in DECODINGS:
        continuations = [generate_ids(model, prompt, new_tokens, stop_ids=(tokenizer.eot_id,),
                                      seed=seed + i, **decoding) for i, (prompt, _) in enumerate(pairs)]
        rows.append(_row(name, tokenizer, continuations))
    rows.append(_row("real text", tokenizer, [reference for _, reference in pairs]))
    return {"kind": "repetition", "samples": samples, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "seed": seed, "ns": list(NS), "decodings": rows,
            "prompt_example": tokenizer.decode(pairs[0][0])}


def repetition_table(result):
    """Fixed-width table: one row per decoding, the repeated share for each n."""
    from lmlab.evals.output import table

    rows = [[r["decoding"], r["mean_tokens"]] + [r["repeated_share"][str(n)] for n in result["ns"]]
            for r in result["decodings"]]
    return table(["decoding", "tokens"] + [f"repeated {n}-grams" for n in result["ns"]], rows)


def plot_repetition(result, path, title=""):
    """Repeated n-gram share against n, one line per decoding (the real text dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmlab.evals.output import _save

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in result["decodings"]:
        ns = [n for n in result["ns"] if r["repeated_share"][str(n)] is not None]
        style = "k--" if r["decoding"] == "real text" else "o-"
        ax.plot(ns, [r["repeated_share"][str(n)] for n in ns], style, label=r["decoding"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(result["ns"], [str(n) for n in result["ns"]])
    ax.set_ylim(0, 1)
    ax.set_xlabel("n (tokens)")
    ax.set_ylabel("share of n-grams seen before in the same continuation")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)
