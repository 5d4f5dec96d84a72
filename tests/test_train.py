"""End-to-end training on real text: the run directory, determinism, loading and sampling."""

import json
import math

import pytest
import torch

from lmlab import generate, load_config, load_run, train
from lmlab.cli import main
from lmlab.rundir.metrics import read_metrics


def losses(run_dir, key="loss"):
    return [e[key] for e in read_metrics(run_dir / "metrics.jsonl") if key in e]


@pytest.fixture
def trained_run(tiny_overrides):
    return train(load_config(None, tiny_overrides + ["train.run_name=tiny"]), log=lambda *_: None)


def test_a_run_leaves_the_documented_run_directory(trained_run):
    run_dir = trained_run
    for name in ("config.toml", "tokenizer.json", "model.safetensors", "metrics.jsonl", "summary.json",
                 "samples.md", "plots/loss.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    events = read_metrics(run_dir / "metrics.jsonl")
    train_events = [e for e in events if "loss" in e]
    assert [e["step"] for e in train_events] == list(range(1, 31))
    for e in train_events:
        assert {"step", "tokens", "elapsed_s", "lr", "loss", "grad_norm", "tokens_per_s"} <= e.keys()
        assert e["tokens"] == e["step"] * 8 * 64
    assert [e["step"] for e in events if "val_loss" in e] == [10, 20, 30]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 30 and summary["tokens"] == 30 * 8 * 64
    assert summary["final_val_loss"] == losses(run_dir, "val_loss")[-1]
    assert summary["best_val_loss"] == min(losses(run_dir, "val_loss"))
    # 30 steps already beat a uniform guess over the 512-token vocabulary by a wide margin,
    # and come below the no-context (unigram) baseline
    assert summary["final_val_loss"] < math.log(512) - 1.0
    assert summary["final_val_loss"] < summary["unigram_val_loss"]
    assert "## 'Once upon a time'" in (run_dir / "samples.md").read_text()


def test_same_seed_same_losses_and_the_saved_config_repeats_the_run(trained_run, tiny_overrides):
    again = train(load_config(trained_run / "config.toml"), log=lambda *_: None)
    assert again != trained_run
    assert losses(again) == losses(trained_run)
    assert losses(again, "val_loss") == losses(trained_run, "val_loss")
    other_seed = train(load_config(None, tiny_overrides + ["train.seed=7", "train.max_steps=3"]), log=lambda *_: None)
    assert losses(other_seed)[:3] != losses(trained_run)[:3]


def test_load_run_gives_model_tokenizer_and_config(trained_run):
    run = load_run(trained_run)
    assert run.config.model.vocab_size == run.tokenizer.vocab_size
    ids = torch.tensor([run.tokenizer.encode("Once upon a time")])
    logits = run.model(ids)
    assert logits.shape == (1, ids.shape[1], run.config.model.vocab_size)
    text = generate(run.model, run.tokenizer, "Once upon a time", max_new_tokens=10, temperature=0)
    assert text == generate(run.model, run.tokenizer, "Once upon a time", max_new_tokens=10, temperature=0)


def test_generate_command_streams_a_continuation(trained_run, capsys):
    assert main(["generate", str(trained_run), "--prompt", "Once upon a time", "--max-new-tokens", "12",
                 "--greedy"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Once upon a time") and len(out) > len("Once upon a time\n")


@pytest.mark.parametrize("extra", [
    ["data.packing=document"],
    ["train.precision=bf16", "train.grad_accum=2"],
    ["train.max_tokens=4096", "train.max_steps=0"],
])
def test_variants_train_and_finish(tiny_overrides, extra):
    run_dir = train(load_config(None, tiny_overrides + extra + ["train.max_steps=8"] * ("train.max_steps=0" not in extra)),
                    log=lambda *_: None)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert all(math.isfinite(x) for x in losses(run_dir))
    if "train.max_tokens=4096" in extra:
        assert summary["steps"] == 8 and summary["tokens"] == 4096


def test_training_can_start_from_an_exported_hugging_face_folder(trained_run, tiny_overrides, tmp_path):
    from lmlab.rundir.hf import export_hf

    hf_dir = export_hf(trained_run, tmp_path / "hf")
    fresh_first = losses(trained_run)[0]
    trained_last = losses(trained_run, "val_loss")[-1]
    resumed = train(load_config(None, tiny_overrides + [f"model.init_from={hf_dir}", "train.max_steps=3",
                                                        "model.d_model=32", "model.n_layers=1"]),
                    log=lambda *_: None)
    run = load_run(resumed)
    assert run.config.model.d_model == 64 and run.config.model.n_layers == 2  # the folder's architecture wins
    assert run.tokenizer.fingerprint == load_run(trained_run).tokenizer.fingerprint
    first = losses(resumed)[0]
    assert first < fresh_first - 1.0 and abs(first - trained_last) < 0.5
