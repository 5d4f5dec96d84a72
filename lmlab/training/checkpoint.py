"""Training checkpoints: atomic save, distrustful load, everything exact resume needs.

    runs/NAME/checkpoints/
      step_000200/
        model.safetensors       the weights, as the run's final model.safetensors (a tied matrix once)
        optimizer.safetensors   the optimizer's per-parameter tensors (AdamW: step, exp_avg, exp_avg_sq)
        state.json              everything else, and the size and sha256 of the two files above
      step_000300/
      latest                    the name of the newest checkpoint, for people and scripts

Design choices:
- Nothing is ever unpickled. Tensors are safetensors, the rest is JSON (RNG
  states as base64 bytes and integer lists). A checkpoint from a stranger can
  hold wrong numbers but cannot run code; a pickle (torch.save) where a tensor
  file should be is refused by name before any parser sees it.
- A checkpoint is written into a temporary directory (.step_000200.tmp-XXXX),
  every file fsynced, then the directory is renamed into place: the rename is
  the commit. A crash at any moment leaves the old checkpoints, or the old ones
  plus the new one; `latest` is rewritten (atomically) after the rename, and
  old checkpoints beyond `keep` are renamed away before they are deleted, so a
  step_* directory is always complete.
- Loading trusts nothing: state.json must parse and every file must have the
  recorded size and sha256. The newest checkpoint that passes is used; the
  ones skipped are named with the reason.
- Exact resume needs the whole state: weights; optimizer moments and step
  counts; the grad scaler; every RNG (Python, NumPy, torch CPU and CUDA); the
  state of the LR schedule and the stop rules; the step (the data order is a
  function of (seed, step, micro, rank), so the step *is* the data position);
  the loop's counters (its TrainState: step, tokens, training time, best and
  last losses, under the same state.json keys since format 1, so older
  checkpoints still load); wall time; and how many bytes of metrics.jsonl
  existed, so resuming cuts the log back to that point.
- Optimizer hyperparameters come from the config, not the checkpoint: only the
  per-parameter state is loaded, so an allowed change (optim.lr, weight_decay,
  ...) takes effect and an unchanged config gives the very same numbers.
- A checkpoint that cannot be written (disk full, no permission) ends the run
  (status failed, see failure.py) with the previous checkpoint intact and
  named; with train.on_checkpoint_error=continue it is a warning instead and
  the next trigger tries again (`Checkpointer`).
"""

import base64
import json
import math
import os
import random
import re
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from lmlab import atomic
from lmlab.data.integrity import file_sha256
from lmlab.errors import LmlabError
from lmlab.training.distributed import Parallel

FORMAT = 1
DIR = "checkpoints"
LATEST = "latest"
MODEL, OPTIMIZER, STATE = "model.safetensors", "optimizer.safetensors", "state.json"
NAME = re.compile(r"step_(\d+)")


class CheckpointError(LmlabError):
    """A checkpoint that is incomplete, corrupt, or not a checkpoint at all."""


class CheckpointWriteError(LmlabError):
    """A checkpoint the disk refused, under train.on_checkpoint_error=stop: the run ends (status failed)."""


def step_name(step):
    return f"step_{step:06d}"


def list_checkpoints(run_dir):
    """[(step, path)] of the step_* directories in run_dir/checkpoints, oldest first (not yet verified)."""
    root = Path(run_dir) / DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := NAME.fullmatch(p.name))]
    return sorted(found)


# ---------------------------------------------------------------- RNG states as plain JSON


def _b64(tensor):
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text):
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def rng_state():
    """Every RNG a training step may draw from, as JSON-able values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": _b64(torch.get_rng_state()),
        # only when CUDA is in use: asking for the states would initialise it on a CPU run
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_initialized() else [],
    }


def set_rng_state(state, log=print):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])
    elif cuda:
        log(f"note: the checkpoint has {len(cuda)} CUDA RNG state(s) and this machine "
            f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} GPU(s); CUDA RNGs not restored")


# ---------------------------------------------------------------- optimizer state: tensors + JSON


def _split_optimizer(state_dict):
    """(tensors, json_part) of an optimizer state_dict; tensors keyed '<param index>.<name>'."""
    tensors, per_param = {}, {}
    for index, entry in state_dict["state"].items():
        per_param[str(index)] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                key = f"{index}.{name}"
                tensors[key] = value.detach().cpu().contiguous()
                per_param[str(index)][name] = {"tensor": key}
            else:
                per_param[str(index)][name] = value
    return tensors, {"state": per_param, "param_groups": state_dict["param_groups"]}


def _join_optimizer(tensors, part):
    state = {}
    for index, entry in part["state"].items():
        state[int(index)] = {name: tensors[value["tensor"]] if isinstance(value, dict) and "tensor" in value else value
                             for name, value in entry.items()}
    return {"state": state, "param_groups": part["param_groups"]}


# ---------------------------------------------------------------- writing


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)




def _jsonable(value):
    """None for the floats JSON cannot hold (inf / nan): state.json stays strict JSON."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def save(run_dir, step, model, optimizer, scaler, fields, stateful=None, keep=2, parallel=None):
    """Write checkpoints/step_NNNNNN atomically, point `latest` at it, keep the newest `keep`; returns its path.

    `fields`: the JSON-able rest of state.json (the loop's TrainState, the size of metrics.jsonl,
    ...). `stateful`: {name: object with state_dict()} such as the LR schedule and the stop rules.
    Raises OSError when the disk says no; nothing partial is left behind and the previous
    checkpoints are untouched. Under torchrun every rank calls it (gathering the state is
    collective) and rank 0 writes; the others return None.
    """
    from safetensors.torch import save_file

    parallel = parallel or Parallel()
    weights = _weights(model, parallel.full_weights(model))
    optimizer_state = parallel.full_optimizer_state(model, optimizer)
    rngs = parallel.gather(rng_state())
    states = {name: obj.state_dict() for name, obj in (stateful or {}).items()  # on every rank: some gather
              if hasattr(obj, "state_dict")}
    if not parallel.is_main:
        return None
    root = Path(run_dir) / DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = atomic.temp_dir(root, prefix=f".{final.name}.tmp-")
    try:
        atomic.write_tensors(save_file, weights, tmp / MODEL)
        tensors, optimizer_part = _split_optimizer(optimizer_state)
        atomic.write_tensors(save_file, tensors, tmp / OPTIMIZER)
        files = {}
        for name in (MODEL, OPTIMIZER):
            os.chmod(tmp / name, 0o666 & ~atomic.current_umask())  # safetensors writes owner-only files
            _fsync(tmp / name)
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
        record = {
            "format": FORMAT, "step": step, **{k: _jsonable(v) for k, v in fields.items()},
            "rng": rngs[0], **({"rng_ranks": rngs} if len(rngs) > 1 else {}), "optimizer": optimizer_part, "scaler": scaler.state_dict(),
            "stateful": states,
            "files": files,
        }
        (tmp / STATE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        _fsync(tmp / STATE)
        os.chmod(tmp, 0o777 & ~atomic.current_umask())  # mkdtemp makes directories owner-only
        _fsync(tmp)
        if final.exists():  # left by a run that crashed between this rename and `latest`: replace it
            _discard(final)
        os.rename(tmp, final)  # the commit
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(root)
    atomic.write_text(root / LATEST, final.name + "\n")
    prune(run_dir, keep)
    return final


def _weights(model, state=None):
    """The weights as the run's model.safetensors holds them: Hugging Face names, a tied matrix once."""
    from lmlab.model import weights

    return weights.to_save(model, state)



def _discard(path):
    """Rename a directory out of the step_* namespace, then delete it: a step_* directory is never half-deleted."""
    trash = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune(run_dir, keep):
    """Delete all but the newest `keep` checkpoints, and what crashed writes left behind."""
    root = Path(run_dir) / DIR
    for _, path in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        _discard(path)
    for leftover in root.glob(".step_*"):  # temporary or half-deleted directories of crashed processes
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in root.glob(f".{LATEST}.*.tmp"):  # a pointer write cut short
        leftover.unlink(missing_ok=True)


# ---------------------------------------------------------------- reading


def _format_problem(path, sizes_checked=False):
    """Why the file at `path` is not a safetensors file, or "" when its first bytes look right.

    Pickles are named first, whatever else is wrong: they are the dangerous kind.
    """
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "is a Python pickle, not safetensors; lmlab never unpickles a checkpoint (a pickle can run code)"
    if head[:4] == b"PK\x03\x04":
        return "is a zip archive (torch.save format), not safetensors; lmlab never unpickles a checkpoint"
    if sizes_checked and (len(head) < 9 or head[8:9] != b"{"
                          or int.from_bytes(head[:8], "little") + 8 > path.stat().st_size):
        return "is not a safetensors file"
    return ""


def verify(path):
    """The parsed state.json of the checkpoint directory `path`, after checking every file it lists."""
    path = Path(path)
    where = f"checkpoint {path}"
    state_path = path / STATE
    if not state_path.is_file():
        raise CheckpointError(f"{where} has no {STATE} (incomplete)")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{where}: {STATE} is not valid JSON (corrupt or truncated)") from None
    required = {"format", "step", "files", "rng", "optimizer", "scaler"}
    if not isinstance(state, dict) or not required <= state.keys():
        raise CheckpointError(f"{where}: {STATE} is not an lmlab checkpoint record")
    if state["format"] != FORMAT:
        raise CheckpointError(f"{where} has format {state['format']!r}; this lmlab reads format {FORMAT}")
    files = state["files"]
    if not isinstance(files, dict) or set(files) != {MODEL, OPTIMIZER}:
        raise CheckpointError(f"{where}: {STATE} must list exactly {MODEL} and {OPTIMIZER}")
    for name, info in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{where} has no {name} (incomplete)")
        problem = _format_problem(file)
        size = file.stat().st_size
        if not problem and size != info.get("bytes"):
            problem = f"has {size} bytes, {info.get('bytes')} were written (truncated?)"
        problem = problem or _format_problem(file, sizes_checked=True)
        if problem:
            raise CheckpointError(f"{where}: {name} {problem}")
        if file_sha256(file) != info.get("sha256"):
            raise CheckpointError(f"{where}: {name} does not match its sha256 (corrupt)")
    return state


def latest(run_dir, log=print):
    """(path, state) of the newest checkpoint that verifies, or (None, None) when there is none.

    Raises CheckpointError when checkpoints exist but none verifies; a newer broken one that is
    passed over is logged with its reason.
    """
    problems = []
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            state = verify(path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        for problem in problems:
            log(f"warning: {problem}; using the older {path.name}")
        return path, state
    if problems:
        raise CheckpointError(f"no usable checkpoint in {Path(run_dir) / DIR}: " + "; ".join(problems)
                              + "; put back a good copy, or start a new run")
    return None, None


def load_into(path, state, model, optimizer, scaler, stateful=None, log=print, parallel=None):
    """Put a verified checkpoint's weights, optimizer state, scaler, RNGs and stateful objects in place.

    Under torchrun every rank loads the full state (FSDP keeps its own shard of it) and its own RNGs.
    """
    from safetensors.torch import load_file

    from lmlab.model import weights as weights_io

    path = Path(path)
    parallel = parallel or Parallel()
    try:
        weights = weights_io.to_load(model, load_file(str(path / MODEL)))
    except weights_io.WeightsMismatch as e:
        raise CheckpointError(f"checkpoint {path}: {MODEL} does not fit the model ({e})") from None
    except Exception as e:  # safetensors raises its own error type on a damaged file
        raise CheckpointError(f"checkpoint {path}: {MODEL} cannot be read ({e})") from None
    try:
        tensors = load_file(str(path / OPTIMIZER))
        saved = _join_optimizer(tensors, state["optimizer"])
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: {OPTIMIZER} cannot be read ({e})") from None
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        parallel.load_full_state(model, optimizer, weights, saved)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path}: the optimizer state does not fit this model ({e})") from None
    for group, hyper in zip(optimizer.param_groups, configured):
        group.update(hyper)  # the config's hyperparameters, not the checkpoint's (see the module docstring)
    if state["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    for name, obj in (stateful or {}).items():
        if name in state.get("stateful", {}) and hasattr(obj, "load_state_dict"):
            obj.load_state_dict(state["stateful"][name])
    set_rng_state(_rng_for(state, parallel, log), log=log)


def _rng_for(state, parallel, log):
    """This rank's RNG states; with another world size than the checkpoint's, rank 0's for all (noted)."""
    ranks = state.get("rng_ranks") or [state["rng"]]
    if len(ranks) == parallel.world_size:
        return ranks[parallel.rank]
    if parallel.is_main:
        log(f"note: the checkpoint was written by {len(ranks)} process(es), this run has {parallel.world_size}: "
            "data order and weights continue exactly, random draws (dropout) start from rank 0's state")
    return ranks[0]


# ---------------------------------------------------------------- when to save, and saving without dying


class Checkpointer:
    """Triggers (train.checkpoint_every steps, train.checkpoint_minutes of training time) and a save that warns.

    The trainer calls `due` after every step and `save` when it says so, and once more at the
    end or on a stop signal; a step already saved is not written twice.
    """

    def __init__(self, run_dir, config, data_meta, log=print):
        t = config.train
        self.run_dir, self.log = Path(run_dir), log
        self.every, self.seconds, self.keep = t.checkpoint_every, t.checkpoint_minutes * 60, t.keep_checkpoints
        self.config = config
        self.data = data_identity(data_meta)
        self.last_step, self.last_elapsed = None, 0.0

    def due(self, step, elapsed):
        if not self.keep:
            return False
        return bool(self.every and step % self.every == 0) or bool(
            self.seconds and elapsed - self.last_elapsed >= self.seconds)

    def save(self, state, model, optimizer, scaler, metrics, stateful=None, parallel=None):
        """Save the run at `state` (a TrainState); True when written.

        A failed write raises CheckpointWriteError (train.on_checkpoint_error=stop), or is logged
        (one line) and training goes on (continue).
        """
        step = state.step
        if not self.keep or step == self.last_step or step == 0:
            return False
        self.last_step, self.last_elapsed = step, state.elapsed_s  # a failure waits for the next trigger
        from lmlab.config import to_dict

        main = parallel is None or parallel.is_main
        fields = {**state.to_checkpoint(), "metrics_bytes": _metrics_bytes(metrics) if main else 0,
                  "wall_s": _wall_s(metrics), "data": self.data, "config": to_dict(self.config)}
        try:
            save(self.run_dir, step, model, optimizer, scaler, fields, stateful=stateful, keep=self.keep,
                 parallel=parallel)
        except OSError as e:
            reason = e.strerror or str(e)
            if (self.run_dir / DIR / step_name(step)).is_dir():  # committed; `latest` or pruning failed after
                self.log(f"warning: checkpoint {step_name(step)} written, but updating {DIR}/{LATEST} or removing "
                         f"old checkpoints failed ({reason}); training goes on")
                return True
            previous = list_checkpoints(self.run_dir)
            still = f"the latest checkpoint is still {previous[-1][1].name}" if previous else "there is no earlier checkpoint"
            what = f"checkpoint at step {step} not written to {self.run_dir / DIR} ({reason}{_room(self.run_dir, model, self.config.optim.name)})"
            if self.config.train.on_checkpoint_error == "stop":
                raise CheckpointWriteError(what + " (train.on_checkpoint_error=continue trains on without it)") from None
            self.log(f"warning: {what}; {still}; training goes on")
            return False
        return True


def _room(run_dir, model, optimizer_name):
    """', N bytes needed, M free' for a message about a write that failed."""
    from lmlab.training import diskspace

    try:
        one = diskspace.checkpoint_bytes(model, optimizer_name)
        return f"; a checkpoint takes about {one:,} bytes, {diskspace.free_bytes(run_dir):,} are free"
    except OSError:
        return ""


def data_identity(meta):
    """What must not change under a run: the tokenizer and the size of each split."""
    return {"tokenizer": meta["tokenizer_fingerprint"],
            **{f"{split}_tokens": info["tokens"] for split, info in meta["splits"].items()}}


def _metrics_bytes(metrics):
    """Size of metrics.jsonl now (MetricsLog flushes every line, so the file ends with a whole one)."""
    return os.path.getsize(metrics.path)


def _wall_s(metrics):
    started = getattr(metrics, "started", None)
    return round(time.perf_counter() - started, 3) if started is not None else None
