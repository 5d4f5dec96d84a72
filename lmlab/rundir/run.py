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

import os
import time
from dataclasses import dataclass
from pathlib import Path

import tomllib

from lmlab import atomic
from lmlab.config import Config, from_dict, to_toml
from lmlab.errors import LmlabError

WEIGHTS = "model.safetensors"


def check_new_run_dir(config):
    """Refuse a new run before any work is done (tokenizer, shards): a name taken, a runs folder not writable.

    train.run_name=NAME names one run: when runs/NAME exists the user most likely
    meant to continue it, and writing runs/NAME-2 quietly would send a later
    `--resume runs/NAME` to the wrong run. So it is refused, with the command
    that continues it. (Generated names, NAME-DATE-TIME, still get a numbered
    sibling in the rare case two runs start in the same second.)
    """
    t = config.train
    runs_dir = Path(t.runs_dir).expanduser()
    if runs_dir.exists() and not runs_dir.is_dir():
        raise LmlabError(f"train.runs_dir={runs_dir} is a file, not a directory")
    if t.run_name and (runs_dir / t.run_name).exists():
        raise LmlabError(_name_taken(runs_dir / t.run_name))
    existing = runs_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the folder the new run's folders will be made in
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "Read-only file system" if _read_only_mount(existing) else "Permission denied"
        raise LmlabError(f"cannot create a run in train.runs_dir: {existing} is not writable ({reason}); "
                         "set train.runs_dir to a folder you can write")


def _name_taken(path):
    return (f"run directory {path} already exists; continue it with `lmlab train --resume {path}`, "
            "or give another train.run_name (nothing was written)")


def _read_only_mount(path):
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def new_run_dir(config):
    """Create runs/NAME. A train.run_name that exists is refused; a generated name that exists gets a numbered sibling."""
    t = config.train
    name = t.run_name or f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    runs_dir = Path(t.runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        raise LmlabError(f"train.runs_dir={runs_dir} is a file, not a directory")
    if t.run_name and (runs_dir / name).exists():
        raise LmlabError(_name_taken(runs_dir / name))
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
