"""Resuming a run: which run, which checkpoint, which config changes are allowed; then the state back in place.

    lmlab train --resume RUN [KEY=VALUE ...]         continue RUN from its newest good checkpoint
    lmlab train ... train.run_name=X train.resume=auto
                                                    continue runs/X if it exists, else start it

Design choices:
- Everything is checked before anything is written: the run directory (and
  that it is writable), the newest checkpoint that verifies, the tokenizer
  and data against the checkpoint's record, the config against the
  checkpoint's config, the budget left. A refused resume leaves the run
  directory byte for byte as it was.
- What cannot change mid-run is refused with the list of differences: the
  model (every model.* key), the data (every data.* key but data.cache_dir,
  which says where the cache is, not what is in it), the batches
  (train.seed, train.batch_size, train.grad_accum) and the kind of LR schedule
  (optim.schedule). Everything else may change: the budget (max_steps,
  max_tokens, max_time), evaluation, logging and checkpointing, optimizer
  hyperparameters (to get past a loss spike with a lower lr), device,
  precision. Changes are logged, written to config.toml and recorded in
  metrics.jsonl as {"kind": "resume", "changed": {key: [old, new]}}. With no
  change, a resumed run is bit for bit the run that was never stopped (same
  machine, same settings).
- metrics.jsonl is cut back to its size at the checkpoint, so the log goes on
  without duplicated or missing steps; wall_s goes on from the checkpoint's.
- The loop's counters come back as one TrainState (state.py), read from the
  state.json keys every checkpoint has had, so checkpoints written by an
  older lmlab resume too.
- train.resume is how a run was started, not what it is: a run's config.toml
  always says resume = "", so `lmlab train --config runs/X/config.toml` still
  repeats the run in a new directory.
- A run killed before its first checkpoint starts over in place from step 0;
  a directory with final weights but no checkpoint (a run that ended with
  train.keep_checkpoints=0, an imported model) is refused, not overwritten.
"""

import copy
import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lmlab.config import flat_keys
from lmlab.errors import LmlabError
from lmlab.training.state import TrainState

FROZEN_SECTIONS = ("model", "data")
MAY_CHANGE = {"data.cache_dir", "data.workers"}  # in a frozen section, but a location or a speed setting
FROZEN = {"train.seed", "train.batch_size", "train.grad_accum", "optim.schedule"}
NOT_COMPARED = {"name", "train.run_name", "train.runs_dir", "train.resume"}


def check_run_dir(run_dir):
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise LmlabError(f"run directory {run_dir} does not exist")
    if not run_dir.is_dir():
        raise LmlabError(f"{run_dir} is a file, not a run directory")
    if not (run_dir / "config.toml").is_file():
        raise LmlabError(f"{run_dir} is not a run directory (no config.toml)")


def resume_config(run, config_path=None, overrides=()):
    """The config of `lmlab train --resume RUN`: RUN's config.toml (or --config), the overrides, train.resume=RUN."""
    from lmlab.config import load_config

    run = Path(run).expanduser()
    check_run_dir(run)
    return load_config(config_path or run / "config.toml", [*overrides, f"train.resume={run}"])


def _as_resolved(new, saved):
    """`new` with its derived model values (0 = derive) filled in as the trainer would, for comparison."""
    new = copy.deepcopy(new)
    m, s = new.model, saved.model
    if m.init_from and m.init_from == s.init_from:
        # the architecture came from the Hugging Face folder; only these two are training choices
        new.model = dataclasses.replace(s, context_length=m.context_length, dropout=m.dropout)
        return new
    new.model = m.resolved(vocab_size=s.vocab_size)  # vocab follows the tokenizer, which is checked on its own
    return new


def config_changes(saved, new):
    """{key: [old, new]} of the keys that may change; LmlabError listing the ones that may not."""
    saved = dataclasses.replace(saved, model=saved.model.resolved())  # a run saved before head_dim was written back
    before, after = flat_keys(saved), flat_keys(_as_resolved(new, saved))
    frozen, changed = [], {}
    for key in after:
        if key in NOT_COMPARED or before.get(key) == after[key]:
            continue
        section = key.partition(".")[0]
        if key in FROZEN or (section in FROZEN_SECTIONS and key not in MAY_CHANGE):
            frozen.append(f"{key} = {after[key]!r} (the run has {before.get(key)!r})")
        else:
            changed[key] = [before.get(key), after[key]]
    if frozen:
        raise LmlabError("these cannot change in the middle of a run: " + "; ".join(frozen)
                         + "; drop those overrides, or start a new run")
    return changed


def _check_writable(run_dir):
    for directory in (run_dir, run_dir / "checkpoints"):
        if not directory.is_dir():
            continue
        try:
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as e:
            raise LmlabError(f"cannot resume {run_dir}: {directory} is not writable ({e.strerror}); "
                             "copy the run somewhere writable and resume the copy") from None


def _ended_with_weights(run_dir):
    """Whether summary.json says the run ended, other than by failing (a failed run without checkpoints starts again)."""
    from lmlab.rundir.status import FAILED

    path = run_dir / "summary.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("status") != FAILED
    except FileNotFoundError:
        return False
    except (OSError, ValueError, AttributeError):
        return True  # unreadable: keep it, as before


def _check_budget(run_dir, config, record):
    from lmlab.config import total_steps

    steps, max_time = total_steps(config), config.train.max_time
    if steps is not None and record["step"] >= steps:
        raise LmlabError(f"{run_dir} is already at step {record['step']} of {steps}; raise train.max_steps "
                         "(or train.max_tokens) to train it further")
    if steps is None and max_time and record["elapsed_s"] >= max_time:
        raise LmlabError(f"{run_dir} has already used {record['elapsed_s']:.0f}s of its train.max_time={max_time:g}s; "
                         "raise train.max_time to train it further")


def _check_data(run_dir, record, shards_dir):
    from lmlab.data.shards import load_meta
    from lmlab.training.checkpoint import data_identity

    now, then = data_identity(load_meta(shards_dir)), record.get("data") or {}
    differences = [f"{key} {now.get(key)} (the run had {then.get(key)})"
                   for key in sorted(set(now) | set(then)) if now.get(key) != then.get(key)]
    if differences:
        raise LmlabError(f"cannot resume {run_dir}: the data is not what it was trained on: "
                         + "; ".join(differences) + "; resume with the run's own data and tokenizer")


@dataclass
class Resumed:
    """A run to continue: its directory, and the checkpoint to continue from (None: start over at step 0)."""

    run_dir: Path
    checkpoint: Path | None = None
    record: dict | None = None  # the checkpoint's state.json, verified
    changed: dict = dataclasses.field(default_factory=dict)

    def check_data(self, shards_dir):
        """Refuse data (tokenizer, split sizes) other than the checkpoint's; still before any write."""
        if self.checkpoint is not None:
            _check_data(self.run_dir, self.record, shards_dir)

    def restore(self, model, optimizer, scaler, metrics, checkpointer, stateful=None, log=print, parallel=None):
        """State back in place, metrics.jsonl cut back (by rank 0), the resume recorded.

        Returns the TrainState to continue from: the checkpoint's, or a fresh one when the
        run starts over (no checkpoint yet).
        """
        from lmlab.training.checkpoint import load_into

        record = self.record or {}
        _cut_metrics_back(metrics, record.get("metrics_bytes", 0), log)
        if self.checkpoint is None:
            return TrainState()
        load_into(self.checkpoint, record, model, optimizer, scaler, stateful=stateful, log=log, parallel=parallel)
        state = TrainState.from_checkpoint(record)
        if record.get("wall_s") is not None and hasattr(metrics, "started"):
            metrics.started = time.perf_counter() - record["wall_s"]  # wall_s goes on from the checkpoint's
        checkpointer.last_step, checkpointer.last_elapsed = state.step, state.elapsed_s
        metrics.write(**state.where(), kind="resume", checkpoint=self.checkpoint.name, changed=self.changed)
        changes = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in self.changed.items())
        log(f"resuming {self.run_dir} from {self.checkpoint.name}: step {state.step}, {state.tokens:,} tokens, "
            f"{state.elapsed_s:.0f}s of training" + (f"; changed: {changes}" if changes else ""))
        return state


def _cut_metrics_back(metrics, keep, log):
    """Truncate metrics.jsonl to its size at the checkpoint (rank 0; other ranks write no metrics).

    MetricsLog appends (O_APPEND), so it goes on writing at the new end.
    """
    if metrics.path is None:
        return
    size = metrics.path.stat().st_size
    if size < keep:
        log(f"warning: {metrics.path} is shorter than at the checkpoint ({size} < {keep} bytes); "
            "some earlier events are missing from it")
    os.truncate(metrics.path, min(size, keep))


def prepare(config, log=print):
    """None for a new run; else the `Resumed` run to continue. Checks all but the data; writes nothing.

    Runs before the data is built (a refused resume costs no tokenizing) and sets
    config.train.run_name / runs_dir to the resumed run and config.model to the run's
    resolved model section. `Resumed.check_data` follows once the data is there.
    """
    from lmlab.config import absolute_inputs, from_dict
    from lmlab.training import checkpoint

    t = config.train
    if not t.resume:
        return None
    auto = t.resume == "auto"
    if auto and not t.run_name:
        raise LmlabError("train.resume=auto needs train.run_name: the run to continue, or to start under that name")
    run_dir = Path(t.runs_dir).expanduser() / t.run_name if auto else Path(t.resume).expanduser()
    t.resume = ""  # how this run started, not part of its config (see the module docstring)
    if auto and not run_dir.exists():
        log(f"train.resume=auto: no run {run_dir} yet; starting it")
        return None
    check_run_dir(run_dir)
    t.run_name, t.runs_dir = run_dir.name, str(run_dir.parent)
    path, record = checkpoint.latest(run_dir, log=log)
    if path is None:
        if _ended_with_weights(run_dir) or (run_dir / "model.safetensors").exists():
            # a run that ended without checkpoints (train.keep_checkpoints=0), or an imported model: keep it
            raise LmlabError(f"{run_dir} has weights but no checkpoint (it ended with train.keep_checkpoints=0, "
                             "or was imported), so there is nothing to resume; start a new run "
                             "(model.init_from takes a Hugging Face folder)")
        _check_writable(run_dir)
        log(f"{run_dir} has no checkpoint yet: starting it again from step 0")
        return Resumed(run_dir)
    try:
        # paths as the run now holds them: absolute (a checkpoint from before they were made so: from here)
        saved = absolute_inputs(from_dict(record.get("config") or {}, source=f"{path}/state.json"))
    except LmlabError as e:
        raise checkpoint.CheckpointError(f"checkpoint {path} was written by another lmlab version: {e}") from None
    try:
        changed = config_changes(saved, config)
    except LmlabError as e:
        raise LmlabError(f"cannot resume {run_dir}: {e}") from None
    _check_budget(run_dir, config, record)
    _check_writable(run_dir)
    config.model = saved.model  # the resolved model the checkpoint holds (vocab_size, d_ff, ... filled in)
    return Resumed(run_dir, path, record, changed)
