"""Curves: one run's loss plot, and several runs compared in one figure on any clock.

Design choices:
- The x axis is a clock: `step`, `tokens`, `time` (training time, elapsed_s:
  evaluation and saving excluded, so runs with different eval schedules
  compare) or `wall` (wall_s: everything included, what the GPU hours cost).
- Train loss is noisy: it is drawn faint as measured with a trailing moving
  average on top (`smooth` points; by default about 1/25 of the curve), and
  the legend says so ("smoothed: moving average of N points"). Validation
  curves (val_*) are always drawn as measured, whatever `smooth` says: a
  trailing average of a falling validation curve lags it, so its end would
  sit well above the run's real final validation loss.
- A run that diverged gets an X where its curve ends, one that hit its
  target a star: the reasons curves stop are visible without the table.
  Loss axes stop a little above the highest starting loss, so a run that
  explodes does not flatten the others (its X sits on the top edge).
- Every comparison is written as PNG (for Markdown, chat, papers) and SVG
  (for the HTML report and zooming), atomically.
- Legends name each run and, when there are few, the config keys in which
  the runs differ (from runs.read_runs), so a figure explains itself.
"""

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from lmlab.rundir.status import DIVERGED, TARGET_REACHED  # noqa: E402
from lmlab import atomic  # noqa: E402
from lmlab.errors import LmlabError  # noqa: E402
from lmlab.rundir.metrics import finite, read_metrics  # noqa: E402

CLOCKS = {"step": ("step", "step"), "tokens": ("tokens", "tokens"),
          "time": ("elapsed_s", "training time"), "wall": ("wall_s", "wall-clock time")}
LABELS = {"val_loss": "validation loss (nats/token)", "loss": "train loss (nats/token)",
          "val_bpb": "validation bits per byte", "val_ppl": "validation perplexity", "lr": "learning rate",
          "grad_norm": "gradient norm (before clipping)", "tokens_per_s": "tokens per second",
          "mfu": "model FLOPs utilisation", "peak_mem_mb": "peak memory (MiB)"}
TITLES = {"val_loss": "Validation loss", "loss": "Train loss", "val_bpb": "Validation bits per byte",
          "val_ppl": "Validation perplexity"}
LOSSES = ("loss", "val_loss", "val_bpb", "val_ppl")  # curves that start high: clipped at their starting value
MAX_LEGEND_KEYS = 3



def plot_loss(run_dir, out=None):
    """plots/loss.png: train and validation loss against step."""
    run_dir = Path(run_dir)
    events = read_metrics(run_dir / "metrics.jsonl")
    train = [(e["step"], e["loss"]) for e in events if finite(e.get("loss"))]
    val = [(e["step"], e["val_loss"]) for e in events if finite(e.get("val_loss"))]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out) if out else run_dir / "plots" / "loss.png"
    with atomic.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def moving_average(values, n):
    """Trailing mean over the last n values (fewer at the start)."""
    values = np.asarray(values, dtype=np.float64)
    if n <= 1 or len(values) < 2:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    index = np.arange(1, len(values) + 1)
    start = np.maximum(index - n, 0)
    return (sums[index] - sums[start]) / (index - start)


def _time_scale(max_seconds):
    if max_seconds >= 2 * 3600:
        return 3600.0, "h"
    if max_seconds >= 120:
        return 60.0, "min"
    return 1.0, "s"


def legend_label(record):
    keys = record.differing
    if not keys or len(keys) > MAX_LEGEND_KEYS:
        return record.label
    values = ", ".join(f"{k.partition('.')[2] or k}={_short(v)}" for k, v in keys.items())
    return f"{record.label} ({values})"


def _short(value):
    return f"{value:g}" if isinstance(value, float) else ",".join(map(str, value)) if isinstance(value, list) else str(value)


def run_colors(runs):
    """The palette runs are drawn in (tab10, tab20 past ten runs), as RGB tuples; the report's charts use it too."""
    return plt.get_cmap("tab10" if runs <= 10 else "tab20").colors


def compare_figure(records, x="step", metric="val_loss", logx=False, logy=False, smooth=None, title=None):
    """A matplotlib figure of `metric` against the clock `x` for every run in `records` (lab.table.RunRecord)."""
    clock_name, curves = _curves(records, x, metric)
    scale, unit = (1.0, "")
    if x in ("time", "wall"):
        scale, unit = _time_scale(max(p[0] for _, points in curves for p in points) if curves else 0)

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    colors = run_colors(len(records))
    ends, windows = set(), set()
    firsts = [v for _, points in curves for v in [next((v for _, v in points if finite(v)), None)] if v is not None]
    cap = 1.05 * max(firsts) if metric in LOSSES and firsts and not logy and max(firsts) > 0 else math.inf
    for i, (record, points) in enumerate(curves):
        ends |= _draw_run(ax, record, points, colors[i % len(colors)], scale, cap, smooth, metric, windows)

    ax.set_xlabel(f"{clock_name} ({unit})" if unit else clock_name)
    ax.set_ylabel(LABELS.get(metric, metric))
    if x == "tokens":
        ax.xaxis.set_major_formatter(EngFormatter())
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    elif math.isfinite(cap) and ax.get_ylim()[1] > cap:  # a diverging run would squash the others flat
        low = min(v for _, points in curves for _, v in points if finite(v))
        ax.set_ylim(low - 0.05 * (cap - low), cap)
    ax.set_title(title or f"{TITLES.get(metric, metric)} against {clock_name}")
    ax.grid(alpha=0.3, which="both" if logy or logx else "major")
    _legend(ax, ends, len(records), windows)
    fig.tight_layout()
    return fig


def _curves(records, x, metric):
    """(the clock's name, [(record, [(x, value), ...])]); an LmlabError naming the metrics there are."""
    if x not in CLOCKS:
        raise LmlabError(f"unknown x axis '{x}'; choose one of {', '.join(CLOCKS)}")
    key, clock_name = CLOCKS[x]
    curves = [(r, r.series(metric, key)) for r in records]
    if not any(points for _, points in curves):
        available = sorted({k for r in records for e in r.events for k, v in e.items()
                            if isinstance(v, (int, float)) and k not in ("step", "tokens", "elapsed_s", "wall_s")})
        available += sorted({f"{k}.{next(iter(v))}" for r in records for e in r.events for k, v in e.items()
                             if isinstance(v, dict) and v})  # per-layer norms: record.layer
        raise LmlabError(f"no run has '{metric}' against {x} in metrics.jsonl; metrics there: "
                         f"{', '.join(available) or 'none'}")
    return clock_name, curves


def smoothing_window(smooth, metric, n_points):
    """Points in the moving average of a curve of `n_points`: 1 (none) for validation metrics, always.

    smooth None: about 1/25 of the curve for the train loss, none for other metrics.
    """
    if metric.startswith("val"):
        return 1
    if smooth is None:
        return max(1, round(n_points / 25)) if metric == "loss" else 1
    return max(1, smooth)


def _draw_run(ax, record, points, color, scale, cap, smooth, metric, windows):
    """One run's curve (faint raw + moving average when smoothed) and its end marker; the markers used.

    The window used, when more than one point, is added to `windows` (for the legend).
    """
    kept = [(px / scale, v) for px, v in points if finite(v) and finite(px)]
    if not kept:
        if points:  # measured, but never finite: say so rather than leave the run out silently
            ax.plot([], [], "X", color=color, label=f"{legend_label(record)}: no finite value")
        return set()
    xs, ys = map(np.asarray, zip(*kept))
    window = smoothing_window(smooth, metric, len(ys))
    if window > 1:
        windows.add(window)
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(xs, moving_average(ys, window), color=color, label=legend_label(record), linewidth=1.6)
    else:
        style = "o-" if len(xs) <= 60 and metric.startswith("val") else "-"
        ax.plot(xs, ys, style, color=color, label=legend_label(record), markersize=3.5, linewidth=1.4)
    status, end = record.status, (xs[-1], min(ys[-1], cap))  # a marker above the cap sits on it
    if status == DIVERGED or len(kept) < len(points):
        ax.plot(*end, "X", color=color, markersize=11, markeredgecolor="black", zorder=5, clip_on=False)
        return {DIVERGED}
    if status == TARGET_REACHED:
        ax.plot(*end, "*", color=color, markersize=15, markeredgecolor="black", zorder=5, clip_on=False)
        return {TARGET_REACHED}
    return set()


def _legend(ax, ends, runs, windows=()):
    """The runs' legend, plus one entry per kind of end marker drawn, and one saying how curves were smoothed."""
    handles, labels = ax.get_legend_handles_labels()
    if windows:
        low, high = min(windows), max(windows)
        handles.append(Line2D([], [], color="gray", linewidth=1.6))
        labels.append(f"smoothed: moving average of {low if low == high else f'{low}-{high}'} points (faint: raw)")
    for name, marker, size in ((DIVERGED, "X", 9), (TARGET_REACHED, "*", 12)):
        if name in ends:
            handles.append(Line2D([], [], marker=marker, linestyle="", color="gray", markeredgecolor="black",
                                  markersize=size))
            labels.append(name.replace("_", " "))
    ax.legend(handles, labels, fontsize=8 if runs > 5 else 9, loc="best")


def save_figure(fig, out):
    """Write `fig` as PNG and SVG (out's suffix picks the name of one; the other sits beside it)."""
    out = Path(out)
    base = out.with_suffix("") if out.suffix.lower() in (".png", ".svg") else out
    paths = []
    for suffix in (".png", ".svg"):
        path = base.with_name(base.name + suffix)
        with atomic.atomic_path(path) as tmp:
            fig.savefig(tmp, format=suffix[1:])
        paths.append(path)
    plt.close(fig)
    return paths
