"""Run directories written before the package moved into subpackages still load, list, export and resume.

The fixture tests/data/run-before-layout was written by lmlab at commit 322c946
(its README.md has the command): a 4-step run with checkpoints at steps 2 and 4.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmlab import generate, load_config, load_run, train
from lmlab.lab.table import read_runs
from lmlab.model.hf import load_hf_model
from lmlab.rundir.hf import export_hf

OLD_RUN = Path(__file__).parent / "data" / "run-before-layout"


@pytest.fixture
def old_run(tmp_path):
    run = tmp_path / "before"
    shutil.copytree(OLD_RUN, run)
    return run


def test_an_old_run_loads_and_generates_what_its_samples_say(old_run):
    run = load_run(old_run)
    assert run.config.model.head_dim == 0  # saved as "derive"; the model resolves it
    assert run.model.num_params() == json.loads((old_run / "summary.json").read_text())["params"]
    prompt = "Once upon a time"
    sample = (old_run / "samples.md").read_text(encoding="utf-8")
    text = generate(run.model, run.tokenizer, prompt, max_new_tokens=8, temperature=0.8, top_k=50, seed=1337)
    assert f"{prompt}{text}" in sample  # the old run's own end-of-run sample, token for token


def test_an_old_run_lists_as_completed_and_exports(old_run, tmp_path):
    [record] = read_runs([old_run])
    assert record.status == "completed" and record.last("val_loss") is not None
    hf_dir = export_hf(old_run, tmp_path / "hf")
    model, _, _ = load_hf_model(hf_dir)
    saved = load_file(str(old_run / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_an_old_checkpoint_resumes_to_the_weights_of_the_run_that_was_never_stopped(old_run, tmp_path):
    # make it look killed after its step-2 checkpoint: the newest checkpoint and the final files gone
    shutil.rmtree(old_run / "checkpoints" / "step_000004")
    (old_run / "checkpoints" / "latest").write_text("step_000002\n")
    for name in ("model.safetensors", "summary.json", "samples.md"):
        (old_run / name).unlink()
    config = load_config(old_run / "config.toml", [f"train.resume={old_run}", f"data.cache_dir={tmp_path / 'cache'}"])
    train(config, log=lambda *_: None)
    resumed = load_file(str(old_run / "model.safetensors"))
    never_stopped = load_file(str(OLD_RUN / "model.safetensors"))
    assert resumed.keys() == never_stopped.keys()
    for name, tensor in never_stopped.items():  # bitwise on the machine that wrote the fixture
        assert torch.allclose(resumed[name], tensor, rtol=1e-5, atol=1e-7), name
