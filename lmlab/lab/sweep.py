"""Sweeps: many `train` runs over a grid or random samples, unattended, in one directory.

    lmlab sweep --config base.toml --grid optim.lr=1e-3,3e-3,1e-2 --out sweeps/lr [KEY=VALUE ...]

    sweeps/lr/
      sweep.json          the command, the base config and every trial: values, status, metric
      sweep.md            the table, sorted by the metric (diverged and failed runs last)
      best.toml           the best trial's resolved config: `lmlab train --config best.toml`
      runs/<trial>/       one run directory per trial (the usual contract)
      logs/<trial>.log    what each trial printed
      configs/<trial>.toml  each trial's config (what the worker processes train)
      plots/curves.png    loss curves of every trial
      plots/<key>.png     the metric against each swept value, diverged runs marked x

Design choices:
- A trial is the base config plus its values, applied with the same checked
  `set_key` as command-line overrides; every trial's config is built and
  validated before the first one starts, so a bad grid (unknown key, wrong
  type, empty list, impossible value) costs nothing.
- Trials are named by index and values (`002-lr=0.01`), so the same command
  gives the same names: a rerun skips every trial whose summary.json has a
  final status (completed, diverged, target_reached, time_budget); a trial
  with a checkpoint continues from it (train.resume=auto, lmlab/training/resume.py),
  any other partial trial starts again from scratch (its directory removed).
- When optim.lr is swept and optim.min_lr is not, min_lr keeps its base ratio
  to lr (so a low-lr trial is not refused for min_lr > lr, and every trial
  decays by the same factor). `lr_scaling` (linear, sqrt) multiplies lr and
  min_lr by the trial's batch (batch_size x grad_accum) over the base batch.
- One worker (the default) trains in this process, one trial after another.
  With N workers each trial is a `python -m lmlab.cli train` subprocess, on
  its own GPU (CUDA_VISIBLE_DEVICES) when there are several, or with
  cores / N torch threads each on CPU; a worker dies with the sweep (Linux).
- A trial that diverges or raises is recorded and the sweep goes on; Ctrl-C
  stops the sweep (the interrupted trial restarts on the next run). Once the
  tables are written, trials that failed (an error: a missing package, out of
  memory; not a divergence, which is a result) make `lmlab sweep` exit 2 with
  one line naming them and why (`failed_line`).
- Random search: `--random KEY=loguniform:LO:HI` (or uniform:LO:HI), `--trials N`
  draws per grid point from `--seed`; values are rounded to 3 significant
  digits so names, configs and tables agree. Optuna / Ray Tune / submitit are
  not needed: this runner is plain Python.
"""

import copy
import itertools
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path

from lmlab.rundir.status import FAILED, FINAL, GOOD, INTERRUPTED
from lmlab import atomic
from lmlab.config import all_keys, did_you_mean, field_type, flat_keys, load_config, set_key, to_toml, validate
from lmlab.errors import LmlabError

METRIC_ALIASES = {"time_to_target": "target.elapsed_s", "steps_to_target": "target.step",
                  "tokens_to_target": "target.tokens"}
IGNORED_BASE_KEYS = ("train.run_name", "train.runs_dir", "train.threads")  # set per trial by the sweep


@dataclass
class Trial:
    name: str
    values: dict  # dotted key -> value (a string as given, or a sampled number)
    config: object = None
    record: dict = field(default_factory=dict)


# ---------------------------------------------------------------- parsing and validation


def parse_grid(items):
    """[(key, [values])] from ["optim.lr=1e-3,3e-3", ...]."""
    axes = []
    for item in items:
        key, eq, values = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise LmlabError(f"--grid '{item}' is not KEY=V1,V2,... (for example optim.lr=1e-3,3e-3,1e-2)")
        values = [v.strip() for v in values.split(",") if v.strip()]
        if not values:
            raise LmlabError(f"--grid {key}= has no values; give at least one, e.g. {key}=1,2")
        if len(set(values)) != len(values):
            raise LmlabError(f"--grid {key} repeats a value: {','.join(values)}")
        if key in (k for k, _ in axes):
            raise LmlabError(f"--grid {key} is given twice; put all its values in one --grid")
        axes.append((key, values))
    return axes


def parse_random(items):
    """[(key, kind, low, high)] from ["optim.lr=loguniform:1e-4:1e-2", ...]."""
    specs = []
    for item in items:
        key, eq, spec = item.partition("=")
        key = key.strip()
        kind, *bounds = spec.split(":")
        try:
            low, high = (float(b) for b in bounds)
        except ValueError:
            low = high = None
        if not eq or kind not in ("loguniform", "uniform") or low is None:
            raise LmlabError(f"--random '{item}' is not KEY=loguniform:LOW:HIGH or KEY=uniform:LOW:HIGH")
        if not low < high or (kind == "loguniform" and low <= 0):
            raise LmlabError(f"--random {key}: need LOW < HIGH{' and LOW > 0 for loguniform' * (kind == 'loguniform')}, "
                             f"got {low:g}:{high:g}")
        specs.append((key, kind, low, high))
    return specs


def _check_axes(base, grid, random_specs):
    """Unknown keys, list-valued keys and values of the wrong type, before any trial is built."""
    keys = [k for k, _ in grid] + [k for k, *_ in random_specs]
    for key in keys:
        if key not in all_keys():
            raise LmlabError(f"unknown config key '{key}'{did_you_mean(key, all_keys())}")
        section, _, name = key.partition(".")
        if key != "name" and typing.get_origin(field_type(type(getattr(base, section)), name)) is list:
            raise LmlabError(f"{key} is a list; lists cannot be swept (commas separate the values)")
    for key, values in grid:
        for value in values:
            set_key(copy.deepcopy(base), key, value)  # wrong type -> "config key 'optim.lr' wants a number"
    for key, *_ in random_specs:
        if type(getattr_dotted(base, key)) not in (int, float):
            raise LmlabError(f"--random {key}: only numeric keys can be sampled; use --grid for {key}")


def getattr_dotted(config, key):
    if key == "name":
        return config.name
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name)


def _short_names(keys):
    """'optim.lr' -> 'lr' unless two swept keys share the last part."""
    lasts = [k.rpartition(".")[2] for k in keys]
    return {k: (last if lasts.count(last) == 1 else k) for k, last in zip(keys, lasts)}


def _text(value):
    return value if isinstance(value, str) else f"{value:g}"


def make_trials(base, grid=(), random_specs=(), n_trials=0, seed=0):
    """The trials of a sweep, in a fixed order: grid points x random draws."""
    if not grid and not random_specs:
        raise LmlabError("nothing to sweep: give --grid KEY=V1,V2,... or --random KEY=loguniform:LOW:HIGH --trials N")
    if random_specs and n_trials <= 0:
        raise LmlabError("--random needs --trials N (the number of draws), N >= 1")
    if n_trials and not random_specs:
        raise LmlabError("--trials counts random draws; give --random KEY=loguniform:LOW:HIGH too")
    keys = [k for k, _ in grid] + [k for k, *_ in random_specs]
    if len(set(keys)) != len(keys):
        raise LmlabError("a key is both in --grid and --random; sweep it one way")
    _check_axes(base, grid, random_specs)
    rng = random.Random(seed)
    short = _short_names(keys)
    trials = []
    for point in itertools.product(*(values for _, values in grid)):
        for _ in range(n_trials or 1):
            values = dict(zip((k for k, _ in grid), point))
            for key, kind, low, high in random_specs:
                x = math.exp(rng.uniform(math.log(low), math.log(high))) if kind == "loguniform" else rng.uniform(low, high)
                x = float(f"{x:.3g}")
                values[key] = int(round(x)) if isinstance(getattr_dotted(base, key), int) else x
            label = "_".join(f"{short[k]}={_text(v)}" for k, v in values.items()).replace("/", "-").replace(" ", "")
            trials.append(Trial(name=f"{len(trials):03d}-{label}", values=values))
    return trials


def trial_config(base, values, lr_scaling=""):
    """The base config with a trial's values applied (and min_lr / lr scaling rules)."""
    config = copy.deepcopy(base)
    for key, value in values.items():
        set_key(config, key, value if isinstance(value, str) else repr(value))
    if "optim.lr" in values and "optim.min_lr" not in values and base.optim.lr > 0:
        config.optim.min_lr = base.optim.min_lr * config.optim.lr / base.optim.lr  # keep the decay ratio
    if lr_scaling:
        ratio = (config.train.batch_size * config.train.grad_accum) / (base.train.batch_size * base.train.grad_accum)
        factor = ratio if lr_scaling == "linear" else math.sqrt(ratio)
        config.optim.lr *= factor
        config.optim.min_lr *= factor
    validate(config)
    return config


# ---------------------------------------------------------------- running


def _check_same_sweep(out, base, trials):
    path = out / "sweep.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise LmlabError(f"{path} is not valid JSON; move the directory away to start a new sweep") from None
    new = flat_keys(base)  # keys that only one side has come from another lmlab version: not a difference
    diff = [f"{k}: {old['base'][k]!r} -> {new[k]!r}" for k in sorted(set(old["base"]) & set(new))
            if k not in IGNORED_BASE_KEYS and old["base"][k] != new[k]]
    if diff:
        raise LmlabError(f"{out} holds a sweep of another base config ({'; '.join(diff[:3])}); "
                         "use another --out or the same config and overrides")


def _summary(run_dir):
    try:
        return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def metric_of(summary, metric):
    value = summary
    for part in METRIC_ALIASES.get(metric, metric).split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _record(trial, run_dir, metric, error=None):
    summary = _summary(run_dir) or {}
    status = summary.get("status", FAILED if error else "incomplete")
    return {
        "name": trial.name, "values": trial.values, "run_dir": str(run_dir), "status": status,
        "metric": metric_of(summary, metric) if status in GOOD else None,
        "lr": trial.config.optim.lr, "batch": trial.config.train.batch_size * trial.config.train.grad_accum,
        **{k: summary.get(k) for k in ("best_val_loss", "final_val_loss", "steps", "tokens", "elapsed_s",
                                      "target", "diverged_at", "nonfinite_at")},
        **({"error": error} if error else {}),
    }


def _die_with_parent():
    """In a worker: ask Linux to send SIGTERM when the sweep process dies (no orphans after a kill)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Sweep:
    def __init__(self, out, base, trials, metric="best_val_loss", lr_scaling="", workers=1, log=print, command=None):
        self.out, self.base, self.trials = Path(out), base, trials
        self.metric, self.lr_scaling, self.workers, self.log = metric, lr_scaling, workers, log
        self.command = command or {}
        for trial in trials:  # every trial's config is checked before the first one runs
            try:
                trial.config = trial_config(base, trial.values, lr_scaling)
            except LmlabError as e:
                raise LmlabError(f"trial {trial.name}: {e}") from None
            trial.config.train.runs_dir = str(self.out / "runs")
            trial.config.train.run_name = trial.name
        _check_same_sweep(self.out, base, trials)

    def run_dir(self, trial):
        return self.out / "runs" / trial.name

    def save(self):
        atomic.write_text(self.out / "sweep.json", json.dumps({
            **self.command, "metric": self.metric, "lr_scaling": self.lr_scaling, "base": flat_keys(self.base),
            "trials": [t.record or {"name": t.name, "values": t.values, "status": "pending"} for t in self.trials],
        }, indent=2) + "\n")

    def run(self):
        """Run every trial not done yet; returns the trials with their records."""
        for sub in ("runs", "logs", "configs", "plots"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        todo = []
        for trial in self.trials:
            summary = _summary(self.run_dir(trial))
            if summary and summary.get("status") in FINAL:
                trial.record = _record(trial, self.run_dir(trial), self.metric)
            else:
                todo.append(trial)
        done = len(self.trials) - len(todo)
        self.log(f"sweep {self.out}: {len(self.trials)} trials" + (f", {done} done before (skipped)" if done else "")
                 + f", {self.workers} worker{'s' * (self.workers > 1)}")
        self.save()
        try:
            if self.workers <= 1:
                for trial in todo:
                    self._run_here(trial)
            else:
                self._run_workers(todo)
        finally:
            self.save()
        return self.trials

    def _start(self, trial, fresh=False):
        """Prepare a trial's directory and config; True when it resumes from a checkpoint."""
        run_dir = self.run_dir(trial)
        trial.config.train.resume = ""
        if not fresh and (run_dir / "checkpoints" / "latest").is_file():  # interrupted after a checkpoint
            trial.config.train.resume = "auto"
            self.log(f"[{trial.name}] resume from its checkpoint")
        else:
            if run_dir.exists():  # an attempt that left no checkpoint: start it again from scratch
                shutil.rmtree(run_dir)
            self.log(f"[{trial.name}] start")
        atomic.write_text(self.out / "configs" / f"{trial.name}.toml", to_toml(trial.config))
        return trial.config.train.resume == "auto"

    def _finish(self, trial, error=None):
        trial.record = _record(trial, self.run_dir(trial), self.metric, error)
        r = trial.record
        metric = f"{self.metric} {r['metric']:.4g}" if r["metric"] is not None else ""
        self.log(f"[{trial.name}] {r['status']} {metric}" + (f" ({error})" if error else ""))
        self.save()

    def _run_here(self, trial):
        from lmlab.training.loop import train

        resuming = self._start(trial)
        error = None
        with open(self.out / "logs" / f"{trial.name}.log", "w", encoding="utf-8") as f:
            def log(*parts):
                print(*parts, file=f, flush=True)
            try:
                try:
                    train(copy.deepcopy(trial.config), log=log)
                except LmlabError as e:
                    if not resuming:
                        raise
                    self.log(f"[{trial.name}] cannot resume ({e}); starting it again")
                    self._start(trial, fresh=True)
                    train(copy.deepcopy(trial.config), log=log)
            except LmlabError as e:
                error = str(e)
            except Exception as e:  # a bug or out-of-memory in one trial must not take the sweep down
                traceback.print_exc(file=f)
                error = f"{type(e).__name__}: {e}"
        self._finish(trial, error)
        if trial.record["status"] == INTERRUPTED:
            raise KeyboardInterrupt

    def _run_workers(self, todo):
        import torch

        gpus = torch.cuda.device_count() if self.base.train.device in ("auto", "cuda") else 0
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        free, running, queue = list(range(self.workers)), {}, [(trial, False) for trial in todo]
        try:
            while queue or running:
                while queue and free:
                    (trial, fresh), slot = queue.pop(0), free.pop(0)
                    env = dict(os.environ)
                    if gpus:
                        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
                    elif not trial.config.train.threads:
                        trial.config.train.threads = threads  # share the cores between the workers
                    resuming = self._start(trial, fresh)
                    log_file = open(self.out / "logs" / f"{trial.name}.log", "a" if fresh else "w", encoding="utf-8")
                    process = subprocess.Popen(
                        [sys.executable, "-m", "lmlab.cli", "train", "--config",
                         str(self.out / "configs" / f"{trial.name}.toml")],
                        stdout=log_file, stderr=subprocess.STDOUT, env=env,
                        start_new_session=True,  # Ctrl-C reaches the sweep only; it forwards one SIGINT
                        preexec_fn=_die_with_parent if sys.platform == "linux" else None)
                    running[process] = (trial, slot, log_file, resuming)
                for process in [p for p in running if p.poll() is not None]:
                    trial, slot, log_file, resuming = running.pop(process)
                    log_file.close()
                    free.append(slot)
                    error = None if process.returncode == 0 else _last_line(self.out / "logs" / f"{trial.name}.log")
                    if error and resuming and process.returncode == 2:  # the checkpoint would not resume
                        self.log(f"[{trial.name}] cannot resume ({error}); starting it again")
                        queue.insert(0, (trial, True))
                        continue
                    self._finish(trial, error)
                    if trial.record["status"] == INTERRUPTED:
                        raise KeyboardInterrupt
                time.sleep(0.2)
        except BaseException:
            for process in running:
                process.send_signal(signal.SIGINT)  # workers save an interrupted run and exit
            for process, (trial, _, log_file, _) in running.items():
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                log_file.close()
                trial.record = _record(trial, self.run_dir(trial), self.metric)
            raise


def _last_line(path):
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "the worker exited without output"


def failed_line(out, trials, shown=3):
    """One line naming the trials that failed (an error, not a divergence) and why; '' when none did.

    Why: an unattended sweep goes on after a failed trial, but its exit status
    must say that the sweep is not whole (a script or CI checks it), and the
    user must learn which trials to fix without reading every log.
    """
    failed = [t for t in trials if t.record.get("status") == FAILED]
    if not failed:
        return ""
    causes = [f"{t.name} ({_cause(t)})" for t in failed[:shown]]
    more = f" and {len(failed) - shown} more" if len(failed) > shown else ""
    return (f"sweep {out}: {len(failed)} of {len(trials)} trials failed: {'; '.join(causes)}{more}; the others' "
            f"results are in {Path(out) / 'sweep.md'}; once the cause is fixed, the same command runs the failed "
            "trials again and skips the finished ones")


def _cause(trial):
    error = trial.record.get("error") or f"see {trial.record.get('run_dir', trial.name)}"
    return error.removeprefix("lmlab: error: ")


def run_sweep(config_path=None, overrides=(), grid=(), random_items=(), n_trials=0, seed=0, out=None,
              workers=1, metric="best_val_loss", lr_scaling="", log=print):
    """Parse, check and run a sweep; write sweep.json, sweep.md, best.toml and plots. Returns the trials."""
    from lmlab.lab import sweep_report

    if not out:
        raise LmlabError("give the sweep directory with --out DIR")
    if workers < 1:
        raise LmlabError(f"--workers must be >= 1, got {workers}")
    if lr_scaling not in ("", "linear", "sqrt"):
        raise LmlabError(f"--lr-scaling is linear or sqrt, got {lr_scaling!r}")
    base = load_config(config_path, overrides)
    trials = make_trials(base, parse_grid(grid), parse_random(random_items), n_trials, seed)
    command = {"config": str(config_path or ""), "overrides": list(overrides), "grid": list(grid),
               "random": list(random_items), "trials_per_point": n_trials, "seed": seed}
    sweep = Sweep(out, base, trials, metric=metric, lr_scaling=lr_scaling, workers=workers, log=log, command=command)
    sweep.run()
    sweep_report.write_all(sweep.out, trials, [k for k in trials[0].values], metric, log=log)
    return trials
