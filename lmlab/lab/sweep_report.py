"""What a sweep hands back: the table, the best config and the plots.

Design choices:
- Trials are ranked by the metric (lower is better: losses, times to target);
  only runs that ended well (completed, target_reached, time_budget) are
  ranked; diverged, failed and unfinished runs follow, marked.
- best.toml is the best trial's own resolved config.toml with the run name and
  runs_dir reset, so `lmlab train --config best.toml` repeats it as a new run.
- plots/<key>.png is the edge-of-stability picture: the metric against each
  numeric swept value (log x for learning rates, or values spanning 10x and
  more), one line per combination of the other swept values, and every
  diverged run as a red x at the top edge at its value.
- plots/curves.png: validation loss (and, faint, training loss) against step
  for every trial, coloured along the trial order; diverged trials dashed,
  ending in a red x; the y range is clipped so that blown-up runs do not
  flatten the others.
"""

import tomllib
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402

from lmlab.rundir.status import DIVERGED, GOOD  # noqa: E402
from lmlab import atomic  # noqa: E402
from lmlab.config import from_dict, to_toml  # noqa: E402
from lmlab.rundir.metrics import finite, read_metrics  # noqa: E402



def ranked(trials):
    """Trials best first: good runs by metric, then good runs without it, then the rest."""
    def key(trial):
        r = trial.record
        good = r.get("status") in GOOD
        metric = r.get("metric")
        return (not good, metric is None, metric if metric is not None else 0.0, trial.name)
    return sorted(trials, key=key)


def _fmt(value, digits=4):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _note(record):
    if record.get("diverged_at"):
        d = record["diverged_at"]
        return f"diverged at step {d['step']}: {d.get('reason', '')}"
    if record.get("nonfinite_at"):
        d = record["nonfinite_at"]
        return f"diverged at step {d['step']}: non-finite {d.get('what', 'loss')}"
    target = record.get("target") or {}
    if target.get("reached"):
        return f"target at step {target['step']}, {target['tokens']:,} tokens, {target['elapsed_s']:.1f}s"
    if target:
        return "target not reached"
    return record.get("error", "")


def table(trials, keys, metric):
    """The Markdown table of a sweep, best first."""
    extra = [(name, key) for name, key in (("best val", "best_val_loss"), ("final val", "final_val_loss"))
             if key != metric]  # no column twice
    head = ["rank", "trial", *keys, "status", metric, *(name for name, _ in extra), "steps", "train s", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rank = 0
    for trial in ranked(trials):
        r = trial.record
        good = r.get("status") in GOOD and r.get("metric") is not None
        rank += good
        status = r.get("status", "pending")
        cells = [str(rank) if good else "-", trial.name, *(_fmt(trial.values.get(k)) for k in keys),
                 f"**{status}**" if status not in GOOD else status, _fmt(r.get("metric")),
                 *(_fmt(r.get(key)) for _, key in extra), _fmt(r.get("steps")),
                 _fmt(r.get("elapsed_s"), 3), _note(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_best(out, trial):
    """best.toml from the best trial's resolved config; None when no trial ended well."""
    config_path = Path(trial.record["run_dir"]) / "config.toml"
    config = from_dict(tomllib.loads(config_path.read_text(encoding="utf-8")), source=str(config_path))
    config.train.run_name = ""
    config.train.runs_dir = "runs"
    values = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.values.items())
    header = f"# best trial of the sweep in {out}: {trial.name} ({values})\n"
    atomic.write_text(Path(out) / "best.toml", header + to_toml(config))


def _numeric(values):
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def plot_metric(out, trials, key, keys, metric):
    """plots/<key>.png: metric against the swept value, diverged runs as x at the top."""
    xs_all = _numeric([t.values[key] for t in trials])
    if xs_all is None:
        return None
    others = [k for k in keys if k != key]
    groups = defaultdict(list)
    for trial, x in zip(trials, xs_all):
        groups[tuple(_fmt(trial.values[k]) for k in others)].append((x, trial))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    positive = all(x > 0 for x in xs_all)
    if positive and (key.endswith("lr") or max(xs_all) / min(xs_all) >= 10):
        ax.set_xscale("log")
    good = [t.record["metric"] for t in trials if t.record.get("metric") is not None]
    for label, members in sorted(groups.items()):
        members.sort(key=lambda m: m[0])
        points = [(x, t.record["metric"]) for x, t in members if t.record.get("metric") is not None]
        name = ", ".join(f"{k}={v}" for k, v in zip(others, label)) or metric
        if points:
            ax.plot(*zip(*points), "o-", label=name)
    bad = [(x, t) for x, t in zip(xs_all, trials) if t.record.get("status") == DIVERGED]
    if bad:
        ax.scatter([x for x, _ in bad], [0.97] * len(bad), marker="x", s=90, color="tab:red", linewidths=2.5,
                   transform=ax.get_xaxis_transform(), clip_on=False, zorder=5, label="diverged")
    low_x, high_x = min(xs_all), max(xs_all)  # the x marks do not autoscale the axis: include them by hand
    if ax.get_xscale() == "log":
        ax.set_xlim(low_x / 1.6, high_x * 1.6)
    else:
        margin = (high_x - low_x) * 0.06 or abs(high_x) * 0.1 or 1.0
        ax.set_xlim(low_x - margin, high_x + margin)
    if good:
        low, high = min(good), max(good)
        pad = (high - low) * 0.1 or abs(high) * 0.05 or 0.1
        ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against {key}" + (" (x: diverged)" if bad else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out) / "plots" / f"{key}.png"
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def plot_curves(out, trials):
    """plots/curves.png: every trial's validation loss (and faint training loss) against step."""
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    firsts, lows, ends = [], [], []
    for i, trial in enumerate(trials):
        path = Path(trial.record.get("run_dir", "")) / "metrics.jsonl"
        if not path.is_file():
            continue
        events = read_metrics(path)
        train = [(e["step"], e["loss"]) for e in events if finite(e.get("loss"))]
        val = [(e["step"], e["val_loss"]) for e in events if finite(e.get("val_loss"))]
        color = plt.cm.viridis(0.9 * i / max(len(trials) - 1, 1))  # trial order (e.g. growing lr) as a colour ramp
        diverged = trial.record.get("status") == DIVERGED
        style = "--" if diverged else "-"
        label = trial.name + (" (diverged)" if diverged else "")
        if train:
            # a diverged run has few evaluations: its training loss is drawn strong, ending in an x
            ax.plot(*zip(*train), style, color=color, alpha=0.8 if diverged else 0.25, linewidth=0.9,
                    label=label if not val else None)
            if diverged:  # mark where it stopped: the step the stop rule names, at the top edge
                where = trial.record.get("diverged_at") or trial.record.get("nonfinite_at") or {}
                ends.append(where.get("step", train[-1][0]))
            firsts.append(train[0][1])
            lows.append(min(v for _, v in train))
        if val:
            ax.plot(*zip(*val), style + "o" if len(val) < 30 else style, color=color, markersize=3, label=label)
            lows.append(min(v for _, v in val))
    if firsts:
        ax.set_ylim(min(lows) * 0.95, max(firsts) * 1.1)  # blown-up runs leave the top of the plot
    top = ax.get_ylim()[1]
    for step in ends:
        ax.plot(step, top, "x", color="tab:red", markersize=9, mew=2, clip_on=False)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token): validation, and training faint")
    ax.set_title(f"sweep {Path(out).name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(trials) > 8 else 1)
    fig.tight_layout()
    path = Path(out) / "plots" / "curves.png"
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path



def write_all(out, trials, keys, metric, log=print):
    """sweep.md, best.toml and the plots; logs the table."""
    out = Path(out)
    text = table(trials, keys, metric)
    best = ranked(trials)[0] if trials else None
    found = best is not None and best.record.get("status") in GOOD and best.record.get("metric") is not None
    atomic.write_text(out / "sweep.md", f"# Sweep {out.name}\n\nmetric: {metric} (lower is better)\n\n{text}"
                      + (f"\nbest: {best.name} -> best.toml\n" if found else "\nno trial ended well\n"))
    if found:
        write_best(out, best)
    plot_curves(out, trials)
    for key in keys:
        plot_metric(out, trials, key, keys, metric)
    log("\n" + text)
    log(f"best: {best.name} ({metric} {best.record['metric']:.4g}) -> {out / 'best.toml'}" if found
        else "no trial ended well: no best.toml")
    log(f"table {out / 'sweep.md'}, plots in {out / 'plots'}")
