"""The tokenizer round-trips every string, keeps special tokens whole, and matches GPT-2 on GPT-2's files."""

import json
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.errors import LmlabError
from lmlab.data.tokenizer import EOT, Tokenizer, train_tokenizer

DATA = Path(__file__).parent / "data"
CORPORA = Path(__file__).resolve().parent.parent / "lmlab" / "data" / "corpora"
REAL_TEXTS = ["tinystories_sample.txt", "german.txt", "address.txt"]
TRICKY = [
    "从前，有一只小猫。它很喜欢吃鱼。", "话说天下大势，分久必合，合久必分。",
    "emoji 🙂👍🏽👨‍👩‍👧 and flags 🇩🇪", "e\u0301 a\u0308 \u0915\u093f combining marks",
    "control \x00\x01\x1b[0m\r\n\t\x7f", "  leading and trailing spaces  ", "\n\n\n", "",
    "<|endoftext", "endoftext|>", "<|endoftext|", "<|endoftext|><|endoftext|>", " <|endoftext|> ",
    "<|EndOfText|>", "\ufeffbom", "\U0010ffff\ue000 private use",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real English and Chinese text, documents separated by <|endoftext|> lines."""
    with lzma.open(CORPORA / "tinystories" / "train.txt.xz", "rt", encoding="utf-8") as f:
        stories = f.read(300_000)
    with lzma.open(CORPORA / "zh" / "valid.txt.xz", "rt", encoding="utf-8") as f:
        chapters = f.read(60_000)
    path = tmp_path_factory.mktemp("corpus") / "mixed.txt"
    path.write_text(stories.rsplit(EOT, 1)[0] + EOT + "\n" + chapters.rsplit(EOT, 1)[0] + EOT + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer([corpus], 1000)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_on_any_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([EOT, "<|", "|>", "endoftext", "<", "|", "a", " ", "\n", "你", "🙂", "é"])).map("".join))
def test_round_trip_around_special_token_lookalikes(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids.count(tok.eot_id) == text.count(EOT)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_on_tricky_strings(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_on_real_text(tok, corpus):
    text = corpus.read_text(encoding="utf-8")
    assert tok.decode(tok.encode(text)) == text
    assert [tok.decode(ids) for ids in tok.encode_batch([text[:5000], text[-5000:]])] == [text[:5000], text[-5000:]]


def test_special_token_is_one_id_and_never_merged(tok):
    assert tok.encode(EOT) == [tok.eot_id]
    assert tok.encode(f"a{EOT}b") == tok.encode("a") + [tok.eot_id] + tok.encode("b")
    assert tok.encode(f"The end.{EOT}\nOnce") == tok.encode("The end.") + [tok.eot_id] + tok.encode("\nOnce")
    assert tok.decode([tok.eot_id]) == EOT
    learned = [t for t in tok.hf.get_vocab() if t != EOT and ("endoftext" in t or "<|" in t)]
    assert learned == []  # the separator was never fed to the trainer
    assert tok.special_tokens == [EOT] and tok.pad_id == tok.eot_id


def test_trained_vocab_size_is_as_requested(tok, corpus):
    assert tok.vocab_size == 1000
    assert len(set(tok.encode(corpus.read_text(encoding="utf-8")))) > 500  # merges are actually used
    assert train_tokenizer([corpus], 300).vocab_size == 300


def test_save_and_load_give_the_same_ids_and_fingerprint(tok, corpus, tmp_path):
    tok.save(tmp_path / "tok")
    text = corpus.read_text(encoding="utf-8")[:20_000]
    for source in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        loaded = Tokenizer.load(source)
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.fingerprint == tok.fingerprint
        assert (loaded.vocab_size, loaded.eot_id, loaded.pad_id) == (tok.vocab_size, tok.eot_id, tok.pad_id)
    shutil.copytree(tmp_path / "tok", tmp_path / "elsewhere")  # the fingerprint does not depend on the path
    assert Tokenizer.load(tmp_path / "elsewhere").fingerprint == tok.fingerprint
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == EOT and config["pad_token"] == EOT


def test_different_tokenizers_have_different_fingerprints(tok, corpus):
    assert train_tokenizer([corpus], 320).fingerprint != tok.fingerprint


def test_transformers_loads_the_saved_tokenizer(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = f"Once upon a time, 小猫 🙂{EOT}The end."
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf.eos_token_id == tok.eot_id


# ---------------------------------------------------------------- GPT-2 vocab.json + merges.txt


def gpt2_reference(text, directory):
    """OpenAI's original GPT-2 byte-level BPE (encoder.py), written out independently of `tokenizers`."""
    regex = pytest.importorskip("regex")
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(m.split()) for m in (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
              if m and not m.startswith("#version")]
    ranks = {pair: i for i, pair in enumerate(merges)}
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    byte_char = {b: chr(c) for b, c in zip(printable, chars)}
    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    ids = []
    for word in pattern.findall(text):
        parts = [byte_char[b] for b in word.encode("utf-8")]
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids += [vocab[p] for p in parts]
    return ids


@pytest.fixture(scope="module")
def gpt2():
    return Tokenizer.load(DATA / "gpt2")


@pytest.mark.parametrize("name", REAL_TEXTS)
def test_gpt2_files_match_the_reference_bpe(gpt2, name):
    text = (DATA / name).read_text(encoding="utf-8")
    for part in text.split(EOT):
        assert gpt2.encode(part) == gpt2_reference(part, DATA / "gpt2")
    assert gpt2.decode(gpt2.encode(text)) == text


@pytest.mark.parametrize("name", REAL_TEXTS)
def test_gpt2_files_match_transformers(gpt2, name):
    transformers = pytest.importorskip("transformers")
    reference = transformers.GPT2Tokenizer(str(DATA / "gpt2" / "vocab.json"), str(DATA / "gpt2" / "merges.txt"))
    text = (DATA / name).read_text(encoding="utf-8")
    assert gpt2.encode(text) == reference.encode(text)


def test_gpt2_special_token_and_sizes(gpt2):
    assert (gpt2.vocab_size, gpt2.eot_id, gpt2.pad_id) == (50257, 50256, 50256)
    assert gpt2.encode(f"Hello{EOT} world") == [15496, 50256, 995]


def test_gpt2_merges_with_version_header(gpt2, tmp_path):
    shutil.copy(DATA / "gpt2" / "vocab.json", tmp_path / "vocab.json")
    merges = (DATA / "gpt2" / "merges.txt").read_text(encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    text = (DATA / "address.txt").read_text(encoding="utf-8")
    assert Tokenizer.load(tmp_path).encode(text) == gpt2.encode(text)
    assert Tokenizer.load(tmp_path).fingerprint == gpt2.fingerprint


# ---------------------------------------------------------------- mistakes


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(LmlabError, match="nothing-here.*does not exist"):
        Tokenizer.load(tmp_path / "nothing-here")
    with pytest.raises(LmlabError, match=f"no tokenizer.json .* in {tmp_path}"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LmlabError, match="tokenizer.json is not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_train_errors(tmp_path, corpus):
    with pytest.raises(LmlabError, match="too small"):
        train_tokenizer([corpus], 100)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(LmlabError, match="empty.txt"):
        train_tokenizer([tmp_path / "empty.txt"], 300)
    with pytest.raises(LmlabError, match="missing.txt does not exist"):
        train_tokenizer([tmp_path / "missing.txt"], 300)
    (tmp_path / "bad.txt").write_bytes(b"fine\nnot \xff fine\n")
    with pytest.raises(LmlabError, match=r"bad.txt is not valid UTF-8 at line 2 \(byte 9\)"):
        train_tokenizer([tmp_path / "bad.txt"], 300)


def test_training_prints_no_progress_when_output_is_not_a_terminal(corpus, tmp_path):
    """Progress bars are for a terminal: piped or redirected, `tokenizer train` prints its one line only."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-m", "lmlab", "tokenizer", "train", str(corpus), "--vocab-size", "300",
                           "--out", str(tmp_path / "tok")], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.splitlines() == [done.stdout.strip()]
    assert done.stdout.startswith("tokenizer with 300 tokens")
    assert done.stderr == ""
