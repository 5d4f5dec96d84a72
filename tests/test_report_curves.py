"""The report's interactive curves: the data the page carries, its escaping, thinning, and the bundled uPlot.

Drawing them in a browser is tested in test_report.py (headless Chromium).
"""

import json
import re
from importlib import resources

from lmlab.lab import report_curves
from lmlab.lab.report import write_report
from lmlab.lab.table import read_runs


def _run(directory, name, status, events, extra=""):
    run = directory / name
    run.mkdir(parents=True)
    (run / "config.toml").write_text(f'name = "x"\n[train]\nrun_name = "{name}"\n{extra}')
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run / "summary.json").write_text(json.dumps({"status": status}))
    return run


def _events(losses, val_every=0):
    events = []
    for i, loss in enumerate(losses, start=1):
        clocks = {"step": i, "tokens": 256 * i, "elapsed_s": 0.5 * i, "wall_s": 0.6 * i + 3}
        events.append({**clocks, "loss": loss, "lr": 1e-3})
        if val_every and i % val_every == 0:
            events.append({**clocks, "val_loss": loss if isinstance(loss, str) else loss + 0.1})
    return events


def _page_data(page):
    block = re.search(r'<script type="application/json" id="lmlab-curves-data">(.*?)</script>', page, re.DOTALL).group(1)
    return json.loads(block)


def test_curves_carry_every_clock_and_break_where_a_run_stopped_being_finite(tmp_path):
    _run(tmp_path, "ok", "completed", _events([5.0, 4.0, 3.5, 3.2], val_every=2))
    _run(tmp_path, "hot", "diverged", _events([5.0, 9.0, "inf", "nan"], val_every=2), extra="[optim]\nlr = 1.0\n")
    _run(tmp_path, "goal", "target_reached", _events([5.0, 3.0]))
    charts = {c["metric"]: c for c in report_curves.curves_data(read_runs([tmp_path]))["charts"]}
    assert list(charts) == ["val_loss", "loss", "lr"]  # no run has val_bpb: no chart for it
    loss = charts["loss"]
    assert [r["label"].split()[0] for r in loss["runs"]] == ["goal", "hot", "ok"]
    assert [r["end"] for r in loss["runs"]] == ["target", "diverged", ""]
    hot = loss["runs"][1]
    assert hot["y"] == [5.0, 9.0, None, None] and hot["x"]["step"] == [1, 2, 3, 4]
    assert hot["x"]["tokens"] == [256, 512, 768, 1024] and hot["x"]["time"] == [0.5, 1.0, 1.5, 2.0]
    assert hot["x"]["wall"] == [3.6, 4.2, 4.8, 5.4]
    assert [r["y"] for r in charts["val_loss"]["runs"]] == [[9.1, None], [4.1, 3.3]]  # hot, ok: goal has none
    assert charts["val_loss"]["clip"] is True
    assert charts["lr"]["clip"] is False and loss["smooth"] == 1  # four points: nothing to smooth
    colors = [r["color"] for r in loss["runs"]]
    assert colors == ["#1f77b4", "#ff7f0e", "#2ca02c"]  # matplotlib's tab10, as in the static figures


def test_a_long_series_is_thinned_keeping_its_last_point_and_train_loss_opens_smoothed(tmp_path, monkeypatch):
    monkeypatch.setattr(report_curves, "MAX_POINTS", 100)
    _run(tmp_path, "long", "completed", _events([5.0 - i * 1e-3 for i in range(1000)]))
    loss = report_curves.curves_data(read_runs([tmp_path]))["charts"][0]
    run = loss["runs"][0]
    assert loss["metric"] == "loss" and 90 <= len(run["y"]) <= 101
    assert run["x"]["step"][0] == 1 and run["x"]["step"][-1] == 1000 and run["y"][-1] == 4.001
    assert loss["smooth"] == round(len(run["y"]) / 25)


def test_a_run_name_cannot_end_the_data_block_or_inject_markup(tmp_path):
    name = "a<!--<script>b"  # inside a script block, this would swallow the rest of the page unless escaped
    _run(tmp_path / "runs", name, "completed", _events([5.0, 4.0]))
    page, _ = write_report(tmp_path / "runs", out=tmp_path / "report.html")
    text = page.read_text()
    assert name not in text
    assert _page_data(text)["charts"][0]["runs"][0]["label"] == name  # intact once parsed


def test_uplot_is_bundled_with_its_license_and_provenance():
    vendor = resources.files("lmlab.lab").joinpath("vendor")
    script = vendor.joinpath("uplot/uPlot.iife.min.js").read_text(encoding="utf-8")
    assert script.startswith("/*! https://github.com/leeoniya/uPlot (v1.6.32) */") and "</script" not in script
    assert "MIT License" in vendor.joinpath("uplot/LICENSE").read_text(encoding="utf-8")
    readme = vendor.joinpath("README.md").read_text(encoding="utf-8")
    assert "uPlot | 1.6.32 | MIT" in readme and "npm pack uplot@1.6.32" in readme
