"""`lmlab bench speedrun`: recipes raced to a target in interleaved turns; the table, the plot, the report."""

import json
from pathlib import Path

import pytest

from lmlab.bench.speedrun import RECIPES, parse_recipes, speedrun, table
from lmlab.cli import main
from lmlab.errors import LmlabError


def shared(tiny_overrides):
    """The tiny data and shape for every recipe; optimizer keys stay the recipes' own."""
    return [o for o in tiny_overrides if not o.startswith(("optim.", "train.eval_every"))] + [
        "train.max_steps=8", "train.eval_batches=2", "optim.warmup_steps=2"]


def test_three_recipes_two_seeds_in_interleaved_turns(tiny_overrides, tmp_path):
    logged = []
    section, figure, runs = speedrun(tmp_path / "race", seeds=2, target=6.0, eval_every=2,
                                     overrides=shared(tiny_overrides), log=logged.append)
    order = [(r["recipe"], r["seed"]) for r in runs]
    assert order == [("cpu-quickstart", 1337), ("nanogpt", 1337), ("cpu-speedrun", 1337),
                     ("nanogpt", 1338), ("cpu-speedrun", 1338), ("cpu-quickstart", 1338)]
    configs = {r["recipe"]: (Path(r["run_dir"]) / "config.toml").read_text() for r in runs}
    for line in ('norm = "layernorm"', 'position = "learned"', 'ffn = "gelu"', "tie_embeddings = true", "lr = 0.0006"):
        assert line in configs["nanogpt"]
    assert 'name = "muon"' in configs["cpu-speedrun"] and 'name = "adamw"' in configs["cpu-quickstart"]
    for run in runs:  # each stopped at the first evaluation at or below the target, and says when
        assert all(v > 6.0 for _, _, v in run["curve"][:-1])
        if run["reached"]:
            assert run["curve"][-1][2] <= 6.0
            assert run["seconds"] == run["curve"][-1][0] and run["tokens"] == run["curve"][-1][1]
        else:
            assert run["final_val_loss"] > 6.0 and run["curve"][-1][1] == 8 * 8 * 64  # the whole budget
    rows = {row["recipe"]: row for row in section.rows}
    assert set(rows) == set(RECIPES)
    assert sum(r["reached"] for r in runs) >= 2, runs  # the Muon recipe, at least, gets there in 8 steps
    for row in rows.values():
        assert row["reached"] == f"{sum(r['reached'] for r in runs if r['recipe'] == row['recipe'])}/2"
        if "s_med" in row:
            assert row["s_min"] <= row["s_med"] <= row["s_max"] and row["ratio"] > 0
    assert figure.exists() and figure.stat().st_size > 5000
    assert "| recipe |" in section.markdown()


def test_a_run_that_misses_the_target_is_reported_as_such():
    def run(recipe, reached, seconds, final):
        return {"recipe": recipe, "seed": 1, "reached": reached, "seconds": seconds if reached else None,
                "tokens": 1000 if reached else None, "final_val_loss": final, "total_s": 100.0, "curve": []}

    section = table([run("cpu-quickstart", False, None, 2.45), run("cpu-speedrun", True, 40.0, 2.43)],
                    ("cpu-quickstart", "cpu-speedrun"), 2.44)
    rows = {row["recipe"]: row for row in section.rows}
    assert rows["cpu-quickstart"]["reached"] == "0/1" and "s_med" not in rows["cpu-quickstart"]
    assert rows["cpu-speedrun"]["ratio"] == pytest.approx(0.4)  # against the quick start's whole run


def test_recipe_names_are_checked():
    assert parse_recipes("nanogpt,cpu-speedrun") == ("nanogpt", "cpu-speedrun")
    with pytest.raises(LmlabError, match="unknown speedrun recipe 'nanogtp'"):
        parse_recipes("nanogtp")


def test_the_cli_writes_the_report_and_appends_it(tiny_overrides, tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n")
    code = main(["bench", "speedrun", *shared(tiny_overrides), "--recipes", "cpu-speedrun", "--seeds", "1",
                 "--target", "6.5", "--eval-every", "2", "--dir", str(tmp_path / "sr"), "--append", str(results)])
    assert code == 0
    text = results.read_text()
    assert text.startswith("# Results\n") and "### Speedrun: time to validation loss 6.5" in text
    assert "Command: `lmlab bench" in text and (tmp_path / "sr" / "speedrun.png").exists()
    assert json.loads((tmp_path / "sr" / "speedrun.json").read_text())[0]["recipe"] == "cpu-speedrun"


def test_bad_speedrun_flags_are_one_line(capsys):
    assert main(["bench", "speedrun", "--recipes", "quick"]) == 2
    assert capsys.readouterr().err.strip().startswith("lmlab: error: unknown speedrun recipe 'quick'")
    assert main(["bench", "speedrun", "--seeds", "0"]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err


def test_a_time_cap_stops_the_other_recipes_and_reports_their_best(tiny_overrides, tmp_path):
    """--max-time-factor: the quick start runs whole; the others stop at the cap, schedule unchanged."""
    logged = []
    section, _, runs = speedrun(tmp_path / "capped", recipes=("cpu-quickstart", "cpu-speedrun"), seeds=1,
                                target=0.5, eval_every=2, overrides=shared(tiny_overrides), log=logged.append,
                                max_time_factor=1e-6)  # a cap of ~1 ms: one step, then the time rule fires
    quick, fast = runs
    assert quick["status"] == "completed" and quick["total_tokens"] == 8 * 8 * 64
    config = (Path(fast["run_dir"]) / "config.toml").read_text()
    assert "max_time = 0.001" in config and 'progress = "steps"' in config and "max_steps = 8" in config
    assert fast["status"] == "time_budget" and not fast["reached"]
    assert fast["total_tokens"] == 8 * 64  # stopped after its first step; evaluated there (the final evaluation)
    assert fast["best_val_loss"] == min(v for _, _, v in fast["curve"])
    rows = {row["recipe"]: row for row in section.rows}
    assert rows["cpu-speedrun"]["missed"] == f"seed 1337: best {fast['best_val_loss']:.4f} at {fast['best_s']:.0f} s"
    assert "ratio" not in rows["cpu-speedrun"] and "capped at 0s" in logged[2]
    assert "target not reached (time_budget): best" in logged[3]
    saved = json.loads((tmp_path / "capped" / "runs-so-far.json").read_text())  # written after each run
    assert [r["recipe"] for r in saved] == ["cpu-quickstart", "cpu-speedrun"] and saved[1]["status"] == "time_budget"


def test_the_time_cap_needs_the_quick_start_first(capsys):
    assert main(["bench", "speedrun", "--recipes", "cpu-speedrun,cpu-quickstart", "--max-time-factor", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab: error: --max-time-factor") and "\n" not in err
