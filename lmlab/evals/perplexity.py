"""Perplexity and bits per byte on text files, JSONL files or prepared shards.

Design choices:
- Bits per byte = total nats / ln 2 / total UTF-8 bytes of the text. Unlike
  loss per token it does not depend on the tokenizer, so models with different
  vocabularies compare. The end-of-text token is predicted (and its nats
  count) but stands for 0 bytes, as in meta.json's `bytes`.
- Bytes of target tokens come from `lmlab.evals.bpb.token_byte_lengths`, the one
  definition shared with the training loop's val_bpb (exact for byte-level
  BPE; special tokens count 0). For text files the bytes are the documents'
  own UTF-8 bytes, which is the same number for byte-level BPE.
- A text file is read as documents (lmlab.data.documents.iter_documents: .txt split on
  <|endoftext|>, .jsonl one object per line, .gz / .xz fine). Each document is
  scored on its own, as the stream "<|endoftext|> document <|endoftext|>":
  every token of the document and the closing end-of-text are targets, so the
  first token is predicted the way training predicts it after a separator.
  Figures come per document, per file and overall (token-weighted).
- Prepared shards are scored as the token stream training reads: one
  sequence per shard (training windows never cross a shard end), every token
  after the first a target.
- Longer sequences than the context are scored in sliding windows
  (`lmlab.evals.scoring`); stride = context_length is plain chunked loss.
"""

import math
from pathlib import Path

import numpy as np

from lmlab.evals.bpb import token_byte_lengths
from lmlab.errors import LmlabError
from lmlab.evals.scoring import score


def figures(nats, tokens, nbytes, hits=None):
    """loss (nats/token), perplexity, bits per byte (and accuracy) from totals."""
    loss = nats / tokens if tokens else math.nan
    out = {"tokens": int(tokens), "bytes": int(nbytes), "loss": loss,
           "perplexity": math.exp(min(loss, 700)) if tokens else math.nan,
           "bits_per_byte": nats / math.log(2) / nbytes if nbytes else math.nan}
    if hits is not None:
        out["accuracy"] = hits / tokens if tokens else math.nan
    return out


def read_documents(files, text_key="text", limit=0):
    """[(file, text)] of every document in `files`; `limit` > 0 keeps the first `limit` of each file."""
    from lmlab.data.documents import iter_documents

    documents = []
    for file in files:
        count, pieces = 0, []
        for text, ends in iter_documents(file, text_key=text_key):
            pieces.append(text)
            if ends:
                documents.append((str(file), "".join(pieces)))
                count, pieces = count + 1, []
                if limit and count >= limit:
                    break
        if count == 0:
            raise LmlabError(f"no documents in {file}: the file is empty or holds only whitespace")
    return documents


def text_perplexity(model, tokenizer, files, text_key="text", stride=None, limit=0, device=None, precision="fp32"):
    """Loss, perplexity and bits per byte of each document of `files`, per file and overall."""
    documents = read_documents(files, text_key=text_key, limit=limit)
    encoded = tokenizer.encode_batch([text for _, text in documents])
    eot = tokenizer.eot_id
    scored = score(model, [([eot] + ids + [eot], 1) for ids in encoded], stride=stride, device=device,
                   precision=precision)
    per_document, per_file = [], {}
    for (file, text), s in zip(documents, scored):
        nbytes = len(text.encode("utf-8"))
        nats, hits = -float(s.logprobs.sum()), int(s.correct.sum())
        totals = per_file.setdefault(file, [0.0, 0, 0, 0, 0])
        per_document.append({"file": file, "index": totals[4], **figures(nats, len(s.logprobs), nbytes, hits)})
        for k, v in enumerate((nats, len(s.logprobs), nbytes, hits, 1)):
            totals[k] += v
    overall = [sum(t[k] for t in per_file.values()) for k in range(5)]
    return {
        "kind": "perplexity", "source": "text", "stride": stride or model.config.context_length,
        "context_length": model.config.context_length,
        "overall": {**figures(*overall[:4]), "documents": overall[4]},
        "files": [{"file": file, **figures(*t[:4]), "documents": t[4]} for file, t in per_file.items()],
        "documents": per_document,
    }


def shard_perplexity(model, tokenizer, shards_dir, split="val", stride=None, limit=0, device=None, precision="fp32"):
    """Loss, perplexity and bits per byte of a prepared split, scored as the stream training reads."""
    from lmlab.data.shards import check_tokenizer, load_meta

    meta = load_meta(shards_dir)
    check_tokenizer(meta, tokenizer)
    if split not in meta["splits"]:
        raise LmlabError(f"no split {split!r} in {shards_dir}; splits: {', '.join(meta['splits'])}")
    streams, budget = [], limit or math.inf
    for name in meta["splits"][split]["shards"]:
        shard = np.load(Path(meta["dir"]) / name, mmap_mode="r")
        take = int(min(len(shard), budget))
        if take >= 2:
            streams.append(np.asarray(shard[:take], dtype=np.int64))
        budget -= take
        if budget <= 0:
            break
    if not streams:
        raise LmlabError(f"the {split} split of {shards_dir} has fewer than 2 tokens")
    lengths = token_byte_lengths(tokenizer)
    scored = score(model, [(ids, 1) for ids in streams], stride=stride, device=device, precision=precision)
    nats = -sum(float(s.logprobs.sum()) for s in scored)
    tokens = sum(len(s.logprobs) for s in scored)
    nbytes = sum(int(lengths[ids[1:]].sum()) for ids in streams)
    hits = sum(int(s.correct.sum()) for s in scored)
    return {
        "kind": "perplexity", "source": "shards", "shards": str(shards_dir), "split": split,
        "stride": stride or model.config.context_length, "context_length": model.config.context_length,
        "overall": figures(nats, tokens, nbytes, hits),
    }


def batches_perplexity(model, tokenizer, batches, device=None, precision="fp32"):
    """Loss and bits per byte over (x, y) micro-batches, e.g. the training loop's fixed validation subset.

    Targets of -100 (padding) are skipped, as in training.
    """
    lengths = token_byte_lengths(tokenizer)
    nats = tokens = nbytes = hits = 0
    for x, y in batches:
        sequences, keep = [], []
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            valid = row_y != -100
            ids = np.concatenate([row_x[:1], np.where(valid, row_y, 0)])
            sequences.append((ids, 1))
            keep.append(valid)
        for s, valid, row_y in zip(score(model, sequences, device=device, precision=precision), keep, y.numpy()):
            nats -= float(s.logprobs[valid].sum())
            hits += int(s.correct[valid].sum())
            tokens += int(valid.sum())
            nbytes += int(lengths[row_y[valid]].sum())
    return {"kind": "perplexity", "source": "validation subset", "overall": figures(nats, tokens, nbytes, hits)}
