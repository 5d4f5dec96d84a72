"""Stop rules: target loss, time budget (on a fake clock), divergence; in the rules and in tiny real runs."""

import json
import math

import pytest

from lmlab import load_config, train
from lmlab.config import TrainConfig
from lmlab.training.stops import StopRules
from lmlab.rundir.metrics import read_metrics

QUIET = dict(log=lambda *_: None)


def events(run_dir, key):
    return [e for e in read_metrics(run_dir / "metrics.jsonl") if key in e]


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


# ------------------------------------------------------------------ the rules alone


def rules(**train):
    return StopRules(TrainConfig(**train), tokens_per_step=100)


def feed(stops, losses):
    for step, loss in enumerate(losses, start=1):
        stops.observe_loss(step, loss, elapsed=step * 0.5)
        if stops.reason:
            return step
    return None


def test_a_spike_that_recovers_is_not_a_divergence_but_a_loss_that_stays_up_is():
    # measured shape: a model without norms at lr 3e-2 went 6 -> 2000 -> 131 -> 10.7 and trained on
    spike = [6.2, 6.2, 5.7, 1999.0, 131.1, 10.7, 6.2, 5.9, 1073.5, 174.5, 59.0, 13.4, 6.4, 5.7]
    assert feed(rules(diverge_factor=3, diverge_patience=3), spike) is None
    assert feed(rules(diverge_factor=3, diverge_patience=0), spike) == 4
    stays = [6.2, 5.0, 4.0, 20.0, 30.0, 25.0, 40.0]
    stops = rules(diverge_factor=3, diverge_patience=3)
    assert feed(stops, stays) == 7
    assert stops.reason == "diverged"
    assert stops.diverged_at == {"step": 7, "tokens": 700, "elapsed_s": 3.5, "loss": 40.0,
                                 "reason": "above train.diverge_factor=3 x 4 (best so far) since step 4"}
    assert feed(rules(diverge_factor=0), stays) is None  # factor off: only NaN / inf


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nonfinite_loss_stops_at_once(bad):
    stops = rules(diverge_factor=0)
    assert feed(stops, [6.0, 5.0, bad, 4.0]) == 3
    assert stops.diverged_at["loss"] == str(bad)  # JSON-safe
    json.dumps(stops.summary(), allow_nan=False)


def test_target_is_recorded_once_with_where_it_was_reached():
    stops = rules(target_val_loss=2.0)
    stops.observe_val_loss(100, 2.5, 10.0)
    assert stops.reason is None
    stops.observe_val_loss(200, 1.99, 20.0)
    stops.observe_val_loss(300, 1.5, 30.0)
    assert stops.reason == "target_reached" and stops.final_status("completed") == "target_reached"
    assert stops.summary()["target"] == {"target_val_loss": 2.0, "reached": True, "step": 200, "tokens": 20000,
                                         "elapsed_s": 20.0, "val_loss": 1.99}
    assert rules(target_val_loss=1.0).summary()["target"] == {"target_val_loss": 1.0, "reached": False}


def test_time_budget_and_the_status_of_an_interrupted_run():
    stops = rules(max_time=60.0)
    stops.check_time(10, 59.9)
    assert stops.reason is None
    stops.check_time(11, 60.0)
    assert stops.reason == "time_budget"
    assert stops.final_status("interrupted") == "interrupted"  # a signal is not overridden


def test_stop_rules_state_round_trips_but_not_the_stop_itself():
    stops = rules(target_val_loss=2.0, diverge_factor=3, diverge_patience=5)
    feed(stops, [6.0, 4.0, 20.0])
    stops.observe_val_loss(10, 1.9, 5.0)
    again = rules(target_val_loss=2.0, diverge_factor=3, diverge_patience=5)
    again.load_state_dict(json.loads(json.dumps(stops.state_dict())))
    assert again.reason is None and again.best == 4.0 and again.above_since == 3
    assert again.summary()["target"]["step"] == 10
    other_target = rules(target_val_loss=1.0)
    other_target.load_state_dict(stops.state_dict())
    assert other_target.summary()["target"]["reached"] is False


# ------------------------------------------------------------------ in real (tiny) runs


def test_target_val_loss_stops_at_the_first_evaluation_that_reaches_it(tiny_overrides):
    free = train(load_config(None, tiny_overrides + ["train.run_name=free"]), **QUIET)
    (v10, v20, v30) = [e["val_loss"] for e in events(free, "val_loss")]
    assert v10 > v20 > v30
    target = (v10 + v20) / 2
    run = train(load_config(None, tiny_overrides + [f"train.target_val_loss={target!r}", "train.run_name=t"]), **QUIET)
    s = summary(run)
    at_20 = [e for e in events(run, "loss") if e["step"] == 20][0]
    assert s["status"] == "target_reached" and s["steps"] == 20
    assert s["target"] == {"target_val_loss": target, "reached": True, "step": 20, "tokens": 20 * 8 * 64,
                           "elapsed_s": at_20["elapsed_s"], "val_loss": v20}
    assert max(e["step"] for e in read_metrics(run / "metrics.jsonl")) == 20
    assert [e["val_loss"] for e in events(run, "val_loss")] == [v10, v20]  # no second evaluation at the stop
    assert (run / "samples.md").is_file()


class FakeTime:
    """Stands in for the trainer's `time` module: every perf_counter() call is one second later."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1.0
        return self.now


@pytest.mark.parametrize("max_steps", [30, 0])
def test_max_time_stops_on_the_training_clock_and_the_schedule_decays_inside_it(tiny_overrides, monkeypatch, max_steps):
    import lmlab.training.step

    monkeypatch.setattr(lmlab.training.step, "time", FakeTime())  # each step takes exactly one fake second
    run = train(load_config(None, tiny_overrides + [
        "train.max_time=8s", f"train.max_steps={max_steps}", "optim.schedule=linear", "optim.warmup_steps=0",
        "optim.lr=1e-2", "optim.min_lr=1e-3", "train.eval_every=0"]), **QUIET)
    s = summary(run)
    assert s["status"] == "time_budget" and s["steps"] == 8 and s["elapsed_s"] == 8.0 and s["max_time_s"] == 8.0
    steps = events(run, "loss")
    assert [e["elapsed_s"] for e in steps] == [float(k) for k in range(1, 9)]
    # progress = time / max_time before each step: 0, 1/8, ..., 7/8 (auto -> time when no steps set)
    # (with max_steps=30 too: auto follows the budget nearer its end, the clock)
    expected = [1e-3 + (1e-2 - 1e-3) * (1 - k / 8) for k in range(8)]
    assert [e["lr"] for e in steps] == pytest.approx(expected, rel=1e-12)
    assert len(events(run, "val_loss")) == 1  # the final evaluation


def test_a_run_that_blows_up_stops_as_diverged_and_records_where(tiny_overrides):
    # no norms and lr 0.1: the loss grows by orders of magnitude within a few steps (measured: 6 -> 1e4 -> 1e15)
    run = train(load_config(None, tiny_overrides + ["model.norm=none", "optim.lr=0.1", "optim.warmup_steps=1",
                                                    "train.diverge_patience=2"]), **QUIET)
    s = summary(run)
    assert s["status"] == "diverged"
    where = s.get("diverged_at") or s.get("nonfinite_at")
    assert where and where["step"] == s["steps"] < 30
    assert max(e["step"] for e in events(run, "loss")) == s["steps"]
    assert not (run / "samples.md").exists()


def test_plateau_schedule_cuts_the_lr_after_an_evaluation_without_improvement(tiny_overrides):
    # threshold 0.5: only a halving of the validation loss would count, so the second evaluation is a plateau
    run = train(load_config(None, tiny_overrides + ["optim.schedule=plateau", "optim.plateau_patience=0",
                                                    "optim.plateau_threshold=0.5", "optim.min_lr=1e-4"]), **QUIET)
    lrs = {e["step"]: e["lr"] for e in events(run, "loss")}
    assert {lrs[k] for k in range(5, 21)} == {3e-3}
    assert {lrs[k] for k in range(21, 31)} == {1.5e-3}
    assert summary(run)["status"] == "completed"


def test_context_curriculum_trains_with_fixed_tokens_per_step(tiny_overrides, monkeypatch):
    from lmlab.data.curriculum import Curriculum

    shapes, at = [], Curriculum.at

    def spy(self, progress):
        batches = at(self, progress)
        shapes.append((batches.batch_size, batches.context_length))
        return batches

    monkeypatch.setattr(Curriculum, "at", spy)
    run = train(load_config(None, tiny_overrides + ["train.context_schedule=16:0.3,32:0.6,64:1",
                                                    "train.max_steps=12", "train.eval_every=0"]), **QUIET)
    steps = events(run, "loss")
    assert [e["tokens"] for e in steps] == [k * 8 * 64 for k in range(1, 13)]
    # progress k / 11: steps 0-3 below 0.3, 4-6 below 0.6, then the full context
    assert shapes == [(32, 16)] * 4 + [(16, 32)] * 3 + [(8, 64)] * 5
    assert all(math.isfinite(e["loss"]) for e in steps)
    assert summary(run)["status"] == "completed"
