"""`lmlab bench reference`: the run of `lmlab train` repeated by transformers' Llama in a plain loop.

The two runs share the config, data order, initial weights and learning rates and
nothing of the step's computation, so their losses may differ by float rounding only.
Measured on the tiny model below (2 layers, d_model 32, 20 steps, TinyStories slice,
fp32 CPU, 2026-12-05): every logged training loss within 1.7e-7 relative, the
validation losses at steps 10 and 20 equal. The tolerance, 1e-5 relative, leaves 50x
room for other CPUs' kernels, and is 1,000x below the change one step of training makes
here (~1e-2), so a batch taken out of order, a learning rate off by a step or a
different initialisation fails it.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmlab.cli import main
from lmlab.rundir.metrics import read_metrics

RTOL = 1e-5
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "train.max_steps=20", "train.eval_every=10",
        "train.threads=1"]


def losses(run_dir, key):
    return {e["step"]: e[key] for e in read_metrics(Path(run_dir) / "metrics.jsonl") if key in e}


def rel(a, b):
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, small_corpus, data_cache):
    """(lmlab train's run, lmlab bench reference's run) of the same tiny config with train.evals=copy."""
    from evals_support import tiny_overrides

    runs = tmp_path_factory.mktemp("runs")
    overrides = tiny_overrides(small_corpus, data_cache, runs) + TINY + ["train.run_name=tiny", "train.evals=copy"]
    assert main(["train", *overrides]) == 0
    assert main(["bench", "reference", *overrides]) == 0
    return runs / "tiny", runs / "tiny-reference"


def test_first_step_loss_equals_lmlab_trains(two_runs):
    ours, reference = (losses(run, "loss") for run in two_runs)
    assert sorted(reference) == list(range(1, 21))  # train.log_every=1
    assert rel(reference[1], ours[1]) < RTOL
    assert rel(ours[20], ours[1]) > 1000 * RTOL  # the runs trained: agreement is not that of two untouched models


def test_every_loss_and_the_copy_probe_agree_after_20_steps(two_runs):
    ours, reference = two_runs
    for key in ("loss", "val_loss"):
        a, b = losses(ours, key), losses(reference, key)
        assert a.keys() == b.keys() and len(a) >= 2
        assert max(rel(b[step], a[step]) for step in a) < RTOL, key
    for key in ("copy_acc_random", "copy_acc_meaningful"):  # train.evals ran on transformers' model
        a, b = losses(ours, key), losses(reference, key)
        assert sorted(b) == [10, 20] and all(abs(a[s] - b[s]) < 1e-6 for s in a)
    lrs = (losses(run, "lr") for run in two_runs)
    assert next(lrs) == next(lrs)  # lmlab's schedule, step for step


def test_the_reference_run_says_what_trained_and_lmlab_reads_it(two_runs, tmp_path):
    from lmlab.data.batches import Batches
    from lmlab.rundir.run import load_run
    from lmlab.training.duties import evaluate

    ours, reference = two_runs
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 20
    assert summary["reference"]["implementation"].startswith("LlamaForCausalLM (transformers ")
    env = json.loads((reference / "env.json").read_text())
    assert env["reference"].startswith("LlamaForCausalLM") and env["optimizer"].startswith("torch.optim.AdamW")
    # model.safetensors holds the trained weights under lmlab's names: lmlab's model gives the same val loss
    run = load_run(reference)
    assert rel(_lmlab_val_loss(run, Batches, evaluate), summary["final_val_loss"]) < RTOL
    out = tmp_path / "val.png"
    assert main(["compare", str(ours), str(reference), "--metric", "val_loss", "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".svg").is_file()
    assert main(["runs", str(ours.parent)]) == 0


def _lmlab_val_loss(run, Batches, evaluate):
    """The validation loss of a loaded run by lmlab's own model and evaluation code."""
    from lmlab.data.corpora import ensure_data

    t = run.config.train
    _, shards = ensure_data(run.config.data, log=lambda *_: None)
    val = Batches(shards, "val", t.batch_size, run.config.model.context_length).fixed(t.eval_batches)
    return evaluate(run.model, val, "fp32", torch.device("cpu"))


@pytest.mark.parametrize("bad", [
    ["model.norm=layernorm"],
    ["model.ffn=gelu"],
    ["data.packing=stream", "model.memory=8"],
    ["optim.name=muon"],
    ["train.max_time=60"],
])
def test_what_transformers_llama_cannot_repeat_is_one_line_and_nothing_written(bad, tiny_overrides, tmp_path, capsys):
    code = main(["bench", "reference", *tiny_overrides, *bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("lmlab: error: lmlab bench reference cannot repeat this run with transformers: ")
    assert bad[-1].split("=")[0] in err[0]
    assert not (tmp_path / "runs").exists()


def test_a_taken_run_name_is_refused_without_resume_advice(two_runs, tiny_overrides, capsys):
    runs = two_runs[1].parent
    assert main(["bench", "reference", *tiny_overrides, f"train.runs_dir={runs}", "train.run_name=tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab: error: run directory ") and "already exists" in err and "--resume" not in err


def test_probes_read_any_module_returning_logits_through_the_adapter():
    from evals_support import InductionModel

    from lmlab.evals.adapter import LogitsModel
    from lmlab.evals.scoring import score

    inner = InductionModel(vocab_size=50, context_length=32)

    class OutputObject(torch.nn.Module):  # transformers-like: an output object, no .config the probes know
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return SimpleNamespace(logits=self.inner(input_ids))

    wrapped = LogitsModel(OutputObject(), vocab_size=50, context_length=32)
    sequences = [(list(range(1, 11)) + [0] + list(range(1, 11)), 12)]
    direct, adapted = score(inner, sequences)[0], score(wrapped, sequences)[0]
    assert adapted.correct.all() and (direct.correct == adapted.correct).all()
    assert abs(direct.logprobs - adapted.logprobs).max() == 0
