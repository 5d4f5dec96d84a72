"""Runs compared: the runs table, compare figures on each clock, the HTML / Markdown report, notes, errors."""

import html
import json
import re
import shutil
import subprocess

import pytest

from evals_support import tiny_overrides
from lmlab import load_config, train
from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.rundir.plots import compare_figure
from lmlab.lab.table import add_note, differing_keys, read_run, read_runs


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def ablation(small_corpus, data_cache, tmp_path_factory):
    """A tiny version of the CPU ablation set: the baseline and two switches, 30 steps each, in one directory."""
    runs_dir = tmp_path_factory.mktemp("ablation")
    base = tiny_overrides(small_corpus, data_cache, runs_dir)
    for name, switch in (("baseline", []), ("nonorm", ["model.norm=none"]), ("postnorm", ["model.norm_position=post"])):
        train(load_config(None, base + switch + [f"train.run_name={name}"]), log=quiet)
    return runs_dir


def test_runs_table_has_one_row_per_run_and_names_the_differing_keys(ablation, capsys):
    assert main(["runs", str(ablation)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:3] == ["run", "status", "steps"] and header[-2:] == ["model.norm", "model.norm_position"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"baseline", "nonorm", "postnorm"}
    assert rows["nonorm"][1] == "completed" and rows["nonorm"][2] == "30" and rows["nonorm"][-2:] == ["none", "pre"]
    assert rows["postnorm"][-2:] == ["rmsnorm", "post"]
    assert main(["runs", "--format", "markdown", str(ablation / "baseline"), str(ablation / "nonorm")]) == 0
    markdown = capsys.readouterr().out
    assert markdown.startswith("| run | status |") and "| model.norm |" in markdown and "model.norm_position" not in markdown


def test_differing_keys_ignore_bookkeeping_and_keys_only_some_runs_know(ablation):
    records = read_runs([ablation])
    assert differing_keys(records) == ["model.norm", "model.norm_position"]
    assert records[1].differing == {"model.norm": "none", "model.norm_position": "pre"}
    records[0].config["train.new_key"] = 1  # as written by a newer lmlab: says nothing about the others
    assert differing_keys(records) == ["model.norm", "model.norm_position"]


@pytest.mark.parametrize("x", ["step", "time", "tokens", "wall"])
def test_compare_writes_png_and_svg_on_each_clock(ablation, tmp_path, capsys, x):
    out = tmp_path / f"val-{x}.png"
    assert main(["compare", *(str(ablation / n) for n in ("baseline", "nonorm", "postnorm")), "--x", x,
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out), str(out.with_suffix(".svg"))]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    svg = out.with_suffix(".svg").read_text()
    assert svg.startswith("<?xml") and "<svg" in svg


def test_compare_figure_draws_every_run_smooths_train_loss_and_uses_log_scales(ablation):
    records = read_runs([ablation])
    fig = compare_figure(records, x="tokens", metric="loss", logx=True, logy=True, smooth=5)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["baseline (norm=rmsnorm, norm_position=pre)", "nonorm (norm=none, norm_position=pre)",
                      "postnorm (norm=rmsnorm, norm_position=post)"]
    assert len(ax.lines) == 6  # each run: the raw curve, faint, and its moving average
    assert "smoothed: moving average of 5 points (faint: raw)" in {t.get_text() for t in ax.get_legend().get_texts()}


def _fake_run(directory, name, status, losses, lr=1e-3):
    run = directory / name
    run.mkdir(parents=True)
    (run / "config.toml").write_text(f'name = "x"\n[optim]\nlr = {lr}\n[train]\nrun_name = "{name}"\n')
    events = [{"step": 10 * (i + 1), "tokens": 100 * (i + 1), "elapsed_s": i + 1.0, "wall_s": i + 2.0, "val_loss": v}
              for i, v in enumerate(losses)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run / "summary.json").write_text(json.dumps({"status": status, "steps": 10 * len(losses)}))
    return run


def test_diverged_runs_end_in_an_x_and_runs_that_hit_their_target_in_a_star(tmp_path):
    _fake_run(tmp_path, "ok", "completed", [5.0, 4.0, 3.5])
    _fake_run(tmp_path, "hot", "diverged", [5.0, 9.0, 1e30, "nan"], lr=1.0)
    _fake_run(tmp_path, "fast", "target_reached", [5.0, 3.0], lr=3e-3)
    ax = compare_figure(read_runs([tmp_path]), metric="val_loss").axes[0]
    markers = {line.get_marker() for line in ax.lines}
    assert {"X", "*"} <= markers
    assert {"diverged", "target reached"} <= {t.get_text() for t in ax.get_legend().get_texts()}
    assert ax.get_ylim()[1] < 6  # the exploding run does not squash the others: the axis stops above the start


def test_report_is_a_self_contained_page_with_a_markdown_twin(ablation, capsys):
    assert main(["note", str(ablation / "nonorm"), "no norm: <slower> & noisier at the start"]) == 0
    assert main(["report", str(ablation)]) == 0
    assert "report.html" in capsys.readouterr().out
    page = (ablation / "report.html").read_text()
    for name in ("baseline", "nonorm", "postnorm"):
        assert f'id="run-{name}"' in page
    fallback = page[page.index("<noscript>"):page.index("</noscript>")]  # the static figures, for no JavaScript
    assert fallback.count('src="data:image/svg+xml;base64,') >= 6  # val loss on 4 clocks, train loss on 2
    assert not re.search(r'(src|href)="(?!data:)', page) and "<script src" not in page  # nothing to fetch
    assert "uPlot (v1.6.32)" in page and 'id="lmlab-curves-data"' in page  # the interactive curves, inlined
    assert "model.norm_position" in page and "no norm: &lt;slower&gt; &amp; noisier at the start" in page
    assert "Once upon a time" in page  # the samples
    markdown = (ablation / "report.md").read_text()
    assert "| model.norm | model.norm_position |" in markdown and "no norm: <slower>" in markdown
    for png in re.findall(r"\]\((report_files/[^)]+\.png)\)", markdown):
        assert (ablation / png).read_bytes()[:4] == b"\x89PNG"
    assert len(re.findall(r"!\[", markdown)) >= 6


def _chromium():
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _headless(page, profile, *flags):
    """(the DOM after scripts ran, the page's console lines) of `page` opened from disk in headless Chromium."""
    result = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--window-size=1200,900", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", *flags,
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    return result.stdout, [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


# Run in a copy of the report, after its own scripts: what the charts hold and show, before and after the
# reader uses the controls, written to <body data-probe="JSON"> for --dump-dom.
PROBE = """<script>
function pixels(plot, hex) {  // canvas pixels drawn in a run's colour
  const [r, g, b] = [1, 3, 5].map(i => parseInt(hex.slice(i, i + 2), 16));
  const c = plot.ctx.canvas, copy = document.createElement("canvas");  // read from a copy: no readback warning
  [copy.width, copy.height] = [c.width, c.height];
  const ctx = copy.getContext("2d", {willReadFrequently: true});
  ctx.drawImage(c, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4)
    if (d[i + 3] > 200 && Math.abs(d[i] - r) + Math.abs(d[i + 1] - g) + Math.abs(d[i + 2] - b) < 60) n++;
  return n;
}
function state(c) {
  return {metric: c.spec.metric, labels: c.spec.runs.map(r => r.label), shown: c.plot.series.slice(1).map(s => s.show),
          points: c.plot.data.slice(1).map(ys => ys.filter(y => y != null).length), xmax: Math.max(...c.plot.data[0]),
          pixels: c.spec.runs.map(r => pixels(c.plot, r.color)), xlabel: c.plot.axes[0].label,
          ydistr: c.plot.scales.y.distr, title: c.title.textContent};
}
function use(c, name, value) {
  const input = c.box.parentNode.querySelector(`[name=${name}]`);
  if (input.type === "checkbox") input.checked = value; else input.value = value;
  input.dispatchEvent(new Event("change"));
}
addEventListener("load", () => setTimeout(() => {
  const charts = window.lmlabCharts, out = {before: charts.map(state)};
  const val = charts.find(c => c.spec.metric === "val_loss"), loss = charts.find(c => c.spec.metric === "loss");
  val.plot.setCursor({left: val.plot.bbox.width / uPlot.pxRatio * 0.6, top: 20});
  out.hover = [...val.plot.root.querySelectorAll(".u-legend .u-series .u-value")].map(e => e.textContent);
  use(val, "clock", "wall"); use(val, "logy", true); use(loss, "smooth", 5); use(loss, "clock", "tokens");
  val.plot.root.querySelectorAll(".u-legend .u-series th")[1].click();  // the first run, hidden from the legend
  setTimeout(async () => {  // uPlot redraws after the event
    out.after = charts.map(state);
    out.fallback = await fallback();
    document.body.dataset.probe = JSON.stringify(out);
  }, 200);
}, 200));
async function fallback() {  // the static figures shown without JavaScript: [decoded width of each]
  const text = document.querySelector("noscript").textContent;
  const images = [...new DOMParser().parseFromString(text, "text/html").images];
  return Promise.all(images.map(img => new Promise(done => {
    const copy = new Image();
    copy.onload = () => done(copy.naturalWidth);
    copy.onerror = () => done(0);
    copy.src = img.src;
  })));
}
</script>"""


@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed (apt-get install chromium)")
def test_report_curves_are_drawn_and_usable_in_headless_chromium_without_console_errors(ablation, tmp_path):
    from lmlab.lab.report import write_report

    runs = tmp_path / "runs"
    runs.mkdir()
    for name in ("baseline", "nonorm", "postnorm"):
        (runs / name).symlink_to(ablation / name)
    _fake_run(runs, "hot", "diverged", [5.0, 9.0, "nan"], lr=1.0)  # validation loss only, ending in NaN
    page, _ = write_report(runs, out=tmp_path / "report.html")
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom, console = _headless(checked, tmp_path / "profile")
    assert console == []
    probe = json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', dom).group(1)))
    before = {c["metric"]: c for c in probe["before"]}
    assert list(before) == ["val_loss", "loss", "val_bpb", "lr"]
    assert [label.split()[0] for label in before["val_loss"]["labels"]] == ["baseline", "hot", "nonorm", "postnorm"]
    evals = [len(read_run(ablation / name).series("val_loss")) for name in ("baseline", "nonorm", "postnorm")]
    assert before["val_loss"]["points"] == [evals[0], 2, *evals[1:]] and min(evals) >= 3  # NaN is not drawn
    assert before["loss"]["points"] == [30, 30, 30] and before["loss"]["xlabel"] == "step"
    for chart in probe["before"]:  # every run's curve is on the canvas, in its colour (the runs share one lr curve)
        assert sum(chart["pixels"]) > 100 if chart["metric"] == "lr" else all(n > 20 for n in chart["pixels"]), chart
    assert all(v != "–" for v in probe["hover"][1:]) and len(probe["hover"]) == 5  # the x value and 4 runs
    after = {c["metric"]: c for c in probe["after"]}
    assert after["val_loss"]["xlabel"].startswith("wall-clock time") and after["val_loss"]["ydistr"] == 3
    assert after["loss"]["xlabel"] == "tokens" and after["loss"]["xmax"] == 30 * 8 * 64
    assert after["loss"]["title"] == "Train loss (moving average of 5 points)"
    for chart in probe["after"]:  # baseline hidden in every chart, the others still drawn
        assert chart["shown"] == [False] + [True] * (len(chart["shown"]) - 1), chart
        assert chart["pixels"][0] == 0 and (chart["metric"] == "lr" or all(n > 20 for n in chart["pixels"][1:])), chart
    assert len(probe["fallback"]) >= 6 and all(w > 100 for w in probe["fallback"])  # the static figures, for no JS


def test_notes_are_dated_lines_in_notes_md(tmp_path):
    run = _fake_run(tmp_path, "r", "completed", [3.0])
    add_note(run, "first")
    add_note(run, "second\nline")
    lines = (run / "notes.md").read_text().splitlines()
    assert len(lines) == 2 and lines[0].endswith("  first") and lines[1].endswith("  second line")
    assert re.match(r"- \d{4}-\d\d-\d\d \d\d:\d\d  ", lines[0])
    with pytest.raises(LmlabError, match="empty"):
        add_note(run, "  ")


def test_missing_or_foreign_directories_are_one_clear_line(tmp_path, capsys):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    cases = [
        (["runs", str(tmp_path / "nope")], "does not exist"),
        (["runs", str(foreign)], "no runs in"),
        (["compare", str(foreign)], "no runs in"),
        (["report", str(tmp_path / "nope")], "does not exist"),
        (["note", str(foreign), "hello"], "is not a run directory"),
        (["compare", str(_fake_run(tmp_path, "r", "completed", [3.0])), "--metric", "val_acc"],
         "no run has 'val_acc'"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("lmlab: error:") and message in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(LmlabError, match="not a run directory"):
        read_run(foreign)
