"""`lmlab eval`: load a model once, run the evaluations asked for, print tables, write RUN/evals/.

Design choices:
- The model can be a run directory (lmlab train / lmlab import), one of its
  checkpoints (runs/NAME/checkpoints/step_000200, verified before use), or a
  Hugging Face Llama / Qwen3 folder. Results go to RUN/evals/ (for a
  checkpoint: the run's evals/, names suffixed with the step; for a Hugging
  Face folder: HF_DIR-evals/ beside it, never inside it, so the exported folder
  stays exactly what `lmlab export` wrote and can be copied or uploaded as
  it is), or to `out`.
- Output names are fixed so that other tools can find them: text-<file stem>,
  shards-<split>, val, copy, reverse, history, choice-<set or file stem>; a
  rerun replaces the file.
- Meaningful probe text comes from `probe_text` files when given, else from
  the run's own validation split (the cached shards, built if missing), else
  (a Hugging Face folder) the bundled TinyStories validation text.
"""

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lmlab.errors import LmlabError
from lmlab.evals import choice, output, perplexity, probes, repetition, segments
from lmlab.evals.options import EvalOptions


@dataclass
class Target:
    path: Path  # what was given
    model: object
    tokenizer: object
    config: object  # the run's Config, or None for a Hugging Face folder
    out_dir: Path  # where evals/*.json go
    run_dir: Path = None  # the run directory (None for a Hugging Face folder)
    suffix: str = ""  # appended to output names (a checkpoint's step)


def load_target(path, device="cpu", out=None):
    """A run directory, one of its checkpoints, or a Hugging Face folder, ready to evaluate."""
    from lmlab.rundir.run import load_run

    path = Path(path).expanduser()
    if not path.is_dir():
        raise LmlabError(f"{path} does not exist; give a run directory, a checkpoint or a Hugging Face folder")
    if (path / "config.toml").is_file():
        run = load_run(path, device=device)
        return Target(path, run.model, run.tokenizer, run.config, Path(out) if out else path / "evals", run_dir=path)
    if (path / "state.json").is_file() and path.parent.name == "checkpoints":
        return _load_checkpoint(path, device, out)
    if (path / "config.json").is_file():
        from lmlab.model.hf import load_hf_model

        model, tokenizer, _ = load_hf_model(path)
        return Target(path, model.to(device), tokenizer, None, Path(out) if out else hf_evals_dir(path))
    raise LmlabError(f"{path} is not a run directory (no config.toml), a checkpoint (no state.json) "
                     "or a Hugging Face folder (no config.json)")


def hf_evals_dir(hf_dir):
    """HF_DIR-evals, beside the Hugging Face folder (hf/quickstart -> hf/quickstart-evals)."""
    hf_dir = Path(hf_dir)
    if hf_dir.name in ("", ".", ".."):
        hf_dir = hf_dir.resolve()
    return hf_dir.with_name(f"{hf_dir.name}-evals")


def _load_checkpoint(path, device, out):
    from lmlab.model import weights
    from lmlab.model.transformer import Transformer
    from lmlab.training import checkpoint
    from lmlab.rundir.run import load_run_config
    from lmlab.data.tokenizer import Tokenizer

    checkpoint.verify(path)  # sizes and hashes: a damaged checkpoint is refused by name
    run_dir = path.parent.parent
    config = load_run_config(run_dir)
    model = Transformer(config.model)
    try:
        weights.load_file(model, path / checkpoint.MODEL, device=device)
    except weights.WeightsMismatch as e:
        raise LmlabError(f"checkpoint {path}: {checkpoint.MODEL} does not fit the run's config.toml ({e})") from None
    model.to(device).eval()
    return Target(path, model, Tokenizer.load(run_dir), config, Path(out) if out else run_dir / "evals",
                  run_dir=run_dir, suffix=f"-{path.name}")


def _run_data(target, log):
    """(tokenizer-checked shards dir) of the run's own data, built and cached like training does."""
    from lmlab.data.corpora import ensure_data

    if target.config is None:
        raise LmlabError(f"{target.path} is a Hugging Face folder, which has no data of its own; "
                         "give --text or --shards instead")
    data = target.config.data
    data.tokenizer = str(target.run_dir)  # the run's own tokenizer.json: same fingerprint, same cached shards
    _, shards_dir = ensure_data(data, log=log)
    return shards_dir


def _run_val_text(target):
    """The run's validation text files as paths (a synthetic corpus is written first, as training does)."""
    from lmlab.data.corpora import resolve_files

    if target.config is None:
        raise LmlabError(f"{target.path} is a Hugging Face folder, which has no validation text; give --text")
    _, val_files = resolve_files(target.config.data)
    if not val_files:
        raise LmlabError(f"{target.path} was trained without validation files; give --text")
    return tuple(str(f) for f in val_files)


def _probe_stream(target, probe_text, text_key, log):
    if probe_text:
        return probes.text_stream(target.tokenizer, probe_text, text_key=text_key)
    if target.config is None:
        from lmlab.data.corpora import bundled_corpus

        _, val_files = bundled_corpus("tinystories")
        log(f"meaningful probe text: {val_files[0]} (give --probe-text for another)")
        return probes.text_stream(target.tokenizer, val_files)
    return probes.shard_stream(_run_data(target, log), "val")


def run_evals(path, options=None, log=print, **changes):
    """Run every evaluation `options` asks for on one model; returns {name: result}.

    From Python the options can also be keywords: `run_evals("runs/x", text=["valid.txt"], limit=100)`.
    """
    from lmlab.device import resolve_device, resolve_precision

    options = replace(options or EvalOptions(), **changes)
    options.check()
    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device)
    target = load_target(path, device=device, out=options.out)
    if options.val_text:
        options = replace(options, text=tuple(options.text) + _run_val_text(target))
    context_length = target.model.config.context_length
    if options.stride is not None and options.stride > context_length:
        raise LmlabError(f"--stride {options.stride} is longer than the model's context ({context_length})")
    log(f"{target.path}: {target.model.summary()}")
    results = {}
    for name, result, table, plot in _evaluations(target, options, log, device=device, precision=precision):
        name += target.suffix
        _write(target, name, result, table, plot, log)
        results[name] = result
    return results


def _evaluations(target, o, log, **common):
    """(name, result, table, plot?) of each evaluation asked for, each computed when it is drawn."""
    model, tokenizer = target.model, target.tokenizer
    if o.text and (o.segments or getattr(model.config, "memory", 0)):  # long documents (evals/segments.py)
        result = segments.segment_perplexity(model, tokenizer, perplexity.read_documents(o.text, o.text_key, o.limit),
                                             memory=not o.no_memory, **common)
        name = "segments-" + choice.base_name(o.text[0]) + ("" if result["memory"] else "-no-memory")
        yield name, result, segments.segments_table(result), True
    elif o.text:
        result = perplexity.text_perplexity(model, tokenizer, o.text, text_key=o.text_key, stride=o.stride,
                                            limit=o.limit, **common)
        name = "text-" + choice.base_name(o.text[0]) + (f"-and-{len(o.text) - 1}-more" if len(o.text) > 1 else "")
        yield name, result, output.perplexity_table(result), False
    if o.shards:
        result = perplexity.shard_perplexity(model, tokenizer, o.shards, split=o.split, stride=o.stride,
                                             limit=o.limit, **common)
        yield f"shards-{o.split}", result, output.perplexity_table(result), False
    if o.val:
        result = _val_subset(target, log, **common)
        yield "val", result, output.perplexity_table(result), False
    if o.probe:
        stream = _probe_stream(target, o.probe_text, o.text_key, log)
        counts = _training_counts(target, stream, o, log)
        for name in o.probe:
            if name == "copy" and o.distance:
                result = segments.distance_copy_probe(model, tokenizer, o.distance, length=(o.lengths or (8,))[0],
                                                      samples=o.limit or o.samples, seed=o.seed,
                                                      memory=not o.no_memory, stream=stream,
                                                      pool=probes.random_pool(tokenizer, counts, o.random_tokens),
                                                      random_tokens=o.random_tokens, **common)
                suffix = "" if result["memory"] else "-no-memory"
                yield "copy-distance" + suffix, result, segments.distance_table(result), True
                continue
            result = _probe(name, target, stream, counts, o, **common)
            yield name, result, output.probe_table(result), True
    if o.repetition:
        stream = _probe_stream(target, o.probe_text, o.text_key, log)
        result = repetition.repetition_eval(model, tokenizer, stream, samples=o.limit or o.samples,
                                            new_tokens=o.new_tokens, seed=o.seed, **common)
        yield "repetition", result, repetition.repetition_table(result), True
    for set_name in o.choice:
        result = _choice(set_name, target, o, **common)
        name = set_name if set_name in choice.BUNDLED else choice.base_name(result["file"])
        yield f"choice-{name}", result, output.choice_table(result), False


def _write(target, name, result, table, plot, log):
    """Print an evaluation's table; write its JSON (and a probe's plot) to the target's evals directory."""
    log(f"\n{name}\n{table}")
    json_path = output.write_result(target.out_dir, name, result, target.path.resolve(), target.model)
    if plot:
        draw = {"repetition": repetition.plot_repetition, "segments": segments.plot_segments,
                "distance-copy": segments.plot_distance}.get(result.get("kind"), output.plot_probe)
        draw(result, target.out_dir / f"{name}.png", title=f"{name}: {target.path.name}")
    log(f"-> {json_path}" + (f" and {name}.png" if plot else ""))


def _training_counts(target, stream, o, log):
    """Token counts that `--random-tokens seen|frequency` draw by: the run's training shards.

    A Hugging Face folder has no training data here, so its counts come from the probe text.
    """
    if o.random_tokens == "vocab" or not any(name in ("copy", "reverse") for name in o.probe):
        return None
    if target.config is None:
        log(f"random probe tokens: those {o.random_tokens} in the probe text (a Hugging Face folder has no "
            "training shards here; --random-tokens vocab for the whole vocabulary)")
        return np.bincount(stream)
    return probes.token_counts(_run_data(target, log), "train")


def _probe(name, target, stream, counts, o, **common):
    if name == "history":
        return probes.history_probe(target.model, stream, samples=o.limit or 2 * o.samples, seed=o.seed, **common)
    return probes.copy_probe(target.model, target.tokenizer, stream, task=name, lengths=o.lengths,
                             samples=o.limit or o.samples, shots=o.shots, separator=o.separator, stride=o.stride,
                             seed=o.seed, random_tokens=o.random_tokens, counts=counts, **common)


def _choice(set_name, target, o, **common):
    """A multiple-choice set (bundled name or file), its few-shot examples from --fewshot or its dev split."""
    items_path, bundled_fewshot = choice.resolve_set(set_name)
    items, detected = choice.read_items(items_path, o.format)
    fewshot_file = (o.fewshot or bundled_fewshot) if o.shots else None
    fewshot_items = choice.read_items(fewshot_file, detected)[0] if fewshot_file else None
    result = choice.choice_eval(target.model, target.tokenizer, choice.limit_per_subject(items, o.limit), detected,
                                style=o.style, shots=o.shots, fewshot_items=fewshot_items, norm=o.norm, **common)
    result["file"] = str(items_path)
    result["fewshot_file"] = str(fewshot_file) if fewshot_file else None
    return result


def _val_subset(target, log, device, precision):
    """The training loop's fixed validation subset: the same windows that give val_loss / val_bpb."""
    from lmlab.data.batches import Batches

    config = target.config
    t = config.train
    batches = Batches(_run_data(target, log), "val", t.batch_size, config.model.context_length,
                      packing=config.data.packing, seed=t.seed,
                      segments_per_document=config.data.segments_per_document).fixed(t.eval_batches)
    if config.model.memory and config.data.packing == "stream":  # memory carried, as training measures it
        from lmlab.evals.bpb import count_targets, token_byte_lengths
        from lmlab.training.duties import evaluate

        loss = evaluate(target.model, batches, precision, device)
        tokens, nbytes = count_targets(batches, token_byte_lengths(target.tokenizer))
        return {"kind": "perplexity", "source": "validation subset, memory carried",
                "overall": perplexity.figures(loss * tokens, tokens, nbytes)}
    return perplexity.batches_perplexity(target.model, target.tokenizer, batches, device=device, precision=precision)
