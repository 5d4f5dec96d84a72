"""Long documents read segment by segment, as stream training reads them, with or without the model's memory.

    lmlab eval RUN --text book.txt                  # loss by segment index and by position in the segment
    lmlab eval RUN --text book.txt --no-memory      # the same segments, each on its own
    lmlab eval RUN --probe copy --distance 32,64    # copy a sequence whose source lies D tokens back

Design choices:
- A document is scored as stream training reads it: "document <|endoftext|>"
  cut into consecutive segments of context_length tokens, in order, one row
  per document. Stream (and document) packing never feeds an end-of-text
  token as an input, only as the last target, so a leading one (as plain
  perplexity reads) would start every document with an input the model never
  trained on: its untrained embedding spoiled the first segment and, through
  the memory, the second. The first token is therefore context, not a target. With memory (model.memory, lmlab.model.memory)
  each segment also sees the row's previous M tokens; without, it sees only
  itself. Every token after the first is a target exactly once either way,
  so the two losses compare token for token.
- Loss by segment index shows whether later segments profit from what came
  before; loss by position within the segment shows where: without memory the
  first tokens of a segment have no context, with memory they have M tokens.
- The distance copy probe places a source of `length` tokens D tokens before
  its repetition, and the repetition at the start of a segment. So for D up to
  the segment length the source lies in the previous segment: only the memory
  can hold it. Random tokens (no special tokens) test pure copying, chance
  1 / vocabulary; real text (the run's validation split) tests copying that a
  small model can do, against its accuracy on the same span without a copy.
  Drawn from the seed.
"""

import math

import numpy as np
import torch

from lmlab.device import autocast
from lmlab.evals.output import accuracy_axes, table

BUCKETS = 8  # position-in-segment buckets of the table


@torch.no_grad()
def _run_segments(model, rows, use_memory, device, precision):
    """Per-token log-probabilities and argmax hits of `rows` (B, n) int64, read in segments of context_length.

    Returns (logprobs, hits), each (B, n - 1): the prediction of token t+1 from tokens .. t.
    """
    T = model.config.context_length
    rows = torch.as_tensor(rows, dtype=torch.long, device=device)
    memory = model.new_memory(rows.shape[0], device=device) if use_memory else None
    logprobs, hits = [], []
    model.eval()
    for start in range(0, rows.shape[1] - 1, T):
        x, y = rows[:, start:start + T], rows[:, start + 1:start + T + 1]
        x = x[:, :y.shape[1]]
        with autocast(precision, device):
            logits = model(x, memory=memory) if memory is not None else model(x)
        logp = torch.log_softmax(logits.float(), dim=-1)
        logprobs.append(logp.gather(-1, y[..., None]).squeeze(-1).cpu())
        hits.append((logits.argmax(-1) == y).cpu())
    return torch.cat(logprobs, 1).numpy(), torch.cat(hits, 1).numpy()


def segment_perplexity(model, tokenizer, documents, memory=True, device="cpu", precision="fp32"):
    """Loss of each document read segment by segment; by segment index, by position in the segment, overall.

    `documents`: [(file, text)] (lmlab.evals.perplexity.read_documents). `memory` False reads each
    segment alone (for a model with memory: the comparison; for one without: its only way).
    """
    T = model.config.context_length
    use_memory = bool(memory and getattr(model.config, "memory", 0))
    eot = tokenizer.eot_id
    by_segment, by_position = {}, np.zeros((BUCKETS, 2))
    total = [0.0, 0]
    for ids in tokenizer.encode_batch([text for _, text in documents]):
        row = np.array(ids + [eot], dtype=np.int64)[None]  # as stream training reads a document
        logprobs, _ = _run_segments(model, row, use_memory, device, precision)
        nats = -logprobs[0]
        for index, begin in enumerate(range(0, len(nats), T)):
            part = nats[begin:begin + T]
            slot = by_segment.setdefault(index, [0.0, 0])
            slot[0] += float(part.sum())
            slot[1] += len(part)
            bucket = np.arange(len(part)) * BUCKETS // T
            np.add.at(by_position, (bucket, 0), part)
            np.add.at(by_position, (bucket, 1), 1)
        total[0] += float(nats.sum())
        total[1] += len(nats)
    return {
        "kind": "segments", "memory": use_memory, "model_memory": getattr(model.config, "memory", 0),
        "context_length": T, "documents": len(documents),
        "overall": {"loss": total[0] / max(total[1], 1), "tokens": total[1]},
        "by_segment": [{"segment": i, "loss": s / n, "tokens": n} for i, (s, n) in sorted(by_segment.items())],
        "by_position": [{"positions": f"{b * T // BUCKETS}-{(b + 1) * T // BUCKETS - 1}",
                         "loss": s / n if n else math.nan, "tokens": int(n)} for b, (s, n) in enumerate(by_position)],
    }


def distance_copy_probe(model, tokenizer, distances, length=8, samples=32, seed=0, memory=True, stream=None,
                        pool=None, random_tokens="vocab", device="cpu", precision="fp32"):
    """Copy accuracy when the source lies D tokens before its repetition, the repetition starting a segment.

    Accuracy counts the repetition's tokens after its first (the first cannot be known), argmax == source.
    `random`: source and filler are random tokens drawn from `pool`, the (token ids, probabilities or
    None) of lmlab.evals.probes.random_pool for `random_tokens` (seen / frequency / vocab, as the copy
    probe draws them); None: every non-special token, uniformly. `meaningful` (when a
    token `stream` of real text is given): a window of real text whose span D tokens before the
    repetition is repeated; `first_accuracy` is the accuracy on that span where it first occurs, what
    the model gets from the text alone, without a copy.
    """
    T = model.config.context_length
    use_memory = bool(memory and getattr(model.config, "memory", 0))
    if pool is None:
        specials = {tokenizer.eot_id, getattr(tokenizer, "pad_id", None)}
        pool = np.array([i for i in range(tokenizer.vocab_size) if i not in specials], dtype=np.int64), None
    allowed, p = np.asarray(pool[0], dtype=np.int64), pool[1]
    rows = []
    for distance in distances:
        if distance < length:
            raise ValueError(f"distance {distance} is shorter than the copied sequence ({length} tokens)")
        copy_at = T * max(1, -(-distance // T))  # the repetition starts a segment, the source D tokens before
        source = slice(copy_at - distance, copy_at - distance + length)
        row = {"distance": distance, "within_memory": use_memory and distance <= model.config.memory}
        rng = np.random.default_rng([seed, distance])
        kinds = {"random": rng.choice(allowed, size=(samples, copy_at + length), p=p)}
        if stream is not None and len(stream) > copy_at + length:
            starts = rng.integers(0, len(stream) - copy_at - length, size=samples)
            kinds["meaningful"] = np.stack([stream[s:s + copy_at + length] for s in starts])
        for kind, seq in kinds.items():
            seq[:, copy_at:] = seq[:, source]
            _, hits = _run_segments(model, seq, use_memory, device, precision)
            row[kind] = float(hits[:, copy_at:copy_at + length - 1].mean())  # predictions of repetition tokens 1..
            if kind == "meaningful":
                row["first_accuracy"] = float(hits[:, source.start:source.stop - 1].mean())
        rows.append(row)
    return {"kind": "distance-copy", "memory": use_memory, "model_memory": getattr(model.config, "memory", 0),
            "context_length": T, "length": length, "samples": samples, "seed": seed,
            "random_tokens": random_tokens, "random_pool": len(allowed),
            "chance": 1 / len(allowed) if p is None else float(np.max(p)), "distances": rows}


def segments_table(result):
    """Plain-text tables of a segment_perplexity result: by segment index, then by position in the segment."""
    head = (f"memory {'on' if result['memory'] else 'off'} (model.memory={result['model_memory']}), "
            f"{result['documents']} documents, overall loss {result['overall']['loss']:.4f}")
    by_segment = table(["segment", "loss", "tokens"], [[r["segment"], r["loss"], r["tokens"]] for r in result["by_segment"]])
    by_position = table(["position in segment", "loss", "tokens"],
                        [[r["positions"], r["loss"], r["tokens"]] for r in result["by_position"]])
    return f"{head}\n\n{by_segment}\n\n{by_position}"


def distance_table(result):
    head = (f"memory {'on' if result['memory'] else 'off'} (model.memory={result['model_memory']}), copy of "
            f"{result['length']} tokens, {result['samples']} samples, random tokens "
            f"{result['random_tokens']} ({result['random_pool']} ids), chance {result['chance']:.4f}")
    rows = [[r["distance"], r["random"], r.get("meaningful"), r.get("first_accuracy"),
             "yes" if r["within_memory"] else "no"] for r in result["distances"]]
    return head + "\n" + table(["distance", "random", "meaningful", "meaningful, no copy", "source within memory"],
                                rows)


def plot_segments(result, path, title=""):
    """Loss against segment index (left) and against position within the segment (right), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    rows = result["by_segment"]
    left.plot([r["segment"] for r in rows], [r["loss"] for r in rows], "o-", ms=3)
    left.set_xlabel(f"segment index in the document ({result['context_length']} tokens each)")
    right.plot(range(len(result["by_position"])), [r["loss"] for r in result["by_position"]], "o-", ms=3)
    right.set_xticks(range(len(result["by_position"])), [r["positions"] for r in result["by_position"]], fontsize=7)
    right.set_xlabel("position within the segment")
    for ax in (left, right):
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    memory = "on" if result["memory"] else "off"
    fig.suptitle(title or f"memory {memory}: overall {result['overall']['loss']:.4f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_distance(result, path, title=""):
    """Copy accuracy against the distance D back to the source, random tokens and real text, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["distances"]
    d = [r["distance"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.plot(d, [r["random"] for r in rows], "o-", color="tab:red", label=f"random ({result['random_tokens']})")
    if all("meaningful" in r for r in rows):
        ax.plot(d, [r["meaningful"] for r in rows], "o-", color="tab:blue", label="real text: repeated span")
        ax.plot(d, [r["first_accuracy"] for r in rows], ":", color="tab:blue", label="real text: no copy")
    ax.axhline(result["chance"], color="gray", ls=":", lw=1, label="random chance")
    ax.axvline(result["context_length"], color="black", ls="--", lw=1, label="segment length")
    if result["memory"]:
        ax.axvline(result["model_memory"], color="tab:green", ls="--", lw=1, label="memory M")
    accuracy_axes(ax, "distance D from the source to its copy (tokens)")
    ax.set_title(title or f"copy of {result['length']} tokens, memory {'on' if result['memory'] else 'off'}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
