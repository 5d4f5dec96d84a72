"""Sampling text from a model: greedy, temperature, top-k, top-p, stop tokens, streaming.

Design choices:
- One sequence at a time. The prompt is prefilled into a KV cache in one
  forward pass, then each new token costs one single-position forward.
- `use_cache=False` is the reference path: recompute the whole window every
  step. The two paths give the same tokens (tests check it under greedy).
- The window is at most `context_length` tokens: a longer prompt keeps its last
  `context_length` tokens. Once the sequence outgrows the window, the cache
  can hold no more positions, so generation goes on without it, sliding the
  window one token per step exactly like the reference path. Long generations
  therefore never stop early; they only get slower past the window.
- Sampling is deterministic for a given seed: every draw comes from one
  `torch.Generator` seeded once per call (no seed = torch's global RNG).
- Streaming decodes the whole continuation after every token and emits the new
  part of the text only when it does not end in U+FFFD, the mark of a UTF-8
  character whose remaining bytes have not been generated yet. The pieces
  therefore concatenate to the returned text (byte-level BPE decoding is
  prefix-stable), and a Chinese character or an emoji is never cut in half.
"""

import math
import operator

import torch

from lmlab.errors import LmlabError


def check_sampling(max_new_tokens=0, temperature=1.0, top_k=0, top_p=1.0):
    """Refuse sampling settings that cannot work, before anything is printed or computed.

    An LmlabError (one line from the CLI), not a traceback from deep inside torch:
    a negative temperature, a top-p outside (0, 1] or a negative top-k is a typo,
    and NaN is refused too (every comparison with it is false).
    """
    if _whole(max_new_tokens) is None or max_new_tokens < 0:
        raise LmlabError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
    if not 0 <= _number(temperature) < math.inf:
        raise LmlabError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if _whole(top_k) is None or top_k < 0:
        raise LmlabError(f"top_k must be a whole number >= 0 (0 = off), got {top_k!r}")
    if not 0 < _number(top_p) <= 1:
        raise LmlabError(f"top_p must lie in (0, 1] (1 = off), got {top_p!r}")


def _whole(value):
    """`value` as an int (numpy integers too), or None for anything else (floats, bools, strings)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _number(value):
    """`value` as a float, NaN when it is not a number (so every range check fails)."""
    try:
        return math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return math.nan


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Next token ids (B,) from logits (B, vocab).

    temperature 0 is greedy (argmax). Otherwise top-k (0 = off) keeps the k most
    likely tokens, then top-p keeps the smallest set of the most likely tokens
    whose probabilities add up to at least top_p (always at least one).
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # A token is kept when the tokens ranked above it have not yet reached
        # top_p; the most likely token always is (nothing ranks above it).
        mass_above = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_above >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(
    model,
    prompt_ids,
    max_new_tokens,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    stop_ids=(),
    seed=None,
    use_cache=True,
    on_token=None,
):
    """Sample up to max_new_tokens after prompt_ids; return the new ids (a stop token ends it and is left out).

    on_token(id) is called with each new id as it is sampled, for streaming.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: decode shapes would recompile it
    device = next(model.parameters()).device
    ids = [int(i) for i in (prompt_ids.tolist() if torch.is_tensor(prompt_ids) else prompt_ids)]
    if not ids:
        raise LmlabError("the prompt is empty; give at least one token (e.g. the end-of-text token)")
    context_length = model.config.context_length
    ids = ids[-context_length:]
    stop_ids = set(int(i) for i in stop_ids)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    was_training = model.training
    model.eval()
    new_ids = []
    try:
        # Room for the whole sequence, up to the window: a model imported with a
        # long context (e.g. 40960 positions) must not preallocate all of it.
        cache_len = min(context_length, len(ids) + max_new_tokens)
        cache = model.new_kv_cache(1, cache_len) if use_cache else None
        if cache is not None:
            logits = model(torch.tensor([ids], device=device), kv_cache=cache)
        for step in range(max_new_tokens):
            if cache is None:
                window = torch.tensor([ids[-context_length:]], device=device)
                logits = model(window)
            next_id = int(sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)[0])
            if next_id in stop_ids:
                break
            new_ids.append(next_id)
            ids.append(next_id)
            if on_token is not None:
                on_token(next_id)
            if step == max_new_tokens - 1:
                break
            if cache is not None:
                if cache.pos < cache.max_len:
                    logits = model(torch.tensor([[next_id]], device=device), kv_cache=cache)
                else:
                    cache = None  # the window is full: slide it from now on, as the reference path does
    finally:
        model.train(was_training)
    return new_ids


def generate(model, tokenizer, prompt, max_new_tokens=100, temperature=0.8, top_k=50, top_p=1.0, seed=None, stream=None):
    """The text the model writes after `prompt`, up to max_new_tokens or the end-of-text token.

    stream(piece) receives the text as it becomes printable; the pieces add up to
    the returned string. An empty prompt starts from the end-of-text token, i.e.
    at the start of a new document. Bad sampling values (a negative temperature
    or top-k or max_new_tokens, a top-p outside (0, 1]) are an LmlabError.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)  # before the prompt is even encoded
    prompt_ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    new_ids = []
    emitted_len = 0  # length of the text handed to stream so far

    def on_token(token_id):
        nonlocal emitted_len
        new_ids.append(token_id)
        if stream is None:
            return
        text = tokenizer.decode(new_ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its remaining bytes
            return
        piece = text[emitted_len:]
        if piece:
            stream(piece)
            emitted_len = len(text)

    generate_ids(
        model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_ids=(tokenizer.eot_id,), seed=seed, on_token=on_token,
    )
    text = tokenizer.decode(new_ids)
    if stream is not None and len(text) > emitted_len:
        stream(text[emitted_len:])  # whatever was held back, e.g. a character cut off by max_new_tokens
    return text
