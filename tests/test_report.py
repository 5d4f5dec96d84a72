"""Runs compared: the runs table, compare figures on each clock, the HTML / Markdown report, notes, errors."""

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
    assert page.count('src="data:image/svg+xml;base64,') >= 6  # val loss on 4 clocks, train loss on 2
    assert "<script" not in page and not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch
    assert "model.norm_position" in page and "no norm: &lt;slower&gt; &amp; noisier at the start" in page
    assert "Once upon a time" in page  # the samples
    markdown = (ablation / "report.md").read_text()
    assert "| model.norm | model.norm_position |" in markdown and "no norm: <slower>" in markdown
    for png in re.findall(r"\]\((report_files/[^)]+\.png)\)", markdown):
        assert (ablation / png).read_bytes()[:4] == b"\x89PNG"
    assert len(re.findall(r"!\[", markdown)) >= 6


def _chromium():
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed (apt-get install chromium)")
def test_report_loads_in_headless_chromium_without_console_errors_and_shows_every_run(ablation, tmp_path):
    from lmlab.lab.report import write_report

    page, _ = write_report(ablation, out=tmp_path / "report.html")
    # The check script goes into a copy: the report itself has no script at all.
    probe = ("<script>addEventListener('load', () => { const imgs = [...document.images];"
             " document.body.dataset.images = imgs.length;"
             " document.body.dataset.broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length; });"
             "</script>")
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text().replace("</body>", probe + "</body>"))
    result = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", checked.as_uri()],
        capture_output=True, text=True, timeout=120)
    dom = result.stdout
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    body = re.search(r"<body[^>]*>", dom).group(0)
    images = int(re.search(r'data-images="(\d+)"', body).group(1))
    assert images >= 6 and 'data-broken="0"' in body
    for name in ("baseline", "nonorm", "postnorm"):
        assert f'id="run-{name}"' in dom and f"<td>{name}</td>" in dom


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
