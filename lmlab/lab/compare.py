"""lmlab compare: the curves of several runs in one figure, on any clock."""

from lmlab.lab.table import read_runs
from lmlab.rundir.plots import compare_figure, save_figure


def compare(paths, out=None, x="step", metric="val_loss", logx=False, logy=False, smooth=None):
    """Curves of the runs in `paths` (run directories or directories of runs) -> [png, svg] paths."""
    records = read_runs(paths)
    fig = compare_figure(records, x=x, metric=metric, logx=logx, logy=logy, smooth=smooth)
    return save_figure(fig, out or f"compare-{metric}-{x}.png")
