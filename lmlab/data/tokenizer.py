"""Byte-level BPE tokenizer: a thin wrapper around HF `tokenizers`.

Design choices:
- Byte-level BPE (GPT-2 style) with all 256 bytes in the initial alphabet and
  no normalizer, so every string round-trips exactly: decode(encode(s)) == s.
- Special tokens (default just <|endoftext|>) are added tokens: never split,
  never merged with their neighbours; text containing one encodes to its id.
  Any tokenizer takes extra ones (`special_tokens=` on load and train). Where
  they overlap the longest wins (HF's added-token matcher is leftmost-longest):
  with <|endoftext|><|endoftext|> registered, that text is one id, not two.
- The tokenizer is saved as a standard `tokenizer.json` (+ a small HF-style
  `tokenizer_config.json`), so `transformers` can load it as it is.
- `fingerprint` hashes the canonical JSON (not the file path), so shards can
  check that they were made with the tokenizer a model is trained with.
- The trainer reads documents through `lmlab.data.documents.iter_documents`, so the
  separator between documents is never learned into merges.
- `ParallelEncoder` spreads encoding over N processes, one core each (the
  Rust batch encoder's own threads gave no speed-up on the 2-core test
  machine). Each text is encoded on its own, so the ids do not depend on the
  number of workers, and results come back in submission order.
"""

import hashlib
import json
import re
import sys
from pathlib import Path


from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmlab import atomic
from lmlab.data.documents import EOT, check_file, iter_documents
from lmlab.data.textstream import encode_iterable
from lmlab.errors import LmlabError

PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]")  # special tokens taken as the pad token when present


def check_special_tokens(tokens):
    """A list of special tokens, duplicates dropped; one string is one token (not its characters)."""
    tokens = [tokens] if isinstance(tokens, str) else list(tokens or ())
    for token in tokens:
        if not isinstance(token, str) or not token:
            raise LmlabError(f"special tokens must be non-empty strings, got {token!r}")
    return list(dict.fromkeys(tokens))


def split_tokens(text):
    """"<|im_start|>,<|im_end|>" -> the two tokens (a comma-separated flag value; empty parts dropped)."""
    return [t for t in text.split(",") if t]


def _token_text(value):
    """tokenizer_config.json stores a token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """Encode / decode text; knows its end-of-text and pad ids and its fingerprint."""

    def __init__(self, hf, eot=EOT, pad=None):
        self.hf = hf
        hf.no_truncation()  # ids must never depend on padding or truncation settings
        hf.no_padding()
        self.eot = eot
        self.eot_id = hf.token_to_id(eot)
        if self.eot_id is None:
            raise LmlabError(f"tokenizer has no end-of-text token {eot!r}; train one with lmlab tokenizer train")
        if pad is None:
            pad = next((t for t in self.special_tokens if t in PAD_NAMES), None)
        self.pad = pad if pad is not None and hf.token_to_id(pad) is not None else eot
        self.pad_id = hf.token_to_id(self.pad)

    @property
    def vocab_size(self):
        """Number of ids, special tokens included (the embedding needs this many rows)."""
        return max(self.hf.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def special_tokens(self):
        return [t.content for t in self.hf.get_added_tokens_decoder().values() if t.special]

    @property
    def fingerprint(self):
        """Short hash of the canonical tokenizer.json: same vocab, merges and specials -> same hash."""
        spec = json.loads(self.hf.to_str())
        spec.pop("version", None)
        model = spec.get("model") or {}
        if isinstance(model.get("merges"), list):  # older tokenizers write "a b", newer ["a", "b"]
            model["merges"] = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
        canonical = json.dumps(spec, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]

    def add_special_tokens(self, tokens):
        """Register extra special tokens (new ids at the end of the vocabulary); known ones are kept as they are.

        A pad-named token (PAD_NAMES) becomes the pad token when there was none, as it would
        have if the tokenizer had been trained with it.
        """
        new = [t for t in check_special_tokens(tokens) if t not in self.special_tokens]
        if new:
            self.hf.add_special_tokens(new)
        if self.pad == self.eot:
            self.pad = next((t for t in new if t in PAD_NAMES), self.pad)
            self.pad_id = self.hf.token_to_id(self.pad)
        return self

    def encode(self, text):
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        """Encode many texts at once on all cores (the Rust batch encoder)."""
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)  # _fast skips offsets
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def encode_iterable(self, lines):
        """Yield the ids of the text `lines` join to (an open file, say), in bounded memory; see stream.py."""
        return encode_iterable(self, lines)

    def decode(self, ids):
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def save(self, out_dir):
        """Write tokenizer.json and tokenizer_config.json into out_dir, atomically."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(out_dir / "tokenizer.json") as tmp:
            self.hf.save(str(tmp))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.eot, "eos_token": self.eot, "pad_token": self.pad,
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        }
        extra = [t for t in self.special_tokens if t not in (self.eot, self.pad)]
        if extra:  # transformers lists them in all_special_tokens (tokenizer.json already keeps them whole)
            config["additional_special_tokens"] = extra
        atomic.write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path, special_tokens=()):
        """Load from a directory with tokenizer.json, a tokenizer.json file, or a GPT-2 vocab.json + merges.txt
        directory, registering `special_tokens` on top of those it has."""
        special_tokens = check_special_tokens(special_tokens)
        return cls._load(path).add_special_tokens(special_tokens)

    @classmethod
    def _load(cls, path):
        path = Path(path).expanduser()
        if not path.exists():
            raise LmlabError(f"tokenizer {path} does not exist; give a directory with tokenizer.json or train one with lmlab tokenizer train")
        if path.is_file() and path.name in ("vocab.json", "merges.txt"):
            path = path.parent
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                file = path / "tokenizer.json"
            elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                return cls._load_gpt2(path)
            else:
                raise LmlabError(f"no tokenizer.json (or vocab.json + merges.txt) in {path}; train one with lmlab tokenizer train")
        else:
            file = path
        try:
            hf = HFTokenizer.from_str(file.read_text(encoding="utf-8"))
        except Exception as e:  # tokenizers raises plain Exception on bad JSON
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LmlabError(f"{file} is not a valid tokenizer.json ({reason})") from None
        eot, pad = EOT, None
        config_file = file.parent / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise LmlabError(f"{config_file} is not valid JSON; fix or delete it") from None
            eot = _token_text(config.get("eos_token")) or EOT
            pad = _token_text(config.get("pad_token"))
        if hf.token_to_id(eot) is None:
            raise LmlabError(f"tokenizer {file} has no end-of-text token {eot!r}; add it as a special token")
        return cls(hf, eot=eot, pad=pad)

    @classmethod
    def _load_gpt2(cls, directory):
        """GPT-2 style files: byte-level BPE with the GPT-2 split regex; <|endoftext|> kept whole."""
        vocab, merges = directory / "vocab.json", directory / "merges.txt"
        try:
            bpe = models.BPE.from_file(str(vocab), str(merges))  # skips a '#version' header when present
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LmlabError(f"cannot read GPT-2 tokenizer files {vocab} / {merges} ({reason})") from None
        hf = _byte_level(bpe)
        hf.add_special_tokens([EOT])
        return cls(hf)


def load_tokenizer(path, special_tokens=()):
    """Any tokenizer lmlab reads (its own folder or a run's, a tokenizer.json, a vocab.json + merges.txt folder),
    with `special_tokens` registered on top of its own: .encode, .decode, .encode_iterable, .special_tokens."""
    return Tokenizer.load(path, special_tokens=special_tokens)


def _byte_level(bpe):
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    return hf


def _on_terminal():
    return sys.stdout.isatty() and sys.stderr.isatty()


def train_tokenizer(files, vocab_size, special_tokens=(EOT,), text_key="text", show_progress=None):
    """Train a byte-level BPE tokenizer on the documents of `files` (text / .jsonl / .parquet, .gz/.xz ok).

    show_progress=None draws the trainer's progress bars only when stdout and stderr are both
    a terminal: piped or redirected, the Rust bars leave nothing but blank lines in the output.
    """

    files = [files] if isinstance(files, (str, Path)) else list(files)
    special_tokens = check_special_tokens(special_tokens)
    if EOT not in special_tokens:
        special_tokens.insert(0, EOT)
    if not files:
        raise LmlabError("no files to train the tokenizer on")
    for file in files:
        check_file(file)
    smallest = 256 + len(special_tokens)
    if vocab_size < smallest:
        raise LmlabError(f"tokenizer vocab size {vocab_size} is too small: the 256 bytes and "
                         f"{len(special_tokens)} special tokens alone need {smallest}")
    longest_first = sorted(special_tokens, key=len, reverse=True)  # as the encoder matches them
    specials = re.compile("|".join(re.escape(t) for t in longest_first))
    count = 0

    def texts():
        nonlocal count
        for file in files:
            for text, _ in iter_documents(file, text_key=text_key):
                count += 1
                yield from (part for part in specials.split(text) if part)  # specials are never learned

    hf = _byte_level(models.BPE())
    show_progress = _on_terminal() if show_progress is None else show_progress
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts(), trainer=trainer)
    if count == 0:
        raise LmlabError(f"no text to train the tokenizer on in {', '.join(map(str, files))} (empty files?)")
    return Tokenizer(hf)
