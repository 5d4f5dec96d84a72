"""The run directory: the contract between train, generate, eval, report and export.

    runs/NAME/
      config.toml         the fully resolved config (repeat with --config)
      tokenizer.json      the tokenizer the run was trained with
      model.safetensors   final weights, Hugging Face Llama parameter names
      metrics.jsonl       one JSON event per line (step, tokens, elapsed_s, ...)
      summary.json        status, final / best validation loss, steps, tokens, time
      env.json            versions, device, threads, peak FLOP/s, git commit, command line
      samples.md          text generated at the end
      plots/loss.png      train and validation loss against step
      notes.md            the user's dated notes (lmlab note), shown by lmlab report
      tensorboard/, wandb/  the optional sinks' files (train.tensorboard, train.wandb)
      evals/<name>.json   lmlab eval results (text-*, val, copy, reverse, history, choice-*), probes with a .png
"""

import time
from dataclasses import dataclass
from pathlib import Path

import tomllib

from lmlab import atomic
from lmlab.config import Config, from_dict, to_toml
from lmlab.errors import LmlabError

WEIGHTS = "model.safetensors"


def new_run_dir(config):
    """Create runs/NAME; an existing NAME gets a numbered sibling, never overwritten."""
    t = config.train
    name = t.run_name or f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    runs_dir = Path(t.runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        raise LmlabError(f"train.runs_dir={runs_dir} is a file, not a directory")
    path, n = runs_dir / name, 1
    while path.exists():
        n += 1
        path = runs_dir / f"{name}-{n}"
    path.mkdir(parents=True)
    (path / "plots").mkdir()
    t.run_name = path.name
    return path


def save_config(run_dir, config):
    atomic.write_text(Path(run_dir) / "config.toml", to_toml(config))


def load_run_config(run_dir):
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise LmlabError(f"{run_dir} is not a run directory (no config.toml)")
    return from_dict(tomllib.loads(path.read_text(encoding="utf-8")), source=str(path))


@dataclass
class Run:
    path: Path
    config: Config
    model: object
    tokenizer: object


def load_run(path, device="cpu"):
    """Load a run's model (eval mode), tokenizer and config from its directory."""
    from lmlab.model import weights as weights_io
    from lmlab.model.transformer import Transformer
    from lmlab.data.tokenizer import Tokenizer

    path = Path(path)
    if not path.is_dir():
        raise LmlabError(f"run directory {path} does not exist")
    config = load_run_config(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise LmlabError(f"{path} has no {WEIGHTS}: the run did not finish saving its weights")
    tokenizer = Tokenizer.load(path)
    model = Transformer(config.model)
    try:
        weights_io.load_file(model, weights, device=device)
    except weights_io.WeightsMismatch as e:
        raise LmlabError(f"{weights} does not fit the run's config.toml ({e})") from None
    model.to(device).eval()
    return Run(path=path, config=config, model=model, tokenizer=tokenizer)


def save_weights(model, run_dir, state=None):
    """Final weights in safetensors (tied tensors stored once); `state` when they were gathered from ranks.

    A full disk is an OSError (one line from the CLI).
    """
    from lmlab.model import weights

    weights.save_file(model, Path(run_dir) / WEIGHTS, state)
