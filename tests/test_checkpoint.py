"""Checkpoints: what they hold, how they are written and read, and that resuming from one is exact.

The kill tests (SIGKILL at random steps, crashes inside a checkpoint write) are in
test_resume_kill.py; bad inputs and their messages in test_bad_inputs.py.
"""

import errno
import json
import math
import pickle
import shutil

import pytest
import torch

from ckpt_support import events, leftovers, quiet, same_weights, schedules_available, series, snapshot
from lmlab import load_config, train
from lmlab.training import checkpoint
from lmlab.errors import LmlabError


def overrides(tiny_overrides, *extra):
    # one thread: two processes or two runs give the same bits, and 2 shared cores stay usable
    return tiny_overrides + ["train.threads=1", "train.checkpoint_minutes=0", *extra]


@pytest.fixture
def run_with_checkpoints(tiny_overrides):
    """30 steps (grad accumulation on) with a checkpoint every 10 steps, all kept."""
    ov = overrides(tiny_overrides, "train.grad_accum=2", "train.checkpoint_every=10", "train.keep_checkpoints=5",
                   "train.run_name=full")
    return train(load_config(None, ov), log=quiet), ov


def test_a_run_keeps_its_checkpoints_and_points_at_the_latest(run_with_checkpoints):
    run_dir, _ = run_with_checkpoints
    found = checkpoint.list_checkpoints(run_dir)
    assert [step for step, _ in found] == [10, 20, 30]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000030\n"
    assert leftovers(run_dir) == []
    state = checkpoint.verify(found[0][1])
    assert state["step"] == 10 and state["tokens"] == 10 * 2 * 8 * 64
    assert {"python", "numpy", "torch", "cuda"} <= state["rng"].keys()
    assert state["metrics_bytes"] > 0 and state["config"]["train"]["grad_accum"] == 2
    assert {"schedule", "nonfinite"} <= state["stateful"].keys()
    # only safetensors and JSON: nothing in a checkpoint needs an unpickler
    assert sorted(p.name for p in found[0][1].iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]


def test_keep_checkpoints_prunes_the_oldest(tiny_overrides):
    run_dir = train(load_config(None, overrides(tiny_overrides, "train.checkpoint_every=4", "train.keep_checkpoints=2",
                                                "train.max_steps=14")), log=quiet)
    assert [step for step, _ in checkpoint.list_checkpoints(run_dir)] == [12, 14]  # every 4, and the end


def test_keep_checkpoints_zero_writes_none(tiny_overrides):
    run_dir = train(load_config(None, overrides(tiny_overrides, "train.checkpoint_every=4", "train.keep_checkpoints=0",
                                                "train.max_steps=8")), log=quiet)
    assert checkpoint.list_checkpoints(run_dir) == []


@pytest.mark.parametrize("schedule", schedules_available())
def test_resuming_from_a_checkpoint_continues_bit_for_bit(run_with_checkpoints, tiny_overrides, tmp_path, schedule):
    """The run as it was at step 10 (later checkpoints gone, log longer than the checkpoint), resumed."""
    extra = [f"optim.schedule={schedule}", "optim.plateau_patience=0"] if schedule != "cosine" else []
    if extra:  # a fresh uninterrupted reference with this schedule
        ov = overrides(tiny_overrides, "train.grad_accum=2", "train.checkpoint_every=10", "train.keep_checkpoints=5",
                       f"train.run_name=full-{schedule}", *extra)
        full = train(load_config(None, ov), log=quiet)
    else:
        full, ov = run_with_checkpoints
    part = tmp_path / "runs" / f"part-{schedule}"
    shutil.copytree(full, part)
    for step, path in checkpoint.list_checkpoints(part):
        if step > 10:
            shutil.rmtree(path)
    resumed = train(load_config(None, ov + [f"train.resume={part}"]), log=quiet)
    assert resumed == part
    assert series(part) == series(full) and [s for s, _ in series(part)] == list(range(1, 31))
    assert series(part, "val_loss") == series(full, "val_loss")
    assert series(part, "lr") == series(full, "lr")
    assert same_weights(part, full)
    assert [e["step"] for e in events(part, "resume")] == [10]
    for clock in ("elapsed_s", "wall_s"):  # both clocks go on from the checkpoint's, never back
        values = [v for _, v in series(part, clock)]
        assert values == sorted(values), clock
    summary, reference = (json.loads((d / "summary.json").read_text()) for d in (part, full))
    for key in ("status", "steps", "tokens", "final_val_loss", "best_val_loss", "final_train_loss"):
        assert summary[key] == reference[key], key


def test_dropout_and_tied_embeddings_resume_bit_for_bit_too(tiny_overrides, tmp_path):
    """Dropout draws from torch's RNG every step: only a restored RNG state gives the same masks."""
    ov = overrides(tiny_overrides, "model.dropout=0.1", "model.tie_embeddings=true", "train.max_steps=16",
                   "train.checkpoint_every=8", "train.run_name=dropout")
    full = train(load_config(None, ov), log=quiet)
    part = tmp_path / "runs" / "dropout-part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_000016")
    train(load_config(None, ov + [f"train.resume={part}"]), log=quiet)
    assert series(part) == series(full) and same_weights(part, full)


def test_resume_records_allowed_changes_and_extends_a_finished_run(run_with_checkpoints, capsys):
    run_dir, ov = run_with_checkpoints
    lines = []
    train(load_config(run_dir / "config.toml", [f"train.resume={run_dir}", "train.max_steps=40",
                                                "train.eval_every=20"]), log=lines.append)
    assert any("changed: train.max_steps 30 -> 40, train.eval_every 10 -> 20" in line for line in lines)
    [event] = events(run_dir, "resume")
    assert event["step"] == 30 and event["changed"] == {"train.max_steps": [30, 40], "train.eval_every": [10, 20]}
    assert [s for s, _ in series(run_dir)] == list(range(1, 41))
    config_toml = (run_dir / "config.toml").read_text()
    assert "max_steps = 40" in config_toml and 'resume = ""' in config_toml
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 40


def test_resume_refuses_what_cannot_change_and_lists_it(run_with_checkpoints):
    run_dir, _ = run_with_checkpoints
    before = snapshot(run_dir)
    with pytest.raises(LmlabError) as e:
        train(load_config(run_dir / "config.toml", [f"train.resume={run_dir}", "train.max_steps=40",
                                                    "model.d_model=128", "train.batch_size=4", "train.seed=1"]),
              log=quiet)
    message = str(e.value)
    for fragment in ("model.d_model = 128 (the run has 64)", "train.batch_size = 4 (the run has 8)",
                     "train.seed = 1 (the run has 1337)"):
        assert fragment in message
    assert "max_steps" not in message  # allowed changes are not complaints
    assert snapshot(run_dir) == before


def test_resume_auto_starts_a_run_then_continues_it(tiny_overrides):
    ov = overrides(tiny_overrides, "train.run_name=auto", "train.resume=auto", "train.max_steps=10",
                   "train.checkpoint_every=5")
    first = train(load_config(None, ov), log=quiet)
    assert first.name == "auto" and [s for s, _ in checkpoint.list_checkpoints(first)] == [5, 10]
    second = train(load_config(None, ov[:-2] + ["train.max_steps=15"]), log=quiet)
    assert second == first
    assert [s for s, _ in series(first)] == list(range(1, 16))
    assert 'resume = ""' in (first / "config.toml").read_text()  # the saved config repeats, it does not resume


def test_a_newer_damaged_checkpoint_is_passed_over_for_the_older_one(run_with_checkpoints):
    run_dir, _ = run_with_checkpoints
    newest = run_dir / "checkpoints" / "step_000030" / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    messages = []
    path, state = checkpoint.latest(run_dir, log=messages.append)
    assert path.name == "step_000020" and state["step"] == 20
    assert len(messages) == 1 and messages[0].startswith(f"warning: checkpoint {newest.parent}: optimizer.safetensors")
    assert "has 1000 bytes" in messages[0] and "truncated" in messages[0] and "using the older step_000020" in messages[0]


def test_a_pickle_is_refused_without_being_run(run_with_checkpoints, tmp_path):
    """A checkpoint whose tensor file is a pickle that would create a file when loaded."""
    run_dir, _ = run_with_checkpoints
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ckpt = run_dir / "checkpoints" / "step_000030"
    evil = ckpt / "model.safetensors"
    torch.save({"weights": Payload()}, evil)  # torch's zip format ...
    _update_manifest(ckpt)
    with pytest.raises(LmlabError, match="zip archive .torch.save format., not safetensors"):
        checkpoint.verify(ckpt)
    evil.write_bytes(pickle.dumps(Payload()))  # ... and a bare pickle
    _update_manifest(ckpt)
    with pytest.raises(LmlabError, match="is a Python pickle, not safetensors; lmlab never unpickles"):
        checkpoint.verify(ckpt)
    assert not marker.exists()


def _update_manifest(ckpt):
    """A forger who also fixed up state.json: sizes and hashes match the new file."""
    state = json.loads((ckpt / "state.json").read_text())
    for name in state["files"]:
        state["files"][name] = {"bytes": (ckpt / name).stat().st_size, "sha256": checkpoint.file_sha256(ckpt / name)}
    (ckpt / "state.json").write_text(json.dumps(state))


def test_nothing_in_lmlab_unpickles():
    """The promise above, kept at the source: no torch.load / pickle.load anywhere in the package."""
    from pathlib import Path

    import lmlab

    for path in Path(lmlab.__file__).parent.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for call in ("torch.load(", "pickle.load", "pickle.loads", "allow_pickle=True"):
            assert call not in text, f"{path.name} uses {call}"


def _disk_full_after_first(monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def disk_full_after_first(tensors, filename, *args, **kwargs):
        if "/checkpoints/" in str(filename) and "step_000005" not in str(filename):
            real(tensors, filename, *args, **kwargs)  # a partial file is written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_after_first)


def test_a_failing_checkpoint_write_stops_the_run_and_keeps_the_previous_one(tiny_overrides, monkeypatch, tmp_path):
    _disk_full_after_first(monkeypatch)
    config = overrides(tiny_overrides, "train.checkpoint_every=5", "train.max_steps=12", "train.run_name=stops")
    with pytest.raises(LmlabError, match=r"failed after step 10: checkpoint at step 10 not written to .*"
                                         r"\(No space left on device; a checkpoint takes about [\d,]+ bytes, [\d,]+ "
                                         r"are free\).*its newest checkpoint is step_000005") as error:
        train(load_config(None, config), log=lambda *a: None)
    run_dir = tmp_path / "runs" / "stops"
    assert ".tmp" not in str(error.value)
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir)] == [5] and leftovers(run_dir) == []
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 10 and summary["checkpoint"] == "step_000005"


def test_a_failing_checkpoint_write_warns_keeps_the_previous_one_and_training_goes_on(tiny_overrides, monkeypatch):
    _disk_full_after_first(monkeypatch)
    lines = []
    run_dir = train(load_config(None, overrides(tiny_overrides, "train.checkpoint_every=5", "train.max_steps=12",
                                                "train.run_name=full-disk", "train.on_checkpoint_error=continue")),
                    log=lines.append)
    warnings = [line for line in lines if line.startswith("warning: checkpoint")]
    assert len(warnings) == 2  # step 10 and the end (12)
    assert warnings[0].startswith(f"warning: checkpoint at step 10 not written to {run_dir / 'checkpoints'} "
                                  "(No space left on device; a checkpoint takes about ")
    assert warnings[0].endswith("; the latest checkpoint is still step_000005; training goes on")
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir)] == [5]
    checkpoint.verify(run_dir / "checkpoints" / "step_000005")
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000005\n"
    assert leftovers(run_dir) == []
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 12


def test_rng_states_round_trip_through_json():
    import random

    import numpy as np

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = json.loads(json.dumps(checkpoint.rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_non_finite_state_values_are_stored_as_strict_json():
    assert checkpoint._jsonable(math.inf) is None and checkpoint._jsonable(math.nan) is None
    assert checkpoint._jsonable(2.5) == 2.5
