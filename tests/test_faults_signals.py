"""A loop that survives: NaN/inf caught before the update, SIGINT / SIGTERM turned into a checkpoint."""

import json
import math
import signal

import pytest
import torch
from safetensors.torch import load_file

from ckpt_support import events, quiet, same_weights, series
from lmlab import load_config, train
from lmlab.training import checkpoint
from lmlab.cli import main
from lmlab.model.transformer import Transformer


def overrides(tiny_overrides, *extra):
    return tiny_overrides + ["train.threads=1", "train.checkpoint_minutes=0", "train.checkpoint_every=5", *extra]


def nan_loss_at(monkeypatch, step):
    """Make the training loss NaN at optimizer step `step` (grad_accum 1), as a bad batch would."""
    real, calls = Transformer.forward, {"n": 0}

    def forward(self, input_ids, kv_cache=None, targets=None):
        out = real(self, input_ids, kv_cache=kv_cache, targets=targets)
        if targets is not None and self.training:  # the training loss, not evaluation
            calls["n"] += 1
            if calls["n"] == step:
                return out * math.nan
        return out

    monkeypatch.setattr(Transformer, "forward", forward)


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_nonfinite_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(tiny_overrides, monkeypatch):
    nan_loss_at(monkeypatch, 13)
    lines = []
    run_dir = train(load_config(None, overrides(tiny_overrides, "train.run_name=nan-stop")), log=lines.append)
    s = summary(run_dir)
    assert s["status"] == "diverged" and s["steps"] == 12  # step 13 was never applied
    assert s["nonfinite_at"]["step"] == 13 and s["nonfinite_at"]["what"] == "loss"
    assert any(line.startswith("non-finite loss at step 13: stopped before the update") for line in lines)
    [event] = events(run_dir, "nonfinite")
    assert event["step"] == 13 and event["action"] == "stop" and math.isnan(event["values"]["loss"])
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir)] == [5, 10]  # nothing written after the fault
    assert all(torch.isfinite(w).all() for w in load_file(str(run_dir / "model.safetensors")).values())
    assert [s for s, _ in series(run_dir)] == list(range(1, 13))


def test_skip_drops_the_bad_batch_counts_it_and_goes_on(tiny_overrides, monkeypatch):
    clean = train(load_config(None, overrides(tiny_overrides, "train.run_name=clean", "train.max_steps=20")), log=quiet)
    nan_loss_at(monkeypatch, 13)
    run_dir = train(load_config(None, overrides(tiny_overrides, "train.run_name=nan-skip", "train.max_steps=20",
                                                "train.on_nonfinite=skip")), log=quiet)
    s = summary(run_dir)
    assert s["status"] == "completed" and s["steps"] == 20 and s["skipped_steps"] == 1
    [event] = events(run_dir, "nonfinite")
    assert event["step"] == 13 and event["action"] == "skip"
    losses = dict(series(run_dir))
    assert 13 not in losses and all(math.isfinite(v) for v in losses.values())
    assert [(k, losses[k]) for k in range(1, 13)] == series(clean)[:12]  # identical up to the bad batch
    assert losses[14] != dict(series(clean))[14]  # and the run went on without that update
    assert checkpoint.verify(run_dir / "checkpoints" / "step_000020")["stateful"]["nonfinite"]["skipped"] == 1


def test_between_logging_steps_the_check_stays_on_the_device_and_still_stops_before_the_update(tiny_overrides,
                                                                                             monkeypatch):
    """log_every=5: step 13 is NaN, the host learns it at step 15; steps 13-15 were never applied."""
    nan_loss_at(monkeypatch, 13)
    lines = []
    run_dir = train(load_config(None, overrides(tiny_overrides, "train.run_name=nan-deferred", "train.log_every=5",
                                                "train.checkpoint_every=4")), log=lines.append)
    s = summary(run_dir)
    assert s["status"] == "diverged" and s["steps"] == 12 and s["nonfinite_at"]["step"] == 13
    assert any(line.startswith("non-finite loss at step 13: stopped before the update") for line in lines)
    [event] = events(run_dir, "nonfinite")
    assert event["step"] == 13 and math.isnan(event["values"]["loss"])
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir)] == [8, 12]  # none at 16
    final = load_file(str(run_dir / "model.safetensors"))
    at_12 = load_file(str(run_dir / "checkpoints" / "step_000012" / "model.safetensors"))
    assert all(torch.equal(final[k], at_12[k]) for k in at_12)  # steps 13, 14, 15 changed nothing


def test_skip_between_logging_steps_counts_the_batch_and_goes_on(tiny_overrides, monkeypatch):
    nan_loss_at(monkeypatch, 13)
    run_dir = train(load_config(None, overrides(tiny_overrides, "train.run_name=skip-deferred", "train.log_every=5",
                                                "train.max_steps=20", "train.on_nonfinite=skip")), log=quiet)
    s = summary(run_dir)
    assert s["status"] == "completed" and s["steps"] == 20 and s["skipped_steps"] == 1
    [event] = events(run_dir, "nonfinite")
    assert event["step"] == 13 and event["action"] == "skip"
    assert [k for k, _ in series(run_dir)] == [1, 5, 10, 15, 20]
    assert all(math.isfinite(v) for _, v in series(run_dir))


@pytest.fixture
def fallback_handlers():
    """Harmless handlers under the trainer's own, so that a test that fails cannot kill or stop pytest."""
    received = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    yield received
    for s, handler in previous.items():
        signal.signal(s, handler)


def signal_at(monkeypatch, step, *signums):
    """Deliver signals to this process while optimizer step `step` runs (from inside the loop)."""
    from lmlab.training import faults

    real = faults.NonFiniteGuard.check

    def check(self, at, *args, **kwargs):
        if at == step:
            for signum in signums:
                signal.raise_signal(signum)
        return real(self, at, *args, **kwargs)

    monkeypatch.setattr(faults.NonFiniteGuard, "check", check)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_finishes_the_step_saves_and_exits_interrupted(tiny_overrides, monkeypatch, capsys, fallback_handlers,
                                                                signum, code):
    ov = overrides(tiny_overrides, "train.run_name=ref")
    reference = train(load_config(None, ov), log=quiet)
    signal_at(monkeypatch, 12, signum)
    run_dir = reference.parent / "signalled"
    assert main(["train", *ov, "train.run_name=signalled"]) == code
    assert fallback_handlers == []  # the trainer's handler took it, and put the previous one back
    assert signal.getsignal(signal.SIGTERM) is not None
    s = summary(run_dir)
    assert s["status"] == "interrupted" and s["steps"] == 12 and s["signal"] == signal.Signals(signum).name
    assert checkpoint.list_checkpoints(run_dir)[-1][0] == 12
    assert f"{signal.Signals(signum).name}: finishing this step" in capsys.readouterr().out
    monkeypatch.undo()
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert series(run_dir) == series(reference) and same_weights(run_dir, reference)


def test_a_second_ctrl_c_exits_at_once_and_leaves_the_last_checkpoint(tiny_overrides, monkeypatch, capsys,
                                                                      fallback_handlers):
    ov = overrides(tiny_overrides, "train.run_name=twice")
    signal_at(monkeypatch, 12, signal.SIGINT, signal.SIGINT)
    assert main(["train", *ov]) == 130
    assert capsys.readouterr().err.strip() == "lmlab: interrupted"
    run_dir = next((tiny_overrides_runs(tiny_overrides)).glob("twice"))
    assert not (run_dir / "summary.json").exists()  # no orderly end: gone at once
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir)] == [5, 10]
    assert fallback_handlers == []
    monkeypatch.undo()
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert summary(run_dir)["status"] == "completed" and [e["step"] for e in events(run_dir, "resume")] == [10]


def tiny_overrides_runs(tiny_overrides):
    from pathlib import Path

    return Path(next(o for o in tiny_overrides if o.startswith("train.runs_dir=")).partition("=")[2])
