"""Reading run directories back: one record per run, the keys in which runs differ, the runs table.

Design choices:
- A run is read from its files only (config.toml, metrics.jsonl, summary.json,
  env.json, notes.md, samples.md), never by loading the model, so `lmlab runs`
  over a hundred runs is instant and works on a run that is still training.
- The config is read as plain TOML and flattened to dotted keys, not through
  the Config dataclasses: runs made by another lmlab version (with keys this
  one does not know) still list and compare.
- The keys in which runs differ are found, not asked for: every dotted key
  whose value is not the same in all runs that have it, minus bookkeeping
  that always differs (run name, runs_dir, preset name) and switches that only
  change what is observed (IGNORED_KEYS).
- A run without summary.json has not finished: "running" when metrics.jsonl
  changed in the last RUNNING_SECONDS, else "unfinished" (crashed or killed);
  one with weights and no metrics.jsonl at all was made by `lmlab import`:
  "imported", its training columns blank (it was never trained here).
- Numbers come from summary.json when the run finished, else from the events.
"""

import math
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from lmlab.rundir.status import IMPORTED, RUNNING, UNFINISHED
from lmlab import atomic
from lmlab.errors import LmlabError
from lmlab.rundir.metrics import scan_metrics

# Not experiment variables: names that differ between any two runs, and switches that only change
# what is observed (dashboards, console lines, norm records), never what is trained.
IGNORED_KEYS = {"name", "train.run_name", "train.runs_dir", "train.print_every", "train.norms_every",
                "train.peak_tflops", "train.tensorboard", "train.wandb", "train.wandb_project"}
RUNNING_SECONDS = 300
NUMBER_COLUMNS = 8  # the runs table's fixed columns; the differing config keys follow
SEARCH_DEPTH = 3  # run directories are looked for this deep under a given directory (sweeps nest them)


@dataclass
class RunRecord:
    path: Path
    config: dict  # flat: {"optim.lr": 0.003, ...}
    events: list
    summary: dict | None = None
    env: dict | None = None
    problem: str = ""  # "" or what is wrong with metrics.jsonl (a cut last line)
    notes: str = ""
    samples: str = ""
    differing: dict = field(default_factory=dict)  # filled by read_runs: the keys in which this run differs
    label: str = ""  # how tables and legends name the run: its directory name, with the parent's when two clash

    def __post_init__(self):
        self.label = self.label or self.path.name

    @property
    def name(self):
        return self.path.name

    @property
    def status(self):
        if self.summary and self.summary.get("status"):
            return self.summary["status"]
        metrics = self.path / "metrics.jsonl"
        if not metrics.exists() and (self.path / "model.safetensors").is_file():
            return IMPORTED  # weights that were never trained here (lmlab import)
        if metrics.is_file() and time.time() - metrics.stat().st_mtime < RUNNING_SECONDS:
            return RUNNING
        return UNFINISHED

    def series(self, metric, x="step"):
        """[(x, value)] of the events that have both, value finite or not.

        A metric inside a nested record is named with a dot after the record:
        `key_l2.layers.0` is e["key_l2"]["layers.0"] of the norms events.
        """
        points = [(e.get(x), _metric_value(e, metric)) for e in self.events if x in e]
        return [(at, v) for at, v in points if isinstance(v, (int, float)) and not isinstance(v, bool)]

    def last(self, key):
        for e in reversed(self.events):
            if isinstance(e.get(key), (int, float)):
                return e[key]
        return None

    def stats(self):
        """steps, tokens, elapsed_s, best / final val loss, tokens/s: from summary.json, else the events."""
        s = self.summary or {}
        vals = [v for _, v in self.series("val_loss") if math.isfinite(v)]
        out = {
            "steps": s.get("steps", self.last("step")), "tokens": s.get("tokens", self.last("tokens")),
            "elapsed_s": s.get("elapsed_s", self.last("elapsed_s")),
            "best_val_loss": s.get("best_val_loss", min(vals) if vals else None),
            "final_val_loss": s.get("final_val_loss", self.last("val_loss")),
            "final_val_bpb": s.get("final_val_bpb", self.last("val_bpb")),
        }
        tokens, seconds = out["tokens"], out["elapsed_s"]
        out["tokens_per_s"] = tokens / seconds if tokens and seconds else None
        return out


def _flatten(table, prefix=""):
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_run_dir(path):
    path = Path(path)
    return (path / "config.toml").is_file() or (path / "metrics.jsonl").is_file()


def read_run(path):
    """The RunRecord of one run directory; a missing or foreign directory is an LmlabError."""
    path = Path(path).expanduser()
    if not path.exists():
        raise LmlabError(f"run directory {path} does not exist")
    if not path.is_dir():
        raise LmlabError(f"{path} is a file, not a run directory")
    if not is_run_dir(path):
        raise LmlabError(f"{path} is not a run directory (no config.toml or metrics.jsonl)")
    config = {}
    if (path / "config.toml").is_file():
        try:
            config = _flatten(tomllib.loads((path / "config.toml").read_text(encoding="utf-8")))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise LmlabError(f"{path / 'config.toml'} is not valid TOML: {e}") from None
    events, problem = scan_metrics(path / "metrics.jsonl") if (path / "metrics.jsonl").is_file() else ([], "")
    text = {name: (path / name).read_text(encoding="utf-8", errors="replace") if (path / name).is_file() else ""
            for name in ("notes.md", "samples.md")}
    return RunRecord(path=path, config=config, events=events, summary=atomic.read_json(path / "summary.json", tolerant=True),
                     env=atomic.read_json(path / "env.json", tolerant=True), problem=problem, notes=text["notes.md"],
                     samples=text["samples.md"])


def find_run_dirs(paths):
    """Run directories given directly or found under the given directories (sorted by path within each)."""
    found = []
    for path in paths or ["runs"]:
        path = Path(path).expanduser()
        if not path.exists():
            raise LmlabError(f"{path} does not exist")
        if is_run_dir(path):
            found.append(path)
            continue
        if not path.is_dir():
            raise LmlabError(f"{path} is not a run directory or a directory of runs")
        below = sorted(_search(path, SEARCH_DEPTH))
        if not below:
            raise LmlabError(f"no runs in {path} (no directory below it has config.toml or metrics.jsonl)")
        found += below
    return list(dict.fromkeys(found))  # a run given twice counts once


def _search(directory, depth):
    for child in directory.iterdir():
        if not child.is_dir() or child.name.startswith("."):
            continue
        if is_run_dir(child):
            yield child
        elif depth > 1:
            yield from _search(child, depth - 1)


def differing_keys(records):
    """Dotted config keys whose values are not the same in every run that has them, in config order.

    A key that only some runs have (they were made by different lmlab versions) differs only
    when those runs disagree on it: its absence says nothing about the value that was used.
    """
    keys = list(dict.fromkeys(k for r in records for k in r.config))
    return [k for k in keys if k not in IGNORED_KEYS
            and len({repr(r.config[k]) for r in records if k in r.config}) > 1]


def _telling_parent(path):
    """The nearest parent directory name that tells runs apart: a sweep's name rather than its `runs`."""
    parents = [p.name for p in Path(path).resolve().parents if p.name]
    return next((name for name in parents if name != "runs"), parents[0] if parents else "")


def read_runs(paths):
    """RunRecords of every run in `paths`, each with .differing = {key: value} for the differing keys."""
    records = [read_run(p) for p in find_run_dirs(paths)]
    names = [r.name for r in records]
    for r in records:
        if names.count(r.name) > 1:  # e.g. the same trial name in two sweeps: SWEEP/runs/000-seed=1
            r.label = f"{_telling_parent(r.path)}/{r.name}"
    keys = differing_keys(records) if len(records) > 1 else []
    for r in records:
        r.differing = {k: r.config.get(k) for k in keys}
    return records


# ---------------------------------------------------------------- the table


def human_count(n):
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}" if isinstance(n, float) else str(n)


def human_time(seconds):
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _loss(x):
    return "-" if x is None else f"{x:.4f}" if isinstance(x, (int, float)) and math.isfinite(x) else str(x)


def _value(v):
    if v is None:
        return "-"
    if isinstance(v, list):
        return ",".join(map(str, v))
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def runs_table(records):
    """(headers, rows) of the runs table: one row per run, then the keys in which the runs differ."""
    keys = list(records[0].differing) if records else []
    headers = ["run", "status", "steps", "tokens", "time", "best val", "final val", "tok/s", *keys]
    rows = []
    for r in records:
        s = r.stats()
        status = r.status + (" (last line cut)" if r.problem else "")
        rows.append([r.label, status, _value(s["steps"]), human_count(s["tokens"]), human_time(s["elapsed_s"]),
                     _loss(s["best_val_loss"]), _loss(s["final_val_loss"]), human_count(s["tokens_per_s"]),
                     *(_value(r.differing[k]) for k in keys)])
    return headers, rows


def format_table(headers, rows, style="text"):
    """The table as aligned text, Markdown, or tab-separated values."""
    if style == "tsv":
        return "\n".join("\t".join(row) for row in [headers, *rows])
    if style == "markdown":
        escape = lambda c: c.replace("|", "\\|")  # noqa: E731
        lines = ["| " + " | ".join(map(escape, headers)) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(map(escape, row)) + " |" for row in rows])
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    right = [2 <= i < NUMBER_COLUMNS for i in range(len(headers))]  # steps .. tok/s
    fmt = lambda row: "  ".join(c.rjust(w) if r else c.ljust(w)  # noqa: E731
                                for c, w, r in zip(row, widths, right)).rstrip()
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *map(fmt, rows)])


# ---------------------------------------------------------------- notes


def add_note(run, text):
    """Append a dated line to RUN/notes.md (shown in `lmlab report`)."""
    path = Path(run).expanduser()
    read_run(path)  # a clear error for a missing or foreign directory
    text = " ".join(text.split())
    if not text:
        raise LmlabError("the note is empty; give the text to add, e.g. lmlab note RUN \"lr too high: diverged at 300\"")
    notes = path / "notes.md"
    old = notes.read_text(encoding="utf-8") if notes.is_file() else ""
    atomic.write_text(notes, old + f"- {time.strftime('%Y-%m-%d %H:%M')}  {text}\n")
    return notes


def _metric_value(event, metric):
    """event[metric], or event[record][rest] for a metric named record.rest (per-layer norms)."""
    if metric in event:
        return event[metric]
    record, _, rest = metric.partition(".")
    nested = event.get(record)
    return nested.get(rest) if isinstance(nested, dict) else None
