"""What `lmlab eval` can be asked, written once: each field of `EvalOptions` is a flag of the command
and a keyword of `run_evals`.

Design choices:
- A field's default, help and argparse details live on the field, and
  `add_flags` turns the fields into `--NAME` flags (underscores become
  dashes, the flag's dest is the field name), so a new option is one field.
- `bool` fields are switches (store_true); `int` fields (or `int | None`)
  parse as integers; anything else says its argparse keywords itself.
- This module imports only the standard library and lmlab.errors, so that
  `lmlab --help` builds the parser without numpy or torch (hence PROBES here
  rather than from probes.py); the runner does the work.
"""

import argparse
from dataclasses import dataclass, field, fields

from lmlab.errors import LmlabError

PROBES = ("copy", "reverse", "history")
RANDOM_TOKENS = ("seen", "frequency", "vocab")  # = lmlab.evals.probes.RANDOM_TOKENS


def int_list(text):
    """argparse type of `--lengths`: "4,8,16" -> [4, 8, 16]."""
    try:
        return [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 4,8,16") from None


def _flag(default, help, **argparse_keywords):
    return field(default=default, metadata={"help": help, **argparse_keywords})


@dataclass(frozen=True)
class EvalOptions:
    """The evaluations to run on one model and how; the field order is the order of `lmlab eval --help`."""

    # what to evaluate
    text: tuple = _flag((), "loss, perplexity and bits per byte of text / .jsonl files, per document and overall",
                        nargs="+", metavar="FILE")
    val_text: bool = _flag(False, "add the run's own validation text to --text (its corpus's valid file or "
                                  "data.val_files), for a corpus whose files the user does not hold")
    text_key: str = _flag("text", "JSON field holding the text in .jsonl files")
    shards: str | None = _flag(None, "the same on a prepared shards directory (lmlab prepare)", metavar="DIR")
    split: str = _flag("val", "split of --shards to evaluate (default val)")
    val: bool = _flag(False, "the run's own validation subset, exactly as training measures val_loss / val_bpb")
    probe: tuple = _flag((), "working-memory probes: copy, reverse (random and meaningful sequences), history gain",
                         nargs="+", choices=PROBES)
    probe_text: tuple = _flag((), "text for meaningful probe sequences (default: the run's validation split)",
                              nargs="+", metavar="FILE")
    lengths: tuple | None = _flag(None, "probe sequence lengths (default 4 .. twice the context)",
                                  type=int_list, metavar="N,N,...")
    samples: int = _flag(32, "probe sequences per length (history: twice as many)")
    random_tokens: str = _flag("seen", "tokens of random probe sequences (also --distance): seen in the training shards (default), "
                                       "drawn by their training frequency, or the whole vocabulary",
                               choices=RANDOM_TOKENS)
    distance: tuple | None = _flag(None, "copy probe: the source lies D tokens before its copy, which starts a "
                                   "segment (so it is in the previous one; docs/long-documents.md)",
                                   type=int_list, metavar="D,D,...")
    no_memory: bool = _flag(False, "a model trained with model.memory: read --text and --distance segments "
                                   "without the memory, to compare")
    segments: bool = _flag(False, "score --text segment by segment (as stream training reads) even for a model "
                                  "without memory; loss by segment index and position")
    separator: str | None = _flag(None, "text between a probe sequence and its copy (default: the end-of-text token)",
                                  metavar="TEXT")
    repetition: bool = _flag(False, "share of repeated n-grams in continuations of validation-text prompts, "
                                    "greedy and sampled, against the real text that follows them")
    new_tokens: int = _flag(128, "tokens generated per prompt (--repetition)")
    choice: tuple = _flag((), "multiple-choice file (CSV / JSONL) or bundled set: mmlu, mmlu-dev, cmmlu, cmmlu-dev",
                          nargs="+", metavar="FILE|SET")
    # how
    format: str = _flag("auto", "layout of the --choice file (default: detected)",
                        choices=("auto", "mmlu", "cmmlu", "ceval", "arc", "hellaswag"))
    style: str = _flag("auto", "score the letters A-D after a lettered list (MMLU) or the answer texts (ARC, HellaSwag)",
                       choices=("auto", "letter", "cloze"))
    fewshot: str | None = _flag(None, "solved examples for --shots (bundled sets bring their dev split)",
                                metavar="FILE")
    shots: int = _flag(0, "few-shot examples (multiple choice) or demonstrations (probes)")
    norm: str = _flag("none", "divide a choice's log-likelihood by its length in characters or tokens",
                      choices=("none", "chars", "tokens"))
    stride: int | None = _flag(None, "sliding-window stride for text longer than the context "
                                     "(default: the context; probes: 1/8)")
    limit: int = _flag(0, "at most N documents per --text file, N tokens of --shards, N items per subject, "
                          "N probe samples")
    seed: int = _flag(0, "seed of the probe sequences")
    device: str = _flag("cpu", "cpu, cuda, mps or auto")
    precision: str = _flag("fp32", "autocast precision", choices=("fp32", "bf16", "fp16", "auto"))
    out: str | None = _flag(None, "write the JSON / PNG files here instead of RUN/evals (HF_DIR-evals for a Hugging Face folder)", metavar="DIR")

    def check(self):
        """Refuse, in one line, options that ask for nothing or hold a value out of range."""
        if not (self.text or self.val_text or self.shards or self.val or self.probe or self.repetition or self.choice):
            raise LmlabError("nothing to evaluate: give --text FILE, --val-text, --shards DIR, --val, "
                             "--probe copy|reverse|history, --repetition or --choice FILE|mmlu|cmmlu")
        if self.stride is not None and self.stride <= 0:
            raise LmlabError(f"--stride must be positive, got {self.stride}")
        if self.new_tokens <= 0:
            raise LmlabError(f"--new-tokens must be positive, got {self.new_tokens}")
        if self.samples <= 0 or self.limit < 0 or self.shots < 0 or any(n <= 0 for n in self.lengths or ()):
            raise LmlabError("--samples and --lengths must be positive, --limit and --shots >= 0")
        if self.distance is not None and ("copy" not in self.probe or any(d <= 0 for d in self.distance)):
            raise LmlabError("--distance needs --probe copy and positive distances, e.g. --probe copy --distance 16,64")
        for name in self.probe:
            if name not in PROBES:
                raise LmlabError(f"unknown probe {name!r}; choose copy, reverse or history")

    @classmethod
    def add_flags(cls, parser):
        """One `--NAME` flag per field on `parser` (`lmlab eval`'s)."""
        for f in fields(cls):
            keywords = dict(f.metadata)
            if f.type is bool:
                keywords["action"] = "store_true"
            elif f.type in (int, int | None):
                keywords.setdefault("type", int)
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default, **keywords)

    @classmethod
    def from_args(cls, args):
        """The options an argparse namespace made by a parser with `add_flags` holds."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
