"""Extra special tokens on every kind of tokenizer: one id each, longest match first, kept through save,
load, the data cache and a Hugging Face export."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import tinystories_documents
from lmlab.cli import main
from lmlab.config import load_config
from lmlab.data.corpora import ensure_data
from lmlab.data.tokenizer import EOT, Tokenizer, train_tokenizer
from lmlab.errors import LmlabError

GPT2 = Path(__file__).parent / "data" / "gpt2"
CHAT = ["<|im_start|>", "<|im_end|>"]
DOUBLE = EOT + EOT


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    path = tmp_path_factory.mktemp("stories") / "stories.txt"
    path.write_text("".join(tinystories_documents("train", 150)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(stories):
    return train_tokenizer([stories], 400, special_tokens=[EOT, *CHAT, DOUBLE])


def check_specials(tok, specials):
    """Each special is one id of its own, in any company, and every text round-trips."""
    ids = {t: tok.hf.token_to_id(t) for t in specials}
    assert None not in ids.values() and len(set(ids.values())) == len(specials)
    for t in specials:
        assert tok.encode(t) == [ids[t]]
        assert tok.encode(f"Hi{t}there") == tok.encode("Hi") + [ids[t]] + tok.encode("there")
    text = f"{CHAT[0]}user\nOnce upon a time{CHAT[1]}{DOUBLE}{EOT}"
    assert tok.decode(tok.encode(text)) == text
    return ids


def test_gpt2_files_take_extra_specials_and_the_longest_wins():
    tok = Tokenizer.load(GPT2, special_tokens=[DOUBLE, *CHAT])
    ids = check_specials(tok, [EOT, DOUBLE, *CHAT])
    assert ids[EOT] == 50256 and sorted(ids.values())[1:] == [50257, 50258, 50259]
    assert tok.encode(DOUBLE) == [ids[DOUBLE]]
    assert tok.encode(EOT * 3) == [ids[DOUBLE], ids[EOT]]
    text = f"Hello, how {DOUBLE} are you?{EOT}"
    assert tok.encode(text) == tok.encode("Hello, how ") + [ids[DOUBLE]] + tok.encode(" are you?") + [ids[EOT]]
    assert Tokenizer.load(GPT2).encode(DOUBLE) == [50256, 50256]  # without it: two ids, as before


def test_registering_a_known_special_again_changes_nothing():
    tok = Tokenizer.load(GPT2, special_tokens=CHAT)
    again = Tokenizer.load(GPT2, special_tokens=CHAT).add_special_tokens([EOT, *CHAT])
    assert (again.vocab_size, again.fingerprint) == (tok.vocab_size, tok.fingerprint)
    assert Tokenizer.load(GPT2, special_tokens=[EOT]).fingerprint == Tokenizer.load(GPT2).fingerprint
    assert tok.fingerprint != Tokenizer.load(GPT2).fingerprint


def test_trained_tokenizer_keeps_specials_whole(trained):
    ids = check_specials(trained, [EOT, *CHAT, DOUBLE])
    assert sorted(ids.values()) == [0, 1, 2, 3]
    learned = trained.hf.get_vocab(with_added_tokens=False)
    assert not any("<|" in token for token in learned if token not in ids)  # never learned into merges


def test_tokenizer_json_and_lmlab_folder_take_extra_specials(tmp_path):
    folder = tmp_path / "tok"
    Tokenizer.load(GPT2).save(folder)
    for source in (folder, folder / "tokenizer.json"):
        check_specials(Tokenizer.load(source, special_tokens=[DOUBLE, *CHAT]), [EOT, DOUBLE, *CHAT])
    pad = Tokenizer.load(folder, special_tokens=["<|pad|>"])
    assert (pad.pad, pad.pad_id) == ("<|pad|>", 50257)


def test_specials_survive_save_and_load(trained, tmp_path):
    trained.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["additional_special_tokens"] == [*CHAT, DOUBLE]
    loaded = Tokenizer.load(tmp_path)
    assert loaded.special_tokens == trained.special_tokens
    assert loaded.fingerprint == trained.fingerprint
    text = f"{CHAT[0]}Tom{CHAT[1]}{EOT * 3}"
    assert loaded.encode(text) == trained.encode(text)


def test_transformers_encodes_each_special_as_one_id(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    gpt2 = Tokenizer.load(GPT2, special_tokens=[DOUBLE, *CHAT])
    for i, tok in enumerate((trained, gpt2)):
        tok.save(tmp_path / str(i))
        hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / str(i)))
        for t in (EOT, DOUBLE, *CHAT):
            assert hf.encode(t, add_special_tokens=False) == tok.encode(t) == [tok.hf.token_to_id(t)]
        text = f"{CHAT[0]}user Once upon a time{CHAT[1]}{EOT * 3} The end."
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
        assert set(CHAT) <= set(hf.all_special_tokens)


def test_cli_trains_with_special_tokens(stories, tmp_path, capsys):
    main(["tokenizer", "train", str(stories), "--vocab-size", "400", "--out", str(tmp_path / "tok"),
          "--special-tokens", ",".join(CHAT), "--special-token", DOUBLE])
    assert "tokenizer with 400 tokens" in capsys.readouterr().out
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.special_tokens == [EOT, *CHAT, DOUBLE]
    check_specials(tok, [EOT, *CHAT, DOUBLE])


def test_bad_special_tokens_are_one_line_errors(tmp_path):
    for bad in ([""], [None], [3]):
        with pytest.raises(LmlabError, match="special tokens must be non-empty strings"):
            Tokenizer.load(GPT2, special_tokens=bad)
    assert Tokenizer.load(GPT2, special_tokens=CHAT[0]).special_tokens == [EOT, CHAT[0]]  # a string is one token


def test_config_key_reaches_the_cache_and_its_key(stories, tmp_path):
    """data.special_tokens trains them into the cached tokenizer, and other specials make another entry."""
    base = ["data.corpus=", f"data.train_files={stories}", "data.tokenizer_vocab_size=400",
            f"data.cache_dir={tmp_path / 'cache'}"]
    plain, _ = ensure_data(load_config(None, base).data, log=lambda *_: None)
    chat, shards = ensure_data(load_config(None, [*base, "data.special_tokens=" + ",".join(CHAT)]).data,
                               log=lambda *_: None)
    assert plain.special_tokens == [EOT]
    assert chat.special_tokens == [EOT, *CHAT]
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 2
    assert Tokenizer.load(shards).fingerprint == chat.fingerprint
    again, _ = ensure_data(load_config(None, [*base, "data.special_tokens=" + ",".join(CHAT)]).data,
                           log=lambda *_: None)
    assert again.fingerprint == chat.fingerprint
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 2


def test_config_key_adds_specials_to_a_given_tokenizer(stories, tmp_path):
    shutil.copytree(GPT2, tmp_path / "gpt2")
    data = load_config(None, ["data.corpus=", f"data.train_files={stories}", f"data.tokenizer={tmp_path / 'gpt2'}",
                              f"data.cache_dir={tmp_path / 'cache'}", "data.special_tokens=" + DOUBLE]).data
    tok, shards = ensure_data(data, log=lambda *_: None)
    assert tok.encode(DOUBLE) == [50257]
    assert Tokenizer.load(shards).encode(DOUBLE) == [50257]


def test_trained_run_exports_its_specials_to_hugging_face(small_corpus, data_cache, tmp_path):
    """lmlab train with data.special_tokens, then lmlab export: transformers reads each special as one id."""
    transformers = pytest.importorskip("transformers")
    from evals_support import train_tiny

    run_dir = train_tiny(small_corpus, data_cache, tmp_path / "runs",
                         ["train.max_steps=2", "data.special_tokens=" + ",".join([*CHAT, DOUBLE])])
    main(["export", str(run_dir), str(tmp_path / "hf")])
    ours = Tokenizer.load(run_dir)
    assert ours.special_tokens == [EOT, *CHAT, DOUBLE]
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for t in (EOT, DOUBLE, *CHAT):
        assert hf.encode(t, add_special_tokens=False) == ours.encode(t) == [ours.hf.token_to_id(t)]
    text = f"{CHAT[0]}Lily{CHAT[1]}{EOT * 3}"
    assert hf(text, add_special_tokens=False)["input_ids"] == Tokenizer.load(tmp_path / "hf").encode(text)


def test_prepare_adds_specials_and_keeps_them_with_the_shards(stories, tmp_path, capsys):
    main(["prepare", str(stories), "--tokenizer", str(GPT2), "--out", str(tmp_path / "shards"), "--workers", "1",
          "--special-tokens", f"{DOUBLE},{CHAT[0]}"])
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text())
    tok = Tokenizer.load(tmp_path / "shards")
    assert meta["vocab_size"] == tok.vocab_size == 50259
    assert meta["tokenizer_fingerprint"] == Tokenizer.load(GPT2, special_tokens=[DOUBLE, CHAT[0]]).fingerprint
    assert tok.encode(DOUBLE + CHAT[0]) == [50257, 50258]
