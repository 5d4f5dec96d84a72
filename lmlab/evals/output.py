"""What an evaluation leaves behind: a printed table, RUN/evals/<name>.json, and plots.

Design choices:
- One JSON file per evaluation name, written atomically and replaced by a
  rerun, with the model it measured and the settings it used, so a file is
  self-describing. Per-item records of multiple choice go next to it as
  <name>.items.jsonl (one line per item), keeping the JSON small enough to read.
- Tables are plain fixed-width text: they read the same in a terminal, a log
  file and a Markdown code block.
- Plots are PNGs made with matplotlib's Agg backend (no display needed).
"""

import json
import math
import time
from pathlib import Path

from lmlab import atomic
from lmlab.version import __version__


def _clean(value):
    """JSON has no NaN / inf: write None instead, and round floats to keep files readable."""
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_result(out_dir, name, result, model_path, model):
    """Write out_dir/<name>.json (and <name>.items.jsonl for per-item records); returns the JSON path."""
    out_dir = Path(out_dir)
    records = result.pop("records", None)
    document = {"name": name, "model": str(model_path), "architecture": model.summary(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "lmlab": __version__, **result}
    path = out_dir / f"{name}.json"
    atomic.write_text(path, json.dumps(_clean(document), indent=1, ensure_ascii=False) + "\n")
    if records is not None:
        atomic.write_text(out_dir / f"{name}.items.jsonl",
                          "".join(json.dumps(_clean(r), ensure_ascii=False) + "\n" for r in records))
        result["records"] = records
    return path


def table(headers, rows):
    """Fixed-width text table; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _cell(value):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# ---------------------------------------------------------------- tables per kind


def perplexity_table(result):
    keys = ["tokens", "bytes", "loss", "perplexity", "bits_per_byte", "accuracy"]
    headers = ["data"] + (["documents"] if result["source"] == "text" else []) + keys
    rows = []
    for entry in result.get("files", []):
        rows.append([Path(entry["file"]).name, entry["documents"]] + [entry.get(k) for k in keys])
    label = {"text": "all", "shards": f"{result.get('split', '')} split"}.get(result["source"], result["source"])
    overall = result["overall"]
    rows.append([label] + ([overall["documents"]] if result["source"] == "text" else []) + [overall.get(k) for k in keys])
    return table(headers, rows)


def probe_table(result):
    if result["probe"] == "history":
        rows = [[r["context"], r["loss"], r["loss_gain"], r["accuracy"], r["accuracy_gain"]] for r in result["contexts"]]
        return table(["context", "loss", "loss gain", "accuracy", "acc gain"], rows)
    rows = []
    for random_row, text_row in zip(result["random"], result["meaningful"]):
        rows.append([random_row["length"], random_row["in_context"], random_row["accuracy"],
                     text_row["accuracy"], text_row["first_accuracy"]])
    return table(["length", "fits", "random", "meaningful", "meaningful, no copy"], rows)


def choice_table(result):
    rows = [[subject, s["items"], s["accuracy"]] for subject, s in result["subjects"].items()]
    rows.append(["all (micro)", result["items"], result["accuracy"]])
    rows.append(["all (macro over subjects)", result["items"], result["macro_accuracy"]])
    rows.append(["chance", result["items"], result["chance"]])
    return table(["subject", "items", "accuracy"], rows)


# ---------------------------------------------------------------- plots


def _save(fig, path):
    import matplotlib.pyplot as plt

    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def accuracy_axes(ax, xlabel):
    """The look every copy-accuracy plot shares: log2 x, accuracy 0-1 on y, grid, legend."""
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("teacher-forced greedy accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_probe(result, path, title=""):
    """Accuracy against length (copy / reverse) or loss and accuracy against context (history)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    W = result["context_length"]
    if result["probe"] == "history":
        rows = result["contexts"]
        x = [max(r["context"], 0.5) for r in rows]  # context 0 drawn at 0.5 on the log axis
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
        left.plot(x, [r["loss"] for r in rows], "o-", color="tab:blue")
        left.set_ylabel("loss on the target span (nats/token)")
        right.plot(x, [r["accuracy"] for r in rows], "o-", color="tab:orange")
        right.set_ylabel("next-token accuracy on the target span")
        for ax in (left, right):
            ax.set_xscale("log", base=2)
            ax.set_xticks(x, [str(r["context"]) for r in rows])
            ax.minorticks_off()
            ax.set_xlabel(f"tokens of history before the span (context {W})")
            ax.grid(alpha=0.3)
        fig.suptitle(title or f"history gain ({result['span']}-token spans, {result['samples']} samples)")
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for kind, color in (("meaningful", "tab:blue"), ("random", "tab:red")):
            rows = result[kind]
            lengths = [r["length"] for r in rows]
            ax.plot(lengths, [r["accuracy"] for r in rows], "o-", color=color, label=f"{kind}: repeated half")
            ax.plot(lengths, [r["first_accuracy"] for r in rows], ":", color=color, alpha=0.7,
                    label=f"{kind}: first occurrence (no copy)")
        ax.axvline((W - 1) / 2, color="gray", ls="--", lw=1, label="whole probe fits the context")
        ax.axvline(W, color="black", ls="--", lw=1, label="length = context")
        accuracy_axes(ax, "sequence length (tokens)")
        shots = f", {result['shots']}-shot" if result["shots"] else ""
        ax.set_title(title or f"{result['probe']} probe ({result['samples']} samples per length{shots})")
    fig.tight_layout()
    return _save(fig, Path(path))


# ---------------------------------------------------------------- for lmlab report


def eval_summaries(run_dir):
    """[(name, table text, png path or None)] of the evaluations saved in RUN/evals/, for `lmlab report`."""
    out = []
    for path in sorted((Path(run_dir) / "evals").glob("*.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
            kind = result.get("kind")
            if kind == "perplexity":
                text = perplexity_table(result)
            elif kind == "probe":
                text = probe_table(result)
            elif kind == "repetition":
                from lmlab.evals.repetition import repetition_table

                text = repetition_table(result)
            elif kind == "choice":
                text = choice_table({**result, "subjects": {}})  # overall lines only; subjects are in the JSON
            else:
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a file another tool wrote, or a half-edited one: the report goes on without it
        png = path.with_suffix(".png")
        out.append((path.stem, text, png if png.is_file() else None))
    return out
