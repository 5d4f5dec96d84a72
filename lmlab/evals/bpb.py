"""Bits per byte of the validation text: a loss that compares across tokenizers.

    val_bpb = val_loss (nats / token) x tokens / (ln 2 x bytes)

over exactly the evaluated targets. Design choices:
- Bytes are counted without decoding: a table gives each token id the length
  of the UTF-8 bytes it stands for, and the evaluated targets are looked up in
  it. For byte-level BPE that length is exact even for a token that holds part
  of a character (decoding one token alone would give a replacement char).
- Special tokens (the end-of-text separator, padding) stand for no text and
  count 0 bytes, as in meta.json's per-split `bytes`; padding targets are
  ignored like in the loss.
- The evaluated subset is fixed, so its tokens and bytes are counted once per
  run; val_loss is a token-weighted mean, so bpb does not depend on how the
  subset is cut into batches.
"""

import json
import math

import numpy as np
from tokenizers import pre_tokenizers

IGNORE = -100


def _is_byte_level(hf):
    decoder = json.loads(hf.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(part.get("type") == "ByteLevel" for part in parts)


def token_byte_lengths(tokenizer):
    """Array (vocab_size,): the number of UTF-8 bytes each token id decodes to; special tokens 0.

    Exact for byte-level BPE (every lmlab tokenizer, GPT-2 style files): each character of a
    byte-level token string stands for one byte. Other tokenizers fall back to decoding each
    token alone, which is exact for whole characters only.
    """
    hf = tokenizer.hf
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    byte_chars = set(pre_tokenizers.ByteLevel.alphabet()) if _is_byte_level(hf) else set()
    for token, i in hf.get_vocab(with_added_tokens=False).items():
        if byte_chars and set(token) <= byte_chars:
            lengths[i] = len(token)
        else:
            lengths[i] = len(hf.decode([i], skip_special_tokens=False).encode("utf-8"))
    for i, added in hf.get_added_tokens_decoder().items():
        lengths[i] = 0 if added.special else len(added.content.encode("utf-8"))
    return lengths


def count_targets(batches, lengths):
    """(tokens, bytes) of the targets in `batches` (an iterable of (x, y)), padding ignored."""
    tokens = nbytes = 0
    for _, y in batches:
        targets = y[y != IGNORE].numpy()
        tokens += len(targets)
        nbytes += int(lengths[targets].sum())
    return tokens, nbytes


def bits_per_byte(loss, tokens, nbytes):
    """Mean loss in nats per token over `tokens` targets that spell `nbytes` bytes -> bits per byte."""
    if not nbytes:
        return None
    return loss * tokens / (math.log(2) * nbytes)
