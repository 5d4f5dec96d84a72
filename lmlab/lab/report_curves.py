"""The report's interactive curves: the runs' series as JSON, drawn in the page by uPlot.

Design choices:
- Still one file that works offline: uPlot (vendored, MIT, see vendor/README.md)
  and lmlab's own script (report_curves.js) are inlined into the page, so
  nothing is fetched when it is viewed. uPlot was picked because it is small
  (51 KB minified, no dependencies), canvas-based (fast with many points)
  and maintained.
- One chart per metric (validation loss, train loss, bits per byte, learning
  rate); the reader picks the clock (step, tokens, training time, wall-clock),
  log scales and the train-loss smoothing; hovering shows every run's value
  nearest the cursor, clicking a run in a legend hides it in every chart,
  dragging zooms, a double click zooms back out.
- The data carries every clock per point, so changing the clock needs no
  new file. NaN and inf are written as null: the line breaks where a run
  stopped being finite, and a run that diverged ends in an X, one that
  reached its target in a star (as in the static figures).
- A series longer than MAX_POINTS is thinned to every k-th point (the last
  kept), so a run logged at every step of a long training still gives a page
  of a few MB; the static figures in the Markdown twin use every point.
- Without JavaScript the page shows the static SVG figures instead (<noscript>).
"""

import json
import math
from importlib import resources

from matplotlib.colors import to_hex

from lmlab.rundir.metrics import finite
from lmlab.rundir.plots import LABELS, LOSSES, TITLES, legend_label, run_colors
from lmlab.rundir.status import DIVERGED, TARGET_REACHED

# (metric, the clock the chart opens on); a metric no run has is left out.
METRICS = [("val_loss", "step"), ("loss", "step"), ("val_bpb", "tokens"), ("lr", "step")]
CLOCK_KEYS = {"step": "step", "tokens": "tokens", "time": "elapsed_s", "wall": "wall_s"}
MAX_POINTS = 2000
SMOOTH_FRACTION = 25  # train loss opens smoothed over 1/25 of the longest curve, as in the static figures


def curves_data(records):
    """{"charts": [...]} for report_curves.js: per metric, each run's points on every clock."""
    colors = [to_hex(c) for c in run_colors(len(records))]
    charts = []
    for metric, clock in METRICS:
        runs = [_run_series(r, metric, colors[i % len(colors)]) for i, r in enumerate(records)]
        runs = [run for run in runs if run]
        if not runs:
            continue
        longest = max(len(run["y"]) for run in runs)
        title = TITLES.get(metric, LABELS.get(metric, metric))
        charts.append({"metric": metric, "title": title[:1].upper() + title[1:],
                       "ylabel": LABELS.get(metric, metric), "clock": clock, "clip": metric in LOSSES,
                       "smooth": max(1, round(longest / SMOOTH_FRACTION)) if metric == "loss" else 1,
                       "runs": runs})
    return {"charts": charts}


def _run_series(record, metric, color):
    """One run's points of `metric`: {label, color, end, x: {clock: [...]}, y: [...]}; None if it has none."""
    events = [e for e in record.events if isinstance(e.get(metric), (int, float)) and not isinstance(e.get(metric), bool)]
    if not events:
        return None
    broken = any(not finite(e[metric]) for e in events)
    if len(events) > MAX_POINTS:
        stride = math.ceil(len(events) / MAX_POINTS)
        events = events[:-1:stride] + events[-1:]
    status = record.status
    end = "diverged" if status == DIVERGED or broken else "target" if status == TARGET_REACHED else ""
    return {"label": legend_label(record), "color": color, "end": end,
            "x": {clock: [_round(e.get(key)) for e in events] for clock, key in CLOCK_KEYS.items()},
            "y": [_round(e[metric]) for e in events]}


def _round(x):
    """Six significant digits (a smaller page, the same curves); None for what is not a finite number."""
    if not finite(x):
        return None
    return x if isinstance(x, int) else float(f"{x:.6g}")


def _asset(name):
    return resources.files("lmlab.lab").joinpath(name).read_text(encoding="utf-8")


def curves_style():
    """CSS for the charts: uPlot's own, then lmlab's."""
    return _asset("vendor/uplot/uPlot.min.css") + "\n" + CHART_STYLE


def curves_html(records):
    """The charts' container, their data and the scripts that draw them ("" when no run has a curve)."""
    data = curves_data(records)
    if not data["charts"]:
        return ""
    # "<" escaped: a run label holding "</script>" cannot end the data block early.
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return "\n".join([
        '<div id="lmlab-curves"></div>',
        f'<script type="application/json" id="lmlab-curves-data">{payload}</script>',
        f"<script>{_asset('vendor/uplot/uPlot.iife.min.js')}</script>",
        f"<script>{_asset('report_curves.js')}</script>",
    ])


CHART_STYLE = """
.chart { margin: 1em 0 1.5em; }
.chart h3 { margin: 0 0 0.3em; font-size: 1.05em; }
.chart .controls { font-size: 0.85em; color: #444; margin-bottom: 0.3em; display: flex; flex-wrap: wrap; gap: 0.4em 1.2em; }
.chart .controls input[type=number] { width: 4.5em; }
.chart .hint { font-size: 0.8em; color: #777; }
.uplot .u-legend { font-size: 0.85em; text-align: left; }
"""
