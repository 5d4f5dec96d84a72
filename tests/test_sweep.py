"""Sweeps: a CPU learning-rate sweep with a diverging trial, a target-loss sweep, resuming after a kill,
random search, LR scaling, and bad grids refused before anything runs."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.config import load_config
from lmlab.errors import LmlabError
from lmlab.lab.sweep import make_trials, parse_grid, parse_random, run_sweep, trial_config

QUIET = dict(log=lambda *_: None)


def sweep_json(out):
    return json.loads((Path(out) / "sweep.json").read_text())


def mtimes(out):
    return {p.parent.name: p.stat().st_mtime_ns for p in (Path(out) / "runs").glob("*/summary.json")}


# ------------------------------------------------------------------ refused before any trial starts


@pytest.mark.parametrize("args, message", [
    (["--grid", "optim.learning_rate=1e-3,3e-3"], "did you mean 'optim.lr'"),
    (["--grid", "optim.lr=1e-3,fast"], "config key 'optim.lr' wants a number, got 'fast'"),
    (["--grid", "optim.lr="], "has no values"),
    (["--grid", "optim.lr"], "is not KEY=V1,V2"),
    (["--grid", "optim.lr=1e-3,1e-3"], "repeats a value"),
    (["--grid", "optim.lr=1e-3", "--grid", "optim.lr=1e-2"], "given twice"),
    (["--grid", "optim.schedule=cosine,wsdd"], "choose one of"),
    (["--grid", "optim.warmup_steps=10,-1"], "optim.warmup_steps must be >= 0"),
    (["--grid", "model.n_heads=3,4"], "trial 000-n_heads=3: model.d_model=128 must be divisible"),
    (["--grid", "data.train_files=a.txt,b.txt"], "lists cannot be swept"),
    (["--grid", "train.max_steps=1.5"], "wants an integer"),
    (["--random", "optim.lr=loguniform:0:1e-2", "--trials", "3"], "LOW > 0"),
    (["--random", "optim.lr=normal:1:2", "--trials", "3"], "loguniform:LOW:HIGH"),
    (["--random", "optim.lr=loguniform:1e-4:1e-2"], "needs --trials"),
    (["--random", "optim.schedule=uniform:0:1", "--trials", "2"], "only numeric keys"),
    (["--trials", "3", "--grid", "optim.lr=1e-3"], "give --random"),
    ([], "nothing to sweep"),
    (["--grid", "optim.lr=1e-3", "--workers", "0"], "--workers must be >= 1"),
])
def test_a_bad_sweep_is_refused_in_one_line_before_anything_runs(tmp_path, capsys, args, message):
    out = tmp_path / "sweep"
    assert main(["sweep", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_an_override_after_the_options_applies_to_every_trial_and_is_checked(tmp_path, capsys):
    assert main(["sweep", "--out", str(tmp_path / "s"), "--grid", "optim.lr=1e-3", "train.max_stepz=5"]) == 2
    assert "did you mean 'train.max_steps'" in capsys.readouterr().err


# ------------------------------------------------------------------ trials, random search, scaling


def test_trials_are_the_grid_product_in_a_fixed_order_with_readable_names():
    base = load_config(None)
    trials = make_trials(base, parse_grid(["optim.lr=1e-3,3e-3", "train.batch_size=16,32"]))
    assert [t.name for t in trials] == ["000-lr=1e-3_batch_size=16", "001-lr=1e-3_batch_size=32",
                                        "002-lr=3e-3_batch_size=16", "003-lr=3e-3_batch_size=32"]
    config = trial_config(base, trials[2].values)
    assert config.optim.lr == 3e-3 and config.train.batch_size == 16
    assert config.optim.min_lr == pytest.approx(base.optim.min_lr)  # lr 3e-3 is the base's: same ratio
    low = trial_config(base, {"optim.lr": "1e-4"})
    assert low.optim.min_lr == pytest.approx(1e-5)  # min_lr keeps its ratio to lr (else 3e-4 > lr is refused)


def test_random_search_is_seeded_log_uniform_and_rounded():
    base = load_config(None)
    specs = parse_random(["optim.lr=loguniform:1e-4:1e-1", "optim.warmup_steps=uniform:10:100"])
    a = make_trials(base, (), specs, n_trials=40, seed=3)
    assert [t.values for t in a] == [t.values for t in make_trials(base, (), specs, n_trials=40, seed=3)]
    assert [t.values for t in a] != [t.values for t in make_trials(base, (), specs, n_trials=40, seed=4)]
    lrs = [t.values["optim.lr"] for t in a]
    assert all(1e-4 <= lr <= 1e-1 for lr in lrs) and all(float(f"{lr:.3g}") == lr for lr in lrs)
    assert sum(lr < 1e-2 for lr in lrs) > 15  # log-uniform: two of three decades below 1e-2
    assert all(isinstance(t.values["optim.warmup_steps"], int) for t in a)
    grid_and_random = make_trials(base, parse_grid(["train.batch_size=16,32"]), specs[:1], n_trials=3, seed=0)
    assert len(grid_and_random) == 6 and grid_and_random[0].name.startswith("000-batch_size=16_lr=")


@pytest.mark.parametrize("rule, factor", [("linear", 4.0), ("sqrt", 2.0)])
def test_batch_size_sweeps_scale_the_lr_by_a_rule(rule, factor):
    base = load_config(None, ["train.batch_size=16", "optim.lr=1e-3", "optim.min_lr=1e-4"])
    config = trial_config(base, {"train.batch_size": "64"}, lr_scaling=rule)
    assert config.optim.lr == pytest.approx(1e-3 * factor) and config.optim.min_lr == pytest.approx(1e-4 * factor)
    accum = trial_config(base, {"train.grad_accum": "4"}, lr_scaling=rule)
    assert accum.optim.lr == pytest.approx(1e-3 * factor)  # the batch is batch_size x grad_accum
    assert trial_config(base, {"train.batch_size": "16"}, lr_scaling=rule).optim.lr == 1e-3


# ------------------------------------------------------------------ real sweeps on the bundled corpus


def test_lr_sweep_with_a_diverging_rate_gives_the_table_best_config_and_plots_and_resumes(tiny_overrides, tmp_path):
    out = tmp_path / "lr-sweep"
    # four rates of a model without norms: 1 blows up (NaN within a few steps), the others train
    args = dict(overrides=tiny_overrides + ["model.norm=none", "train.max_steps=20"],
                grid=["optim.lr=1e-3,3e-3,1e-2,1"], out=out, **QUIET)
    trials = run_sweep(**args)
    by_lr = {t.values["optim.lr"]: t.record for t in trials}
    assert by_lr["1"]["status"] == "diverged"
    assert all(by_lr[lr]["status"] == "completed" for lr in ("1e-3", "3e-3", "1e-2"))
    assert by_lr["1e-2"]["metric"] < by_lr["1e-3"]["metric"]

    record = sweep_json(out)
    assert [t["status"] for t in record["trials"]] == ["completed", "completed", "completed", "diverged"]
    assert record["grid"] == ["optim.lr=1e-3,3e-3,1e-2,1"] and record["metric"] == "best_val_loss"
    table = (out / "sweep.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "trial" not in line]
    ranked = sorted(["1e-3", "3e-3", "1e-2"], key=lambda lr: by_lr[lr]["metric"])
    assert [row.split(" | ")[2] for row in rows] == ranked + ["1"]  # sorted by the metric, diverged last
    assert "**diverged**" in rows[-1] and "diverged at step" in rows[-1]

    best = load_config(out / "best.toml")
    winner = load_config(Path(by_lr[ranked[0]]["run_dir"]) / "config.toml")
    assert best.optim.lr == float(ranked[0]) and best.optim == winner.optim and best.model == winner.model
    assert best.train.run_name == "" and best.train.runs_dir == "runs"
    assert winner.optim.min_lr == pytest.approx(float(ranked[0]) * 0.1)  # the preset's min_lr / lr ratio
    for plot in ("curves.png", "optim.lr.png"):
        assert (out / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same command again redoes nothing; a trial without its summary (interrupted) is run again
    before = mtimes(out)
    run_sweep(**args)
    assert mtimes(out) == before
    (out / "runs" / "001-lr=3e-3" / "summary.json").unlink()
    trials = run_sweep(**args)
    after = mtimes(out)
    assert {k: v for k, v in after.items() if k != "001-lr=3e-3"} == {k: v for k, v in before.items() if k != "001-lr=3e-3"}
    assert after["001-lr=3e-3"] != before["001-lr=3e-3"]
    assert [t.record["status"] for t in trials] == ["completed", "completed", "completed", "diverged"]
    assert [t.record["metric"] for t in trials] == [by_lr[lr]["metric"] for lr in ("1e-3", "3e-3", "1e-2", "1")]
    # another base config in the same directory would mix incomparable trials: refused, nothing run
    with pytest.raises(LmlabError, match=r"another base config \(optim.warmup_steps: 5 -> 3\)"):
        run_sweep(**{**args, "overrides": args["overrides"] + ["optim.warmup_steps=3"]})
    assert mtimes(out) == after


def test_target_loss_sweep_stops_each_trial_at_the_target_and_ranks_by_time_to_target(tiny_overrides, tmp_path):
    out = tmp_path / "target"
    trials = run_sweep(overrides=tiny_overrides + ["train.target_val_loss=5.3"], grid=["optim.lr=1e-4,3e-3,1e-2"],
                       out=out, metric="time_to_target", **QUIET)
    by_lr = {t.values["optim.lr"]: t.record for t in trials}
    # measured on this corpus: lr 1e-2 is below 5.3 at step 10, 3e-3 at step 20, 1e-4 never (6.2)
    assert by_lr["1e-2"]["status"] == by_lr["3e-3"]["status"] == "target_reached"
    assert by_lr["1e-2"]["target"]["step"] == 10 and by_lr["3e-3"]["target"]["step"] == 20
    assert by_lr["1e-2"]["steps"] == 10 and by_lr["3e-3"]["steps"] == 20
    for lr in ("1e-2", "3e-3"):
        assert by_lr[lr]["metric"] == by_lr[lr]["target"]["elapsed_s"] > 0
    assert by_lr["1e-4"]["status"] == "completed" and by_lr["1e-4"]["metric"] is None
    assert by_lr["1e-4"]["target"] == {"target_val_loss": 5.3, "reached": False}
    table = (out / "sweep.md").read_text()
    assert "target at step 10" in table and "target not reached" in table


def test_a_killed_sweep_finishes_when_the_same_command_runs_again(tiny_overrides, tmp_path, capsys):
    out = tmp_path / "killed"
    args = ["sweep", "--out", str(out), "--grid", "optim.lr=1e-3,3e-3,1e-2", *tiny_overrides, "train.max_steps=20"]
    process = subprocess.Popen([sys.executable, "-m", "lmlab.cli", *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "runs" / "000-lr=1e-3" / "summary.json"
    deadline = time.monotonic() + 120
    while not first.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # no chance to clean up: the second trial is cut mid-run
    process.wait()
    assert first.exists()
    done_before = mtimes(out)
    assert len(done_before) < 3
    assert main(args) == 0  # the same command again (in this process, to save a start-up)
    assert f"{len(done_before)} done before (skipped)" in capsys.readouterr().out
    assert all(mtimes(out)[name] == mtime for name, mtime in done_before.items())
    record = sweep_json(out)
    assert [t["status"] for t in record["trials"]] == ["completed"] * 3
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["000-lr=1e-3", "001-lr=3e-3", "002-lr=1e-2"]


def test_a_trial_that_fails_is_recorded_the_sweep_goes_on_then_exits_2_with_one_line(tiny_overrides, tmp_path, capsys):
    """optim.name=adamw8bit without bitsandbytes: a user's config mistake that only the trial meets.

    The other trial still runs and is ranked; then one line names the failed trial and its error; the same
    command again skips the finished trial and tries the failed one again.
    """
    import importlib.util

    if importlib.util.find_spec("bitsandbytes"):
        pytest.skip("bitsandbytes is installed here: the 8-bit trial would not fail")
    out = tmp_path / "optimizers"
    args = ["sweep", "--out", str(out), "--grid", "optim.name=adamw,adamw8bit", *tiny_overrides, "train.max_steps=4"]
    for attempt in range(2):
        assert main(args) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
        assert lines[0] == (
            f"lmlab: error: sweep {out}: 1 of 2 trials failed: 001-name=adamw8bit (optim.name=adamw8bit needs "
            "bitsandbytes, which could not be imported (No module named 'bitsandbytes'): pip install bitsandbytes, "
            f"or use optim.name=adamw); the others' results are in {out / 'sweep.md'}; once the cause is fixed, "
            "the same command runs the failed trials again and skips the finished ones")
        assert [t["status"] for t in sweep_json(out)["trials"]] == ["completed", "failed"]
        assert (out / "best.toml").is_file() and "**failed**" in (out / "sweep.md").read_text()
        if attempt:
            assert "1 done before (skipped)" in captured.out and "[001-name=adamw8bit] start" in captured.out


@pytest.mark.slow
def test_parallel_workers_share_the_cores_and_give_the_same_results(tiny_overrides, tmp_path):
    serial = run_sweep(overrides=tiny_overrides + ["train.threads=1"], grid=["optim.lr=1e-3,1e-2"],
                       out=tmp_path / "serial", **QUIET)
    out = tmp_path / "parallel"
    command = [sys.executable, "-m", "lmlab.cli", "sweep", "--out", str(out), "--grid", "optim.lr=1e-3,1e-2",
               "--workers", "2", *tiny_overrides, "train.threads=1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    record = sweep_json(out)
    assert [t["status"] for t in record["trials"]] == ["completed"] * 2
    assert [t["best_val_loss"] for t in record["trials"]] == [t.record["best_val_loss"] for t in serial]
