"""A run directory to a Hugging Face folder and back: `lmlab export` and `lmlab import`.

Design choices:
- The conversion itself (config, weight names, tokenizer) lives in
  lmlab.model.hf; this file only reads and writes run directories.
- A folder is built under a temporary name and renamed into place: a crash
  leaves nothing behind, and an existing folder is never overwritten.
"""

import json
from pathlib import Path

from lmlab import atomic
from lmlab.config import Config, validate
from lmlab.model.hf import hf_architecture, hf_config, hf_state_dict, load_hf_model
from lmlab.rundir.run import Run, load_run, save_config, save_weights


def export_hf(run, out_dir, log=None):
    """Write a run (a directory or a loaded `Run`) as a Hugging Face folder; returns its path."""
    from safetensors.torch import save_file

    if not isinstance(run, Run):
        run = load_run(run)
    model_config = run.config.model
    architecture = hf_architecture(model_config)  # refuse before anything is written
    out_dir = Path(out_dir)
    with atomic.atomic_dir(out_dir) as tmp:
        save_file(hf_state_dict(run.model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        eot_id, pad_id = _write_tokenizer(run.tokenizer, tmp, model_config.context_length)
        _write_json(tmp / "config.json", hf_config(model_config, eot_id, eot_id, pad_id))
        _write_json(tmp / "generation_config.json",
                    {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": pad_id})
    if log:
        log(f"{architecture} ({run.model.num_params():,} parameters) -> {out_dir}")
        if model_config.memory:  # the memory is no weight: the same weights work without it
            log(f"note: trained with model.memory={model_config.memory}; the exported model has the same weights "
                f"but no memory across segments: it reads {model_config.context_length} tokens at a time")
    return out_dir


def _write_tokenizer(tokenizer, folder, context_length):
    """tokenizer.json + tokenizer_config.json into `folder`; returns (eot id, pad id)."""
    tokenizer.save(folder)  # tokenizer.json and an HF-style tokenizer_config.json (PreTrainedTokenizerFast)
    config = atomic.read_json(folder / "tokenizer_config.json")
    config["model_max_length"] = context_length  # what the positions cover; HF's default is "infinite"
    _write_json(folder / "tokenizer_config.json", config)
    return int(tokenizer.eot_id), int(tokenizer.pad_id)


def import_hf(hf_dir, run_dir, log=None):
    """Turn a local Hugging Face Llama / Qwen3 folder into a run directory; returns its path.

    The run loads with `lmlab.rundir.run.load_run`, samples with `lmlab generate` and
    exports back to the same folder. Its config records the source folder as
    model.init_from and data.tokenizer, so `lmlab train --config RUN/config.toml`
    continues from these weights with this tokenizer.
    """
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    model, tokenizer, model_config = load_hf_model(hf_dir)
    model_config.init_from = str(hf_dir.resolve())
    config = Config(model=model_config, name=run_dir.name)
    config.data.tokenizer = str(hf_dir.resolve())
    validate(config)
    with atomic.atomic_dir(run_dir) as tmp:
        save_config(tmp, config)
        tokenizer.save(tmp)
        save_weights(model, tmp)
    if log:
        log(model.summary())
        log(f"{hf_dir} -> {run_dir}")
    return run_dir


def _write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
