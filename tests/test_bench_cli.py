"""`lmlab bench` from the command line, and benchmarks/update_results.py's section rewriting."""

import importlib.util
import json
from pathlib import Path

import pytest

from lmlab.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_bench_loader_prints_and_writes_the_report_with_the_machine(tiny_overrides, tmp_path, capsys):
    out = tmp_path / "report.md"
    assert main(["bench", "--only", "loader", "--out", str(out), *tiny_overrides]) == 0
    report = out.read_text()
    assert report.startswith("Machine:") and "- cpu: " in report and "- torch: " in report
    assert "### Data loader vs the training step" in report
    rows = json.loads(Path(f"{out}.json").read_text())
    assert rows["machine"]["device"] == "cpu"
    shares = [row["share_pct"] for row in rows["loader"] if row.get("share_pct") is not None]
    assert len(shares) == 2 and all(0 < share < 100 for share in shares)
    assert "### Data loader" in capsys.readouterr().out


def test_bench_find_batch_answers_for_the_configs_model(tiny_overrides, tmp_path, capsys):
    out = tmp_path / "batch.md"
    assert main(["bench", "--find-batch", "--budget-mib", "400", "--out", str(out), *tiny_overrides]) == 0
    rows = json.loads(Path(f"{out}.json").read_text())["find_batch"]
    fitting = [row["batch"] for row in rows if row["fits"]]
    assert fitting and max(fitting) >= 1


def test_an_unknown_benchmark_is_one_line_and_exit_2(capsys):
    assert main(["bench", "--only", "train,loadr"]) == 2
    assert capsys.readouterr().err.strip() == (
        "lmlab: error: unknown benchmark 'loadr'; choose from train, generate, loader, prepare, tokenizer (or all)")


def test_update_results_rewrites_only_its_own_section(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("update_results", ROOT / "benchmarks" / "update_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = tmp_path / "RESULTS.md"
    results.write_text("# people's summary\n<!-- cpu:start -->\nold\n<!-- cpu:end -->\n"
                       "<!-- gpu:start -->\ngpu stays\n<!-- gpu:end -->\n")
    monkeypatch.setattr(module, "HERE", tmp_path)
    monkeypatch.setattr(module, "run", lambda config: ("Machine:\n\n- cpu: test\n", {"machine": {}}))
    module.main(["train.device=cpu"])
    text = results.read_text()
    assert "old" not in text and "- cpu: test" in text and "gpu stays" in text and "# people's summary" in text
    assert "Command: `python benchmarks/update_results.py train.device=cpu`" in text
    assert json.loads((tmp_path / "results-cpu.json").read_text()) == {"machine": {}}
    results.write_text("no markers")
    with pytest.raises(SystemExit, match="no <!-- cpu:start -->"):
        module.main([])


def test_bench_quick_runs_small_sizes_and_one_repeat(tiny_overrides, tmp_path):
    out = tmp_path / "quick.md"
    assert main(["bench", "--quick", "--only", "train,prepare", "--no-reference", "--out", str(out),
                 *tiny_overrides]) == 0
    rows = json.loads(Path(f"{out}.json").read_text())
    assert len(rows["train"]) == 1  # the config's model only, no ladder
    assert [row["workers"] for row in rows["prepare"]] == [1, 2]
    assert all(row["mb_per_s"] > 0 for row in rows["prepare"])
