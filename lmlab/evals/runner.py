"""`lmlab eval`: load a model once, run the evaluations asked for, print tables, write RUN/evals/.

Design choices:
- The model can be a run directory (lmlab train / lmlab import), one of its
  checkpoints (runs/NAME/checkpoints/step_000200, verified before use), or a
  Hugging Face Llama / Qwen3 folder. Results go to RUN/evals/ (for a
  checkpoint: the run's evals/, names suffixed with the step; for a Hugging
  Face folder: HF_DIR/evals/), or to `out`.
- Output names are fixed so that other tools can find them: text-<file stem>,
  shards-<split>, val, copy, reverse, history, choice-<set or file stem>; a
  rerun replaces the file.
- Meaningful probe text comes from `probe_text` files when given, else from
  the run's own validation split (the cached shards, built if missing), else
  (a Hugging Face folder) the bundled TinyStories validation text.
"""

from dataclasses import dataclass
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.evals import choice, output, perplexity, probes


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
        return Target(path, model.to(device), tokenizer, None, Path(out) if out else path / "evals")
    raise LmlabError(f"{path} is not a run directory (no config.toml), a checkpoint (no state.json) "
                     "or a Hugging Face folder (no config.json)")


def _load_checkpoint(path, device, out):
    from safetensors.torch import load_file

    from lmlab.training import checkpoint
    from lmlab.model.transformer import Transformer
    from lmlab.rundir.run import load_run_config
    from lmlab.data.tokenizer import Tokenizer

    checkpoint.verify(path)  # sizes and hashes: a damaged checkpoint is refused by name
    run_dir = path.parent.parent
    config = load_run_config(run_dir)
    model = Transformer(config.model)
    state = load_file(str(path / checkpoint.MODEL), device=str(device))
    if config.model.tie_embeddings:
        state.setdefault("lm_head.weight", state.get("embed_tokens.weight"))
    model.load_state_dict(state)
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


def _probe_stream(target, probe_text, text_key, log):
    if probe_text:
        return probes.text_stream(target.tokenizer, probe_text, text_key=text_key)
    if target.config is None:
        from lmlab.data.corpora import bundled_corpus

        _, val_files = bundled_corpus("tinystories")
        log(f"meaningful probe text: {val_files[0]} (give --probe-text for another)")
        return probes.text_stream(target.tokenizer, val_files)
    return probes.shard_stream(_run_data(target, log), "val")


def run_evals(path, text=(), text_key="text", shards=None, split="val", val=False, probe=(), probe_text=(),
              lengths=None, samples=32, separator=None, choice_sets=(), fmt="auto", style="auto", fewshot=None,
              shots=0, norm="none", stride=None, limit=0, seed=0, device="cpu", precision="fp32", out=None,
              log=print):
    """Run every evaluation asked for on one model; returns {name: result}."""
    from lmlab.device import resolve_device, resolve_precision

    if not (text or shards or val or probe or choice_sets):
        raise LmlabError("nothing to evaluate: give --text FILE, --shards DIR, --val, --probe copy|reverse|history "
                         "or --choice FILE|mmlu|cmmlu")
    if stride is not None and stride <= 0:
        raise LmlabError(f"--stride must be positive, got {stride}")
    if samples <= 0 or limit < 0 or shots < 0 or any(n <= 0 for n in lengths or ()):
        raise LmlabError("--samples and --lengths must be positive, --limit and --shots >= 0")
    for name in probe:
        if name not in probes.PROBES:
            raise LmlabError(f"unknown probe {name!r}; choose copy, reverse or history")
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    target = load_target(path, device=device, out=out)
    model, tokenizer = target.model, target.tokenizer
    context_length = model.config.context_length
    if stride is not None and stride > context_length:
        raise LmlabError(f"--stride {stride} is longer than the model's context ({context_length})")
    log(f"{target.path}: {model.summary()}")
    common = {"device": device, "precision": precision}
    results = {}

    def finish(name, result, table, plot=False):
        name += target.suffix
        log(f"\n{name}\n{table}")
        json_path = output.write_result(target.out_dir, name, result, target.path.resolve(), model)
        if plot:
            output.plot_probe(result, target.out_dir / f"{name}.png", title=f"{name}: {target.path.name}")
        log(f"-> {json_path}" + (f" and {name}.png" if plot else ""))
        results[name] = result

    if text:
        result = perplexity.text_perplexity(model, tokenizer, text, text_key=text_key, stride=stride,
                                            limit=limit, **common)
        name = "text-" + choice.base_name(text[0]) + (f"-and-{len(text) - 1}-more" if len(text) > 1 else "")
        finish(name, result, output.perplexity_table(result))
    if shards:
        result = perplexity.shard_perplexity(model, tokenizer, shards, split=split, stride=stride, limit=limit,
                                             **common)
        finish(f"shards-{split}", result, output.perplexity_table(result))
    if val:
        result = _val_subset(target, log, **common)
        finish("val", result, output.perplexity_table(result))
    if probe:
        stream = _probe_stream(target, probe_text, text_key, log)
        for name in probe:
            if name == "history":
                result = probes.history_probe(model, stream, samples=limit or 2 * samples, seed=seed, **common)
            else:
                result = probes.copy_probe(model, tokenizer, stream, task=name, lengths=lengths,
                                           samples=limit or samples, shots=shots, separator=separator,
                                           stride=stride, seed=seed, **common)
            finish(name, result, output.probe_table(result), plot=True)
    for set_name in choice_sets:
        items_path, bundled_fewshot = choice.resolve_set(set_name)
        items, detected = choice.read_items(items_path, fmt)
        fewshot_file = fewshot or bundled_fewshot
        fewshot_items = choice.read_items(fewshot_file, detected)[0] if fewshot_file and shots else None
        result = choice.choice_eval(model, tokenizer, choice.limit_per_subject(items, limit), detected,
                                    style=style, shots=shots, fewshot_items=fewshot_items, norm=norm, **common)
        result["file"] = str(items_path)
        result["fewshot_file"] = str(fewshot_file) if fewshot_file and shots else None
        finish(f"choice-{set_name if set_name in choice.BUNDLED else choice.base_name(items_path)}", result,
               output.choice_table(result))
    return results


def _val_subset(target, log, device, precision):
    """The training loop's fixed validation subset: the same windows that give val_loss / val_bpb."""
    from lmlab.data.batches import Batches

    config = target.config
    t = config.train
    batches = Batches(_run_data(target, log), "val", t.batch_size, config.model.context_length,
                      packing=config.data.packing, seed=t.seed).fixed(t.eval_batches)
    return perplexity.batches_perplexity(target.model, target.tokenizer, batches, device=device, precision=precision)
