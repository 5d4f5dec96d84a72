"""Encode a text stream (a file larger than memory) into ids, in bounded memory, with the ids of one encode.

Design choices:
- Lines are gathered into a buffer of about `chunk_chars` characters, which is
  encoded up to its last *safe cut* and carried over after it. Memory is then
  one chunk and its ids, plus the longest line, whatever the size of the file.
- A safe cut goes between a non-space character and a following space or
  newline. Byte-level BPE pre-tokenizes with GPT-2's regex, none of whose
  pieces runs from a non-space character into whitespace, and BPE never merges
  across pieces; so encoding the two sides apart gives the ids of encoding
  them together. No cut goes through any added token (an added token may hold
  spaces), so special tokens are matched as in one encode: leftmost, longest.
- Other tokenizer.json files may pre-tokenize or normalize otherwise (a
  Llama-3 style regex keeps ".\n" together; a Prepend normalizer adds "▁" at
  the start of every call). So each cut is checked on the text around it
  (encoded whole and in two parts, which must agree) and a cut that fails is
  not taken. Where no cut passes, the buffer grows until one does.
"""

import re

from lmlab.errors import LmlabError

CHUNK_CHARS = 1 << 14  # characters encoded at a time: 4k-40k ids (English-Chinese with GPT-2), a few MB in the encoder
CHECK_CHARS = 256  # text on each side of a cut encoded to check it
TRIES = 32  # candidate cuts checked on each side of the chunk's end before the buffer grows instead
_CUT = re.compile(r"\S(?=[ \n])")  # a match ends at a candidate cut


def encode_iterable(tokenizer, lines, chunk_chars=CHUNK_CHARS):
    """Yield the ids of the text that `lines` (strings, e.g. an open file) join to, one id at a time.

    The ids are those of `tokenizer.encode` on the whole text; memory stays bounded by
    `chunk_chars` (and the longest line), not by the size of the text.
    """
    added = [t.content for t in tokenizer.hf.get_added_tokens_decoder().values()]
    buffer, size, limit = [], 0, chunk_chars
    for line in lines:
        if not isinstance(line, str):
            raise LmlabError(f"encode_iterable takes text, got {type(line).__name__}; "
                             "open the file in text mode: open(path, encoding='utf-8')")
        buffer.append(line)
        size += len(line)
        if size < limit:
            continue
        text, start, cut = "".join(buffer), 0, 0
        while cut is not None and len(text) - start >= chunk_chars:
            cut = _find_cut(tokenizer, text, start, start + chunk_chars, added)
            if cut is not None:
                yield from tokenizer.encode(text[start:cut])
                start = cut
        rest = text[start:]
        buffer, size = [rest], len(rest)
        limit = chunk_chars if cut is not None else 2 * size  # no cut: look again at twice the text, not every line
    text = "".join(buffer)
    if text:
        yield from tokenizer.encode(text)


def _find_cut(tokenizer, text, lo, hi, added):
    """One of the last safe cuts in (lo, hi], else one of the first after hi; None when none is found.

    A cut keeps CHECK_CHARS (and the longest added token) of text after it, so that what
    follows the cut, which decides whether it is safe, is in the buffer and not still to come.
    """
    end = len(text) - max([CHECK_CHARS, *map(len, added)])
    hi = min(hi, end)
    if hi <= lo:
        return None
    before = list(_CUT.finditer(text, lo, hi + 1))[::-1]
    after = _CUT.finditer(text, hi, end + 1)
    for candidates in (before, after):
        for match, _ in zip(candidates, range(TRIES)):
            if _safe(tokenizer, text, match.end(), added):
                return match.end()
    return None


def _safe(tokenizer, text, cut, added):
    """No added token runs across `cut`, and the text around it encodes the same whole or cut there."""
    for token in added:
        if text.find(token, max(0, cut - len(token) + 1), cut + len(token) - 1) != -1:
            return False
    left, right = text[max(0, cut - CHECK_CHARS):cut], text[cut:cut + CHECK_CHARS]
    return tokenizer.encode(left + right) == tokenizer.encode(left) + tokenizer.encode(right)
