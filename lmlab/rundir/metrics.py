"""The run's record: metrics.jsonl (one JSON object per event), summary.json and env.json.

Design choices:
- metrics.jsonl is appended line by line and flushed, so it survives a crash
  and can be tailed while training. Every event carries `step`, `tokens`,
  `elapsed_s` (training time, without evaluation, sampling or saving) and
  `wall_s` (wall-clock seconds since the run started, everything included),
  so curves can be drawn against steps, tokens, training time or wall time.
- Kinds of events: train (loss, lr, grad_norm, tokens_per_s, mfu, peak_mem_mb),
  validation (val_loss, val_ppl, val_bpb) and, now and then, "kind": "norms"
  (see norms.py).
- The local file is always written; optional sinks (TensorBoard, wandb, the
  plain-log status line, see sinks.py) get a copy of every event. A sink that
  fails is dropped with one warning; training goes on.
- Readers tolerate a cut last line (a crash mid-write, or a run still being
  written) and say so; a bad line anywhere else is corruption and an error.
- JSON has no NaN / inf: they are written as strings ("nan") and read back as floats.
- env.json records what a run ran on and from: versions, device, threads,
  the git commit of the user's working directory, the command line.
"""

import json
import math
import time
import warnings
from pathlib import Path

from lmlab import atomic
from lmlab.errors import LmlabError

NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def finite(x):
    """True for a number that can be plotted or ranked (not NaN, inf, None or a string)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def jsonable(value):
    """JSON has no NaN/inf: write them as strings a reader can still parse (nested values too)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def _restore(value):
    if isinstance(value, str) and value in NON_FINITE:
        return NON_FINITE[value]
    if isinstance(value, dict):
        return {k: _restore(v) for k, v in value.items()}
    return value


class MetricsLog:
    """Appends events to metrics.jsonl (adding wall_s) and hands each to the sinks."""

    def __init__(self, path, sinks=(), started=None):
        self.path = Path(path)
        self.sinks = list(sinks)
        self.started = time.perf_counter() if started is None else started  # a time.perf_counter() value
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)

    def write(self, **event):
        if "wall_s" not in event:  # right after the clocks, for people reading the file
            clocks = {k: event.pop(k) for k in ("step", "tokens", "elapsed_s") if k in event}
            event = {**clocks, "wall_s": round(time.perf_counter() - self.started, 3), **event}
        self._file.write(json.dumps(jsonable(event)) + "\n")
        for sink in list(self.sinks):
            try:
                sink.write(event)
            except Exception as e:  # a broken dashboard must not stop training; the local file has it all
                warnings.warn(f"metrics sink {type(sink).__name__} failed and is switched off: {e}", stacklevel=2)
                self.sinks.remove(sink)

    def close(self):
        self._file.close()
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:
                warnings.warn(f"closing metrics sink {type(sink).__name__} failed: {e}", stacklevel=2)
        self.sinks = []


class NoMetrics:
    """What the ranks other than 0 of a torchrun job log: nothing (rank 0 writes metrics.jsonl for all)."""

    path = None

    def __init__(self, started=None):
        self.sinks = []
        self.started = time.perf_counter() if started is None else started

    def write(self, **event):
        pass

    def close(self):
        pass


def scan_metrics(path):
    """(events, problem) of a metrics.jsonl file; problem is "" or says the last line was cut.

    A last line that is not valid JSON is what a crash mid-write (or a run that is
    writing right now) leaves: it is skipped and reported. A bad line before the
    last one is an LmlabError.
    """
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"{path} does not exist: {path.parent} is not a run directory, or its run never started")
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    events, problem = [], ""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[number:]):
                raise LmlabError(f"{path}:{number} is not valid JSON; the file is damaged") from None
            problem = f"last line of {path.name} is cut (the run crashed mid-write, or is still writing)"
            continue
        if not isinstance(event, dict):
            raise LmlabError(f"{path}:{number} is not a JSON object; the file is damaged")
        events.append(_restore(event))
    return events, problem


def read_metrics(path):
    """All complete events of a metrics.jsonl file, as dicts (a cut last line is skipped)."""
    return scan_metrics(path)[0]


def write_summary(run_dir, summary):
    atomic.write_text(Path(run_dir) / "summary.json", json.dumps(jsonable(summary), indent=2) + "\n")
