"""The benchmarks `lmlab bench` runs, in one report with the machine they ran on.

Design choices:
- Each benchmark is a function returning a `Section`; this module only picks
  them, passes the config's device / precision / shape, and assembles the
  Markdown report (machine first) and a JSON file of every row.
- `quick` (`lmlab bench --quick`): the same benchmarks at small sizes and one
  or two repeats (the config's model only, 64 new tokens, 1 MB of text for
  prepare and tokenizer training), for a check in about a minute; its ratios
  are noisier than the full run's.
- The config is the one `lmlab train` would use (`--config`, KEY=VALUE), so
  `lmlab bench --find-batch --config my.toml` answers for the run about to be made.
"""

import dataclasses
import json

from lmlab.bench.common import machine, machine_lines
from lmlab.errors import LmlabError

BENCHMARKS = ("train", "generate", "loader", "prepare", "tokenizer")


def parse_only(text):
    """'train,generate' -> ('train', 'generate'); '' or 'all' -> every benchmark."""
    if not text or text == "all":
        return BENCHMARKS
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise LmlabError(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)} (or all)")
    return names


QUICK_TEXT_BYTES = 1 << 20  # text given to prepare and tokenizer training by --quick


def run(config, only=BENCHMARKS, reference=True, find_batch=False, budget_mib=None, log=print, quick=False):
    """Run the chosen benchmarks for `config`; returns (markdown report, {benchmark: rows})."""
    from lmlab.device import resolve_device, resolve_precision

    device = resolve_device(config.train.device)
    precision = resolve_precision(config.train.precision, device)
    if config.train.threads > 0:  # train.threads=1: one thread, the steadiest ratios on a shared machine
        import torch

        torch.set_num_threads(config.train.threads)
    info = machine(device)
    info["device"], info["precision"] = str(device), precision
    sections = []

    def add(name, section):
        sections.append((name, section))
        log(section.markdown())

    if find_batch:
        from lmlab.bench.find_batch import find_batch as search

        add("find_batch", search(config, device=device, precision=precision, budget_mib=budget_mib, log=log))
    for name in ([] if find_batch else only):
        add(name, _one(name, config, device, precision, reference, log, quick))
    report = "\n".join(["Machine:", "", machine_lines(info), ""] + [s.markdown() for _, s in sections])
    rows = {"machine": info, **{name: section.rows for name, section in sections}}
    return report, rows


def _one(name, config, device, precision, reference, log, quick=False):
    if name == "train":
        from lmlab.bench.train import LADDER, training_step

        own = dataclasses.replace(config.model, vocab_size=config.model.vocab_size or config.data.tokenizer_vocab_size)
        shapes = [own] + ([] if quick else [s for s in LADDER if not _same_shape(s, own)])
        return training_step(shapes, device=device, precision=precision, compile=config.train.compile,
                             reference=reference, log=log, **({"steps": 2} if quick else {}))
    if name == "generate":
        from lmlab.bench.generate import generation

        return generation(device=device, precision=precision, reference=reference, log=log,
                          **({"new_tokens": 64, "repeats": 1} if quick else {}))
    if name == "loader":
        from lmlab.bench.data import data_loader

        return data_loader(config, device=device, log=log, **({"batches": 20, "steps": 1, "repeats": 1} if quick else {}))
    from lmlab.bench import data

    fn = data.prepare_throughput if name == "prepare" else data.tokenizer_training
    if not quick:
        return fn(log=log)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return fn(files=[_text_slice(tmp)], log=log, repeats=1)


def _text_slice(tmp):
    """The first QUICK_TEXT_BYTES of the bundled TinyStories train text, cut at a story's end, as a file."""
    import lzma
    from pathlib import Path

    from lmlab.data.corpora import bundled_corpus

    (packed,), _ = bundled_corpus("tinystories")
    with lzma.open(packed, "rt", encoding="utf-8") as f:
        text = f.read(QUICK_TEXT_BYTES)
    end = text.rfind("<|endoftext|>")
    path = Path(tmp) / "tinystories-slice.txt"
    path.write_text(text[:end] + "<|endoftext|>\n" if end > 0 else text, encoding="utf-8")
    return path


def _same_shape(shape, model_config):
    """Whether a ladder entry is the config's own model (so it is not measured twice)."""
    from lmlab.bench.common import model_config as shape_config
    from lmlab.bench.gpt2 import is_gpt2

    get = shape.get if isinstance(shape, dict) else lambda key, default=None: getattr(shape, key, default)
    keys = ("d_model", "n_layers", "n_heads", "context_length", "vocab_size")
    return (all(get(k, None) in (None, getattr(model_config, k)) for k in keys)  # and the ladder's GPT-2 shapes
            and is_gpt2(shape_config(shape)) == is_gpt2(model_config.resolved(vocab_size=2048)))  # are other models


def write_json(path, rows):
    from lmlab import atomic

    atomic.write_text(path, json.dumps(rows, indent=2, default=str) + "\n")
