"""What a new user hits first (issue 17): bad sampling values, schedules, run names, listings, paths.

Each test runs the command as a user types it and checks what comes out: one
`lmlab: error:` line and exit status 2 for a bad value, or the fixed behaviour.
"""

import pytest
from evals_support import tiny_overrides

from lmlab import load_config, train
from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.rundir.metrics import read_metrics


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def tiny_run(small_corpus, data_cache, tmp_path_factory):
    """A finished 4-step run of the tiny model (its quality does not matter here)."""
    runs = tmp_path_factory.mktemp("new-user-runs")
    ov = tiny_overrides(small_corpus, data_cache, runs) + [
        "train.max_steps=4", "train.eval_every=2", "optim.warmup_steps=1", "train.sample_tokens=2",
        "train.run_name=tiny"]
    return train(load_config(None, ov), log=quiet)


def one_error_line(capsys, argv, *fragments):
    """Run `lmlab ARGV`; assert exit 2, nothing on stdout, one `lmlab: error:` line holding every fragment."""
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert out == "", out  # nothing printed first (e.g. not the prompt)
    err = err.strip()
    assert "\n" not in err and err.startswith("lmlab: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ---------------------------------------------------------------- 1. bad sampling values


@pytest.mark.parametrize("flags, says", [
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--temperature", "nan"], "temperature must be a finite number >= 0"),
    (["--top-p", "2"], "top_p must lie in (0, 1]"),
    (["--top-p", "0"], "top_p must lie in (0, 1]"),
    (["--top-k", "-5"], "top_k must be a whole number >= 0"),
    (["--max-new-tokens", "-5"], "max_new_tokens must be a whole number >= 0"),
])
def test_generate_refuses_bad_sampling_values_before_printing_the_prompt(tiny_run, capsys, flags, says):
    one_error_line(capsys, ["generate", str(tiny_run), "--prompt", "hi", *flags], says)


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 2.0}, {"top_p": 0.0}, {"top_k": -5},
                                    {"max_new_tokens": -5}, {"temperature": float("nan")}])
def test_the_python_generate_refuses_bad_sampling_values(tiny_run, kwargs):
    from lmlab import generate, load_run

    run = load_run(tiny_run)
    with pytest.raises(LmlabError):
        generate(run.model, run.tokenizer, "hi", **kwargs)


def test_good_sampling_values_still_generate(tiny_run, capsys):
    assert main(["generate", str(tiny_run), "--prompt", "hi", "--max-new-tokens", "3", "--top-p", "1",
                 "--top-k", "0", "--temperature", "0", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("hi")


# ---------------------------------------------------------------- 2, 9. lmlab schedule


@pytest.mark.parametrize("steps", ["-1", "0"])
def test_schedule_refuses_a_step_count_below_one(tmp_path, capsys, steps):
    one_error_line(capsys, ["schedule", "--steps", steps, "--out", str(tmp_path / "s.png")],
                   f"--steps) must be a whole number >= 1, got {steps}")
    assert not (tmp_path / "s.png").exists()


def test_schedule_with_steps_given_does_not_call_them_a_guess(tmp_path, capsys):
    argv = ["schedule", "--config", "owt-leaderboard", "--out", str(tmp_path / "s.png")]
    assert main([*argv, "--steps", "4000"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "4000 steps shown over 5400s (the steps you gave)" in first and "guess" not in first, first
    assert main(argv) == 0  # without --steps it is a guess, and says so
    assert "a guess of the steps that fit: set it with --steps" in capsys.readouterr().out


def test_schedule_drawn_steps_that_end_inside_warmup_still_plot(tmp_path, capsys):
    # owt-leaderboard warms up for 500 steps: 400 drawn steps never reach the peak (was: ValueError)
    assert main(["schedule", "--config", "owt-leaderboard", "--steps", "400", "--out", str(tmp_path / "s.png")]) == 0
    assert "last step    step     399" in capsys.readouterr().out


# ---------------------------------------------------------------- 4. a warm-up longer than the run


def test_a_warmup_longer_than_the_run_is_capped_at_a_tenth_with_a_warning(small_corpus, data_cache, tmp_path):
    lines = []
    ov = tiny_overrides(small_corpus, data_cache, tmp_path / "runs") + [
        "train.max_steps=20", "optim.warmup_steps=50", "train.eval_every=10", "train.log_every=1",
        "train.sample_tokens=2", "optim.min_lr=3e-4"]
    run_dir = train(load_config(None, ov), log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    warnings = [line for line in lines if line.startswith("warning: optim.warmup_steps")]
    assert len(warnings) == 1 and "warmup_steps=50" in warnings[0] and "run's 20 steps" in warnings[0]
    assert "capped at 2 steps" in warnings[0], warnings[0]
    assert load_config(run_dir / "config.toml").optim.warmup_steps == 2  # config.toml holds the value used
    lrs = [e["lr"] for e in read_metrics(run_dir / "metrics.jsonl") if "lr" in e]
    assert max(lrs) == pytest.approx(3e-3) and lrs[-1] == pytest.approx(3e-4)  # peaked, then decayed to min_lr


def test_the_schedule_command_shows_the_same_cap(tmp_path, capsys):
    assert main(["schedule", "train.max_steps=30", "--out", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("warning: optim.warmup_steps=50 is not shorter than the run's 30 steps"), out
    assert "capped at 3 steps" in out and "warmup end   step       2  lr 0.003" in out
    assert "last step    step      29  lr 0.0003" in out


# ---------------------------------------------------------------- 5. lmlab compare --smooth


def _run_with_curves(directory, n=40):
    """A run directory whose train and validation losses fall from 5 to 2.4 (the last value is the real one)."""
    import json

    directory.mkdir(parents=True)
    (directory / "config.toml").write_text('name = "x"\n[train]\nrun_name = "r"\n')
    events = [{"step": i, "tokens": 100 * i, "elapsed_s": float(i), "wall_s": float(i), "loss": 5 - 2.6 * i / (n - 1),
               "val_loss": 5 - 2.6 * i / (n - 1)} for i in range(n)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (directory / "summary.json").write_text(json.dumps({"status": "completed", "steps": n}))
    return directory


def test_compare_smooth_leaves_validation_curves_as_measured(tmp_path):
    from lmlab.lab.table import read_runs
    from lmlab.rundir.plots import compare_figure

    records = read_runs([_run_with_curves(tmp_path / "r")])
    ax = compare_figure(records, metric="val_loss", smooth=5).axes[0]
    drawn = [line for line in ax.lines if len(line.get_ydata()) == 40]
    assert len(drawn) == 1 and drawn[0].get_ydata()[-1] == pytest.approx(2.4)  # the real final value
    assert not any("smoothed" in t.get_text() for t in ax.get_legend().get_texts())


def test_compare_smooth_on_train_loss_says_so_in_the_legend(tmp_path):
    from lmlab.lab.table import read_runs
    from lmlab.rundir.plots import compare_figure

    records = read_runs([_run_with_curves(tmp_path / "r")])
    ax = compare_figure(records, metric="loss", smooth=5).axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "smoothed: moving average of 5 points (faint: raw)" in legend
    assert min(line.get_ydata()[-1] for line in ax.lines if len(line.get_ydata())) == pytest.approx(2.4)  # raw


# ---------------------------------------------------------------- 6. an imported run in lmlab runs


def test_an_imported_run_is_listed_as_imported_with_blank_training_columns(tiny_run, tmp_path, capsys):
    assert main(["export", str(tiny_run), str(tmp_path / "hf")]) == 0
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "runs" / "imp")]) == 0
    capsys.readouterr()
    assert main(["runs", str(tmp_path / "runs"), "--format", "tsv"]) == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    cells = dict(zip(header.split("\t"), row.split("\t")))
    assert cells["run"] == "imp" and cells["status"] == "imported", cells
    assert all(cells[c] == "-" for c in ("steps", "tokens", "time", "best val", "final val", "tok/s")), cells


# ---------------------------------------------------------------- 7. a run name that exists


def test_a_run_name_that_exists_is_refused_with_the_resume_command(tiny_run, small_corpus, data_cache, capsys):
    ov = tiny_overrides(small_corpus, data_cache, tiny_run.parent) + ["train.run_name=tiny", "train.max_steps=2"]
    before = sorted(p.name for p in tiny_run.parent.iterdir())
    one_error_line(capsys, ["train", *ov], f"run directory {tiny_run} already exists",
                   f"continue it with `lmlab train --resume {tiny_run}`", "or give another train.run_name")
    assert sorted(p.name for p in tiny_run.parent.iterdir()) == before  # no tiny-2


def test_repeating_a_run_from_its_config_toml_gets_a_new_name(tiny_run):
    config = load_config(tiny_run / "config.toml", ["train.max_steps=1", "train.eval_every=0"])
    assert config.train.run_name == ""  # the run's own name is not reused: a generated one follows
    again = train(config, log=quiet)
    assert again != tiny_run and again.parent == tiny_run.parent and again.name.startswith(config.name + "-")


# ---------------------------------------------------------------- 12. a read-only runs folder


def test_a_read_only_runs_folder_is_refused_before_any_data_is_built(small_corpus, tmp_path, capsys):
    from ckpt_support import read_only

    runs, cache = tmp_path / "ro", tmp_path / "fresh-cache"
    runs.mkdir()
    ov = tiny_overrides(small_corpus, cache, runs)
    with read_only(runs):
        err = one_error_line(capsys, ["train", *ov], f"cannot create a run in train.runs_dir: {runs} is not writable")
    assert ".tmp" not in err
    assert not cache.exists() or not any(cache.rglob("*.json"))  # no tokenizer, no shards were built


def test_writing_into_a_read_only_folder_names_that_folder_not_a_temporary_one(tiny_run, small_corpus, tmp_path,
                                                                               capsys):
    from ckpt_support import read_only

    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro):
        err = one_error_line(capsys, ["prepare", str(small_corpus[0]), "--tokenizer", str(tiny_run),
                                      "--out", str(ro / "shards")], f": {ro}")
    assert err.endswith(f": {ro}") and ".tmp" not in err, err


# ---------------------------------------------------------------- 8. lmlab config --keys


def _keys_output(capsys, *argv):
    import tomllib

    assert main(["config", "--keys", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    values = {}
    for line in lines[1:]:
        if line.startswith("  ") and not line.startswith("      "):
            key, _, value = line.strip().partition(" = ")
            values[key] = tomllib.loads(f"v = {value}")["v"]  # every value is valid TOML
    return lines[0], values


def test_config_keys_shows_what_lmlab_train_would_use_as_toml(capsys):
    from lmlab.config import all_keys, flat_keys

    header, values = _keys_output(capsys)
    assert "cpu-quickstart" in header
    assert set(values) == set(all_keys()) - {"name"}
    assert values == {k: v for k, v in flat_keys(load_config(None)).items() if k != "name"}
    assert values["model.context_length"] == 128 and values["model.d_model"] == 128  # not the dataclass's 256
    assert values["train.max_steps"] == 1200 and values["model.norm"] == "rmsnorm" and values["model.bias"] is False


def test_config_keys_honours_config_and_overrides(capsys):
    _, values = _keys_output(capsys, "--config", "tinystories-17m", "optim.lr=0.005")
    assert values["model.d_model"] == 512 and values["optim.lr"] == 0.005


# ---------------------------------------------------------------- 11. config.toml from another folder


def test_a_run_config_with_relative_inputs_repeats_from_another_folder(tiny_run, small_corpus, tmp_path,
                                                                         monkeypatch, capsys):
    import shutil
    import tomllib

    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    (start / "tok").mkdir(parents=True)
    elsewhere.mkdir()
    shutil.copy(tiny_run / "tokenizer.json", start / "tok" / "tokenizer.json")
    shutil.copy(small_corpus[0], start / "train.txt")
    monkeypatch.chdir(start)
    assert main(["prepare", "train.txt", "--tokenizer", "tok", "--out", "shards", "--val-fraction", "0.1"]) == 0
    small = ["model.context_length=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
             "train.batch_size=8", "train.eval_batches=2", "train.eval_every=0", "train.sample_tokens=2",
             "train.device=cpu", "optim.warmup_steps=1", "train.runs_dir=runs", "train.run_name=own"]
    assert main(["train", "data.corpus=", "data.tokenizer=tok", "data.shards=shards", "train.max_steps=2", *small]) == 0
    config_toml = start / "runs" / "own" / "config.toml"
    data = tomllib.loads(config_toml.read_text())["data"]
    assert data["tokenizer"] == str(start / "tok") and data["shards"] == str(start / "shards")
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["train", "--config", str(config_toml), "train.max_steps=1"]) == 0, capsys.readouterr().err
    assert len(list((elsewhere / "runs").iterdir())) == 1  # outputs go where the repeat was started


# ---------------------------------------------------------------- 3. the README's Python example


def test_the_readme_python_example_runs_as_written(small_corpus, data_cache, tmp_path, monkeypatch, capsys):
    """The README's ```python block, executed verbatim in a fresh namespace.

    Only load_config is wrapped, to append the tiny-model overrides after the
    README's own (2 steps instead of 300 of the quick-start model), so the test
    takes seconds; every name the block uses must be defined by the block.
    """
    import re
    from pathlib import Path

    import lmlab

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert len(blocks) == 1
    real = lmlab.load_config
    tiny = tiny_overrides(small_corpus, data_cache, tmp_path / "runs") + [
        "train.max_steps=2", "train.eval_every=0", "train.sample_tokens=2", "optim.warmup_steps=1"]
    monkeypatch.setattr(lmlab, "load_config", lambda path=None, overrides=(): real(path, [*overrides, *tiny]))
    capsys.readouterr()
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    story, run = namespace["story"], namespace["run"]
    assert isinstance(story, str) and not story.startswith("Once upon a time")  # the new text only
    assert out.endswith("Once upon a time" + story + "\n")  # the README prints prompt + continuation
    assert namespace["logits"].shape == (1, namespace["input_ids"].shape[1], run.config.model.vocab_size)
    assert "generate() returns only the text written after the prompt" in blocks[0]


# ---------------------------------------------------------------- 14. lm-eval's folders, eval beside HF_DIR


def test_what_docs_lm_eval_creates_in_the_clone_is_ignored_by_git():
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    doc = (root / "docs" / "lm-eval.md").read_text(encoding="utf-8")
    created = ["hf/quickstart", "lm-eval-tasks/lmlab_mmlu.yaml", "lm-eval-out/results.json", "mmlu_val.csv",
               "hf/quickstart-evals/choice-mmlu_val.json"]
    for path in created[:4]:
        assert path.partition("/")[0] in doc  # the doc still has you make it
    for path in created:
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=root, check=False)
        assert ignored.returncode == 0, f"{path} is not ignored by .gitignore"


def test_eval_of_a_hugging_face_folder_writes_beside_it_not_into_it(tiny_run, small_corpus, tmp_path):
    hf = tmp_path / "hf" / "tiny"
    assert main(["export", str(tiny_run), str(hf)]) == 0
    before = sorted(p.name for p in hf.iterdir())
    assert main(["eval", str(hf), "--text", str(small_corpus[1]), "--limit", "1"]) == 0
    assert sorted(p.name for p in hf.iterdir()) == before  # the exported folder is as lmlab export wrote it
    assert (tmp_path / "hf" / "tiny-evals" / "text-valid.json").is_file()


def test_a_run_config_with_resume_auto_still_continues_that_run(tiny_run, capsys):
    config = load_config(tiny_run / "config.toml", ["train.resume=auto", "train.max_steps=6"])
    assert config.train.run_name == "tiny"  # resume=auto names the run itself: its name is kept
    assert load_config(tiny_run / "config.toml", ["train.run_name=tiny"]).train.run_name == "tiny"
