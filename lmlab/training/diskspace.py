"""Room on disk for a run, checked before the first step: its checkpoints and its final weights.

    checkpoint  = weights + optimizer state + state.json   (sizes from the parameter count and dtypes)
    needed      = (train.keep_checkpoints + 1) x checkpoint + final weights + 1 MB of small files
                  minus what a resumed run already holds there (its checkpoints are replaced one by one)

Design choices:
- keep + 1 checkpoints, not keep: a new checkpoint is written in full before
  the oldest is deleted (checkpoint.py commits by rename, then prunes), so
  that is the peak.
- The sizes are computed, not guessed: the weights are the unique parameters
  and buffers as model.safetensors stores them (a tied matrix once); the
  optimizer state is per-parameter tensors (AdamW: exp_avg and exp_avg_sq in
  the parameter's dtype, and a step counter; 8-bit AdamW: a byte each, plus
  block statistics). An optimizer this module does not know is counted as
  AdamW, an upper bound for the Adam / momentum family. The estimate is checked
  against checkpoints written by a real run (tests/test_reliability.py): at
  most a few KB off for the tiny model.
- Only rank 0 writes the run directory, so only rank 0 checks.
- The message names train.runs_dir as the user gave it, the bytes needed and
  the bytes free, and what would help.
"""

import shutil
from pathlib import Path

from lmlab.errors import LmlabError

SMALL_FILES = 1 << 20  # config.toml, tokenizer, env.json, metrics.jsonl, samples, plots: well under 1 MB for most runs
STATE_JSON = 64 << 10  # state.json: RNG states, the optimizer's param groups, the config
PER_TENSOR = 256  # safetensors header entry per tensor


def weights_bytes(model):
    """Bytes of model.safetensors: every distinct tensor of the state dict once (a tied head is stored once)."""
    seen, total, count = set(), 0, 0
    for tensor in model.state_dict(keep_vars=True).values():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size() + PER_TENSOR
        count += 1
    return total


def optimizer_bytes(model, optimizer_name):
    """Bytes of optimizer.safetensors for `optimizer_name` (AdamW's two moments unless known to be smaller)."""
    params = list(dict.fromkeys(p for p in model.parameters() if p.requires_grad))
    per_element = {"adamw8bit": 2.1}  # one byte per moment, and block-wise absmax statistics
    total = 0
    for p in params:
        factor = per_element.get(optimizer_name, 2 * p.element_size())
        total += int(p.numel() * factor) + 3 * PER_TENSOR + 8  # exp_avg, exp_avg_sq, step
    return total


def checkpoint_bytes(model, optimizer_name):
    return weights_bytes(model) + optimizer_bytes(model, optimizer_name) + STATE_JSON


def needed_bytes(model, config, run_dir=None):
    """(bytes needed, bytes of one checkpoint, bytes of the final weights) for a run, less what it already holds."""
    keep = config.train.keep_checkpoints
    weights, one = weights_bytes(model), checkpoint_bytes(model, config.optim.name)
    needed = (keep + 1) * one * (keep > 0) + weights + SMALL_FILES
    if run_dir is not None:  # a resumed run: its checkpoints and weights are replaced, not added to
        needed -= sum(f.stat().st_size for f in Path(run_dir).rglob("*.safetensors") if f.is_file())
    return max(needed, SMALL_FILES), one, weights


def free_bytes(folder):
    """Free bytes on the filesystem that holds `folder` (or would hold it: the nearest existing parent)."""
    path = Path(folder).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check(model, config, run_dir=None):
    """Refuse a run whose checkpoints and final weights do not fit in train.runs_dir (before anything is written)."""
    folder = run_dir if run_dir is not None else config.train.runs_dir
    needed, one, weights = needed_bytes(model, config, run_dir)
    free = free_bytes(folder)
    if needed > free:
        keep = config.train.keep_checkpoints
        raise LmlabError(
            f"not enough space in {folder}: this run needs {needed:,} bytes ({keep + 1 if keep else 0} checkpoint(s) "
            f"of {one:,} bytes while the newest is written, final weights of {weights:,} bytes, 1 MB of logs) and "
            f"{free:,} bytes are free; free some space, lower train.keep_checkpoints, or choose another train.runs_dir")
    return needed, free
