"""Plots of a run's curves (the cross-run comparisons build on these)."""

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed: files only
import matplotlib.pyplot as plt  # noqa: E402

from lmlab import atomic  # noqa: E402
from lmlab.track import read_metrics  # noqa: E402


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def plot_loss(run_dir, out=None):
    """plots/loss.png: train and validation loss against step."""
    run_dir = Path(run_dir)
    events = read_metrics(run_dir / "metrics.jsonl")
    train = [(e["step"], e["loss"]) for e in events if _finite(e.get("loss"))]
    val = [(e["step"], e["val_loss"]) for e in events if _finite(e.get("val_loss"))]
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
