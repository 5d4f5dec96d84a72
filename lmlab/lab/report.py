"""`lmlab report DIR`: the experiment log of a directory of runs, as one HTML page and a Markdown twin.

Design choices:
- Self-contained: the HTML page holds everything inline (style, data,
  scripts, images) and makes no external request, so it opens from disk (or
  an e-mail attachment) in any browser, offline, with no server.
- The curves are interactive (report_curves.py: hover values, hide runs, log
  scales, zoom, any clock), drawn by uPlot, which is vendored and inlined.
  Without JavaScript the static figures show instead (<noscript>), as SVG
  data URIs: data URIs (not inline <svg>) keep the figures' internal ids apart.
- The Markdown twin (report.md) says the same for git, wikis and notebooks;
  its figures are PNG files in a folder beside it (REPORT_files/).
- Content, in the order a reader asks: the runs table (with the config keys in
  which the runs differ, found not listed), the curves on each clock (step,
  training time, tokens, wall time), then each run: its numbers, differing
  keys, notes (`lmlab note`), samples, environment and full config.
- Everything taken from run files is escaped: a sample or a note cannot break
  the page.
"""

import base64
import html
import io
import json
import os
import time
from pathlib import Path

from lmlab import atomic
from lmlab.evals.output import eval_summaries
from lmlab.lab.report_curves import curves_html, curves_style
from lmlab.rundir.plots import compare_figure, save_figure
from lmlab.lab.table import format_table, human_count, human_time, read_runs, runs_table

# (metric, clock): the report's figures, in order; a figure no run has data for is left out.
FIGURES = [("val_loss", "step"), ("val_loss", "time"), ("val_loss", "tokens"), ("val_loss", "wall"),
           ("loss", "step"), ("loss", "time"), ("val_bpb", "tokens")]

CLOCK_NOTES = {"step": "optimizer steps", "tokens": "training tokens seen",
               "time": "training time (elapsed_s: evaluation, sampling and saving excluded)",
               "wall": "wall-clock time since the run started (wall_s: everything included)"}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0.5em; width: 47%; min-width: 420px; vertical-align: top; }
figure img { width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; text-align: center; }
pre { background: #f7f7f7; padding: 0.7em; overflow-x: auto; white-space: pre-wrap; font-size: 0.85em; }
section.run { border-top: 2px solid #ddd; margin-top: 2em; }
.warn { color: #a15c00; }
.status-completed { color: #1a7f37; } .status-diverged, .status-failed { color: #c62828; }
.status-target_reached { color: #1565c0; }
"""


def _figures(records, files_dir):
    """[(title, svg bytes, png path)] of the report's figures."""
    out = []
    for metric, clock in FIGURES:
        if not any(r.series(metric, {"time": "elapsed_s", "wall": "wall_s"}.get(clock, clock)) for r in records):
            continue
        fig = compare_figure(records, x=clock, metric=metric)
        title = f"{fig.axes[0].get_title()}: {CLOCK_NOTES[clock]}"
        svg = io.BytesIO()
        fig.savefig(svg, format="svg")
        png, _ = save_figure(fig, files_dir / f"{metric}-{clock}.png")
        out.append((title, svg.getvalue(), png))
    return out


def _run_numbers(record):
    s, summary, env = record.stats(), record.summary or {}, record.env or {}
    bpb = s["final_val_bpb"]
    numbers = [("status", record.status), ("steps", s["steps"]), ("tokens", human_count(s["tokens"])),
               ("training time", human_time(s["elapsed_s"])),
               ("best val loss", _num(s["best_val_loss"])), ("final val loss", _num(s["final_val_loss"])),
               ("final val bpb", _num(bpb)), ("tokens/s", human_count(s["tokens_per_s"])),
               ("parameters", human_count(summary.get("params"))), ("model", summary.get("architecture")),
               ("device", _device(env)),
               ("code", _git(env.get("git")))]
    return [(k, v) for k, v in numbers if v not in (None, "", "-")]


def _device(env):
    device = env.get("device")
    hardware = env.get("cpu") if device == "cpu" else ", ".join(env.get("gpus") or [])
    return " ".join(x for x in (device, env.get("precision"), hardware and f"({hardware})") if x)


def _num(x):
    return f"{x:.4f}" if isinstance(x, (int, float)) else None


def _git(git):
    if not git:
        return None
    return f"git {git['commit'][:12]}{' (uncommitted changes)' if git.get('dirty') else ''}"


def _notes(text):
    return [line[2:] if line.startswith("- ") else line for line in text.splitlines() if line.strip()]


def _config_toml(record):
    path = record.path / "config.toml"
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


# ---------------------------------------------------------------- HTML


def _html_table(headers, rows, numeric=()):
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in headers or ())
    body = "".join("<tr>" + "".join(f'<td class="num">{e(c)}</td>' if i in numeric else f"<td>{e(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    head = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _html(title, records, table, figures, generated):
    e = html.escape
    headers, rows = table
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no favicon request when opened from disk
        f"<title>{e(title)}</title>", f"<style>{STYLE}{curves_style()}</style>", "</head>", "<body>",
        f"<h1>{e(title)}</h1>",
        f"<p>{len(records)} run{'s' * (len(records) != 1)}, report written {e(generated)} by <code>lmlab report</code>.</p>",
        "<h2>Runs</h2>", _html_table(headers, rows, numeric=range(2, 8)),
    ]
    keys = list(records[0].differing) if records else []
    parts.append(f"<p>The runs differ in {', '.join(f'<code>{e(k)}</code>' for k in keys)}.</p>" if keys else
                 "<p>The runs have the same config (seed and data included).</p>" if len(records) > 1 else "")
    if figures:
        parts.append("<h2>Curves</h2>")
        charts = curves_html(records)
        parts += [charts, "<noscript>" if charts else ""]
        for caption, svg, _ in figures:
            data = base64.b64encode(svg).decode("ascii")
            parts.append(f'<figure><img alt="{e(caption)}" src="data:image/svg+xml;base64,{data}">'
                         f"<figcaption>{e(caption)}</figcaption></figure>")
        parts.append("</noscript>" if charts else "")
    parts.append("<h2>Runs in detail</h2>")
    for r in records:
        parts.append(f'<section class="run" id="run-{e(r.label)}"><h3>{e(r.label)}</h3>')
        status = r.status
        parts.append(f'<p>Status: <strong class="status-{e(status)}">{e(status)}</strong> &middot; '
                     f"<code>{e(str(r.path))}</code></p>")
        if r.problem:
            parts.append(f'<p class="warn">{e(r.problem)}.</p>')
        parts.append(_html_table(None, [[k, str(v)] for k, v in _run_numbers(r)]))
        if r.differing:
            parts.append("<h4>Differing config keys</h4>")
            parts.append(_html_table(["key", "value"], [[k, _value(v)] for k, v in r.differing.items()]))
        if r.notes.strip():
            parts.append("<h4>Notes</h4><ul>" + "".join(f"<li>{e(n)}</li>" for n in _notes(r.notes)) + "</ul>")
        if r.samples.strip():
            parts.append(f"<h4>Samples</h4><pre>{e(r.samples.strip())}</pre>")
        for name, text, png in eval_summaries(r.path):  # `lmlab eval` results in RUN/evals/ (lmlab/evals/output.py)
            parts.append(f"<h4>Evaluation: {e(name)}</h4><pre>{e(text)}</pre>")
            if png:
                data = base64.b64encode(png.read_bytes()).decode("ascii")
                parts.append(f'<figure><img alt="{e(name)}" src="data:image/png;base64,{data}"></figure>')
        if r.env:
            parts.append(f"<details><summary>Environment (env.json)</summary><pre>{e(json.dumps(r.env, indent=2))}</pre></details>")
        config = _config_toml(r)
        if config:
            parts.append(f"<details><summary>Config (config.toml)</summary><pre>{e(config)}</pre></details>")
        parts.append("</section>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _value(v):
    return ",".join(map(str, v)) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------- Markdown


def _markdown(title, records, table, figures, md_path, generated):
    headers, rows = table
    lines = [f"# {title}", "", f"{len(records)} run{'s' * (len(records) != 1)}, report written {generated} "
             "by `lmlab report`.", "", "## Runs", "", format_table(headers, rows, "markdown"), ""]
    keys = list(records[0].differing) if records else []
    if keys:
        lines += [f"The runs differ in {', '.join(f'`{k}`' for k in keys)}.", ""]
    if figures:
        lines += ["## Curves", ""]
        for caption, _, png in figures:
            lines += [f"![{caption}]({png.relative_to(md_path.parent).as_posix()})", ""]
    lines += ["## Runs in detail", ""]
    for r in records:
        lines += [f"### {r.label}", "", f"`{r.path}`", ""]
        if r.problem:
            lines += [f"**{r.problem}.**", ""]
        lines += [f"- {k}: {v}" for k, v in _run_numbers(r)] + [""]
        if r.differing:
            lines += ["Differing config keys: " + ", ".join(f"`{k}` = `{_value(v)}`" for k, v in r.differing.items()), ""]
        if r.notes.strip():
            lines += ["#### Notes", ""] + [f"- {n}" for n in _notes(r.notes)] + [""]
        if r.samples.strip():
            lines += ["#### Samples", "", "~~~~text", r.samples.strip(), "~~~~", ""]
        for name, text, png in eval_summaries(r.path):  # `lmlab eval` results in RUN/evals/
            lines += [f"#### Evaluation: {name}", "", "~~~~text", text, "~~~~", ""]
            if png:
                lines += [f"![{name}]({Path(os.path.relpath(png, md_path.parent)).as_posix()})", ""]
    return "\n".join(lines)


def write_report(directory, out=None):
    """report.html and report.md for the runs in `directory` (default out: DIRECTORY/report.html)."""
    directory = Path(directory)
    records = read_runs([directory])
    out = Path(out) if out else (directory if directory.is_dir() else Path(".")) / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        out = out.with_suffix(".html")
    md_path = out.with_suffix(".md")
    files_dir = out.with_name(out.stem + "_files")
    title = f"Experiment log: {directory.resolve().name}"
    generated = time.strftime("%Y-%m-%d %H:%M")
    table = runs_table(records)
    figures = _figures(records, files_dir)
    atomic.write_text(out, _html(title, records, table, figures, generated))
    atomic.write_text(md_path, _markdown(title, records, table, figures, md_path, generated))
    return out, md_path
