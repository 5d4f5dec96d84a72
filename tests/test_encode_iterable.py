"""lmlab.load_tokenizer and Tokenizer.encode_iterable: the ids of one encode, streamed in flat memory."""

import io
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lmlab
from lmlab.data import textstream as stream
from lmlab.data.tokenizer import EOT, train_tokenizer
from lmlab.errors import LmlabError

ROOT = Path(__file__).resolve().parent.parent
GPT2 = ROOT / "tests" / "data" / "gpt2"
CORPORA = ROOT / "lmlab" / "data" / "corpora"
DOUBLE = EOT + EOT
SPECIALS = [DOUBLE, "<|im_start|>", "<|im_end|>", "a b\n c"]  # the last one holds a space and a newline


def corpus_text(chars, chinese_first=False):
    """Real English stories and Chinese chapters, documents separated by <|endoftext|> lines."""
    with lzma.open(CORPORA / "tinystories" / "train.txt.xz", "rt", encoding="utf-8") as f:
        stories = f.read(chars)
    with lzma.open(CORPORA / "zh" / "valid.txt.xz", "rt", encoding="utf-8") as f:
        chapters = f.read(chars // 4)
    return chapters + stories if chinese_first else stories + chapters


@pytest.fixture(scope="module")
def gpt2():
    return lmlab.load_tokenizer(GPT2, special_tokens=SPECIALS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(corpus_text(200_000), encoding="utf-8")
    return train_tokenizer([path], 600, special_tokens=[EOT, *SPECIALS])


def test_load_tokenizer_reads_every_kind_lmlab_reads(gpt2, trained, tmp_path):
    trained.save(tmp_path / "own")
    (tmp_path / "own" / "tokenizer.json").rename(tmp_path / "elsewhere.json")
    text = f"<|im_start|>Once upon a time, 小猫 🙂{DOUBLE}{EOT}"
    assert lmlab.load_tokenizer(tmp_path / "elsewhere.json").encode(text) == trained.encode(text)
    gpt2.save(tmp_path / "gpt2-folder")
    for source in (GPT2, GPT2 / "vocab.json", tmp_path / "gpt2-folder", tmp_path / "gpt2-folder" / "tokenizer.json"):
        tok = lmlab.load_tokenizer(source, special_tokens=SPECIALS)
        assert tok.encode(text) == gpt2.encode(text)
        assert tok.decode(tok.encode(text)) == text
    assert lmlab.load_tokenizer(GPT2).encode(DOUBLE) == [50256, 50256]


@pytest.mark.parametrize("chunk_chars", [700, stream.CHUNK_CHARS])
@pytest.mark.parametrize("which", ["gpt2", "trained"])
def test_ids_equal_one_encode_of_a_file(which, chunk_chars, request, tmp_path):
    tok = request.getfixturevalue(which)
    text = corpus_text(250_000).replace("\n\n", f"\n<|im_start|>a b\n c{DOUBLE}\n\n", 50)
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    with open(path, encoding="utf-8") as f:
        ids = list(tok.encode_iterable(f) if chunk_chars == stream.CHUNK_CHARS
                   else stream.encode_iterable(tok, f, chunk_chars=chunk_chars))
    assert ids == tok.encode(text)
    assert tok.decode(ids) == text


def test_specials_in_the_stream_are_matched_as_specials_across_pieces(gpt2):
    """tiktoken-style: special tokens in the text are matched (longest first), even when split between pieces."""
    pieces = ["Hi <|endof", "text|><|endoftext|> there<|im_", "start|>", "a b", "\n c", EOT * 3]
    ids = list(stream.encode_iterable(gpt2, pieces, chunk_chars=1))
    double, eot = gpt2.hf.token_to_id(DOUBLE), gpt2.eot_id
    assert ids == gpt2.encode("Hi ") + [double] + gpt2.encode(" there") + [
        gpt2.hf.token_to_id("<|im_start|>"), gpt2.hf.token_to_id("a b\n c"), double, eot]
    assert ids == gpt2.encode("".join(pieces))


def test_bytes_are_a_one_line_error(gpt2, tmp_path):
    (tmp_path / "t.txt").write_text("Once upon a time\n")
    with open(tmp_path / "t.txt", "rb") as f, pytest.raises(LmlabError, match="open the file in text mode"):
        list(gpt2.encode_iterable(f))


ALPHABET = [" ", "  ", "\n", "\n\n", "\r\n", "\t", "Tom", " ran", "'s", ".", "!", "42", "é", "小猫", "🙂", "\u00a0",
            "\u3000", "\x1c", EOT, DOUBLE, "<|im_start|>", "a b\n c", "a", "b", "c", "<|"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(ALPHABET), max_size=80), st.integers(1, 12), st.integers(1, 40), st.booleans())
def test_any_text_and_any_pieces_give_the_ids_of_one_encode(gpt2, parts, piece, chunk_chars, check):
    """The cut rule alone (check off) and with its check keep the ids of one encode, for any pieces."""
    text = "".join(parts)
    pieces = [text[i:i + piece] for i in range(0, len(text), piece)]
    old = stream.CHECK_CHARS
    stream.CHECK_CHARS = 8 if check else 0
    try:
        assert list(stream.encode_iterable(gpt2, pieces, chunk_chars=chunk_chars)) == gpt2.encode(text)
    finally:
        stream.CHECK_CHARS = old


def test_a_tokenizer_that_prefixes_every_call_still_gets_the_ids_of_one_encode(trained, tmp_path):
    """A Prepend normalizer adds a prefix at each encode, so no cut is safe: the check refuses every one."""
    from tokenizers import normalizers

    trained.save(tmp_path)
    tok = lmlab.load_tokenizer(tmp_path)
    tok.hf.normalizer = normalizers.Prepend("Ġ")
    text = corpus_text(20_000)
    assert list(stream.encode_iterable(tok, io.StringIO(text), chunk_chars=500)) == tok.encode(text)
    old = stream.CHECK_CHARS
    stream.CHECK_CHARS = 0  # the rule alone would cut, and get other ids
    try:
        assert list(stream.encode_iterable(tok, io.StringIO(text), chunk_chars=500)) != tok.encode(text)
    finally:
        stream.CHECK_CHARS = old


PEAK = """
import json, resource, sys
import lmlab
tok = lmlab.load_tokenizer(sys.argv[1])
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
with open(sys.argv[2], encoding="utf-8") as f:  # warm up: the first chunks size the encoder's buffers
    for _, _ in zip(tok.encode_iterable(f), range(100_000)):
        pass
before, ids = peak(), 0
with open(sys.argv[2], encoding="utf-8") as f:
    for _ in tok.encode_iterable(f):
        ids += 1
print(json.dumps({"growth": peak() - before, "ids": ids}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_memory_stays_flat_as_the_file_grows(tmp_path):
    """Peak RSS growth while streaming 4 and 24 million characters of text: the same few MB, not the file's size."""
    text = corpus_text(10**7, chinese_first=True)  # both files hold both (Chinese makes ~2.5 ids a character)
    growth = {}
    for mb in (4, 24):
        path = tmp_path / f"{mb}mb.txt"
        path.write_text((text * (1 + mb * 2**20 // len(text)))[: mb * 2**20], encoding="utf-8")
        done = subprocess.run([sys.executable, "-c", PEAK, str(GPT2), str(path)], capture_output=True, text=True,
                              check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        growth[mb] = json.loads(done.stdout)["growth"]
    # Encoding the 24 MB file whole would hold its text (24+ MB) and ~6M ids; streaming holds a chunk.
    assert growth[24] < growth[4] + 4 * 2**20, growth
    assert growth[24] < 16 * 2**20, growth
