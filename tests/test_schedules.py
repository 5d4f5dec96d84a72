"""LR schedules: exact values at the end of warmup, the end of the stable phase and the last step,
in steps and on a fake clock; the plateau schedule against torch's ReduceLROnPlateau; the context curriculum."""

import json
import math

import pytest
import torch

from lmlab.cli import main
from lmlab.config import OptimConfig, load_config, parse_duration
from lmlab.data.curriculum import parse_context_schedule
from lmlab.errors import LmlabError
from lmlab.training.schedules import PlateauSchedule, Progress, build_schedule, lr_at, simulate

LR, MIN = 3e-3, 3e-4


def lrs_by_step(total, **optim):
    cfg = OptimConfig(lr=LR, min_lr=MIN, **optim)
    progress = Progress("steps", total, 0.0)
    schedule = build_schedule(cfg, progress)
    return [schedule.lr(step, progress(step, 0.0)) for step in range(total)]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant", "plateau"])
@pytest.mark.parametrize("warmup", [0, 1, 10])
def test_every_schedule_peaks_exactly_at_the_end_of_warmup(schedule, warmup):
    lrs = lrs_by_step(101, schedule=schedule, warmup_steps=warmup)
    peak = max(warmup - 1, 0)
    assert lrs[peak] == LR
    assert max(lrs) == LR
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))  # warmup rises
    if warmup:
        assert lrs[0] == pytest.approx(LR / warmup, rel=1e-15)


@pytest.mark.parametrize("schedule, shape", [("cosine", None), ("linear", None), ("wsd", "1-sqrt"),
                                             ("wsd", "linear"), ("wsd", "cosine")])
def test_decaying_schedules_reach_min_lr_exactly_at_the_last_step(schedule, shape):
    extra = {"wsd_decay_shape": shape} if shape else {}
    lrs = lrs_by_step(101, schedule=schedule, warmup_steps=10, **extra)
    assert lrs[-1] == MIN
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # never rises after the peak
    assert min(lrs[9:]) == MIN


def test_linear_and_cosine_midpoints():
    cosine = lrs_by_step(101, schedule="cosine", warmup_steps=1)
    linear = lrs_by_step(101, schedule="linear", warmup_steps=1)
    assert cosine[50] == pytest.approx((LR + MIN) / 2, rel=1e-12)
    assert linear[50] == pytest.approx((LR + MIN) / 2, rel=1e-12)
    assert linear[25] == pytest.approx(MIN + (LR - MIN) * 0.75, rel=1e-12)
    assert cosine[25] > linear[25]  # cosine stays high longer


@pytest.mark.parametrize("shape, left_at_half", [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))])
def test_wsd_is_stable_until_its_decay_fraction_then_decays_with_its_shape(shape, left_at_half):
    # 101 steps: progress p = step / 100; decay over the last 20%: stable to step 80, min at step 100
    lrs = lrs_by_step(101, schedule="wsd", warmup_steps=10, wsd_decay_fraction=0.2, wsd_decay_shape=shape)
    assert lrs[9:81] == [LR] * 72  # stable phase, exactly the peak, through its last step (80)
    assert lrs[81] < LR
    assert lrs[90] == pytest.approx(MIN + (LR - MIN) * left_at_half, rel=1e-9)
    assert lrs[100] == MIN
    if shape == "1-sqrt":
        assert lrs[81] == pytest.approx(MIN + (LR - MIN) * (1 - math.sqrt(0.05)), rel=1e-9)


def test_wsd_decay_longer_than_the_run_after_warmup_starts_at_the_peak():
    lrs = lrs_by_step(11, schedule="wsd", warmup_steps=6, wsd_decay_fraction=1.0, wsd_decay_shape="linear")
    assert lrs[5] == LR and lrs[6] < LR and lrs[10] == MIN


def test_lr_at_keeps_the_step_api():
    cfg = OptimConfig(lr=LR, min_lr=MIN, warmup_steps=10, schedule="wsd", wsd_decay_shape="linear")
    assert [lr_at(s, cfg, 101) for s in range(101)] == lrs_by_step(101, schedule="wsd", warmup_steps=10,
                                                                    wsd_decay_shape="linear")


def test_tokens_progress_is_the_steps_curve_and_auto_without_a_clock_is_steps():
    for measure in ("tokens", "auto"):
        cfg = OptimConfig(lr=LR, min_lr=MIN, warmup_steps=5, progress=measure)
        progress = Progress(measure, 50, 0.0, tokens_per_step=4096)
        schedule = build_schedule(cfg, progress)
        assert [schedule.lr(s, progress(s, 0.0)) for s in range(50)] == lrs_by_step(50, warmup_steps=5)


class FakeClock:
    """Training time that advances by a fixed amount per step."""

    def __init__(self, seconds_per_step):
        self.seconds_per_step = seconds_per_step

    def elapsed(self, step):
        return step * self.seconds_per_step


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
def test_time_progress_warms_up_in_steps_and_decays_inside_the_time_budget(schedule):
    # max_time 100 s, 4 s per step: steps at 0, 4, ..., 96 s, and the run's clock reaches 100 s after step 24
    clock, max_time = FakeClock(4.0), 100.0
    cfg = OptimConfig(lr=LR, min_lr=MIN, warmup_steps=5, schedule=schedule, progress="time",
                      wsd_decay_fraction=0.2, wsd_decay_shape="linear")
    progress = Progress("time", None, max_time)
    sched = build_schedule(cfg, progress)
    lrs = [sched.lr(step, progress(step, clock.elapsed(step))) for step in range(26)]
    assert lrs[:5] == pytest.approx([LR * (s + 1) / 5 for s in range(5)], rel=1e-15)
    assert lrs[4] == LR
    assert sched.peak_progress == 16 / 100  # learned when the peak step ran: 16 s of 100
    assert lrs[25] == MIN  # at (and past) the budget: exactly min_lr
    assert progress(25, 100.0) == 1.0 and progress(26, 104.0) == 1.0
    if schedule == "wsd":
        assert lrs[20] == LR  # 80 s: the end of the stable phase
        assert lrs[22] == pytest.approx(MIN + (LR - MIN) * (1 - 8 / 20), rel=1e-12)
    else:  # decays over the time left after the peak (16 s .. 100 s)
        u = (48 / 100 - 0.16) / 0.84
        expected = {"linear": MIN + (LR - MIN) * (1 - u),
                    "cosine": MIN + 0.5 * (LR - MIN) * (1 + math.cos(math.pi * u))}[schedule]
        assert lrs[12] == pytest.approx(expected, rel=1e-12)


def test_auto_progress_follows_whichever_budget_is_nearer_its_end():
    progress = Progress("auto", 100, 50.0)
    assert progress.measure == "auto"
    assert progress(10, 40.0) == 0.8  # time is ahead
    assert progress(90, 5.0) == 90 / 99  # steps are ahead
    assert Progress("auto", None, 50.0).measure == "time"
    assert Progress("auto", 100, 0.0).measure == "steps"


def test_the_time_state_round_trips_through_json():
    cfg = OptimConfig(lr=LR, min_lr=MIN, warmup_steps=3, progress="time")
    progress = Progress("time", None, 10.0)
    a = build_schedule(cfg, progress)
    for step in range(3):
        a.lr(step, progress(step, step * 1.0))
    b = build_schedule(cfg, progress)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [b.lr(s, progress(s, s * 1.0)) for s in range(3, 10)] == [a.lr(s, progress(s, s * 1.0)) for s in range(3, 10)]


# ------------------------------------------------------------------ plateau

VAL_LOSSES = [5.0, 4.0, 3.9, 3.9, 3.9, 3.899, 3.9, 3.9, 3.0, 3.0, 3.0, 3.0, 3.0, 2.9, 2.9, 2.9, 2.9, 2.9, 2.9,
              2.9, 2.9, 2.9, 2.9, math.nan, 2.9]


@pytest.mark.parametrize("patience, cooldown, threshold", [(0, 0, 1e-3), (2, 0, 1e-3), (1, 2, 0.0), (3, 1, 0.05)])
def test_plateau_cuts_exactly_like_torch_reduce_lr_on_plateau(patience, cooldown, threshold):
    cfg = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0, schedule="plateau", plateau_factor=0.5,
                      plateau_patience=patience, plateau_cooldown=cooldown, plateau_threshold=threshold)
    ours = build_schedule(cfg, Progress("steps", 100, 0.0))
    assert isinstance(ours, PlateauSchedule)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=patience,
                                                        threshold=threshold, threshold_mode="rel",
                                                        cooldown=cooldown, min_lr=1e-3, eps=0)
    for loss in VAL_LOSSES:
        if math.isnan(loss):
            ours.observe_val_loss(loss)  # an evaluation that failed is not a plateau
            continue
        ours.observe_val_loss(loss)
        theirs.step(loss)
        assert ours.lr(50, 0.5) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
    assert ours.lr(50, 0.5) < 1e-2  # these losses do plateau
    assert ours.lr(50, 0.5) >= 1e-3  # and min_lr is the floor


def test_plateau_warms_up_then_holds_and_its_state_survives_a_checkpoint():
    cfg = OptimConfig(lr=1e-2, min_lr=1e-4, warmup_steps=4, schedule="plateau", plateau_patience=1)
    progress = Progress("steps", 100, 0.0)
    s = build_schedule(cfg, progress)
    assert [s.lr(i, progress(i, 0)) for i in range(4)] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2], rel=1e-15)
    for loss in (3.0, 3.0, 3.0):
        s.observe_val_loss(loss)
    assert s.lr(10, progress(10, 0)) == 5e-3 and s.cuts == [3.0]
    restored = build_schedule(cfg, progress)
    restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
    for loss in (3.0, 3.0):
        s.observe_val_loss(loss)
        restored.observe_val_loss(loss)
    assert restored.lr(20, progress(20, 0)) == s.lr(20, progress(20, 0)) == 2.5e-3


# ------------------------------------------------------------------ config, curriculum, the plot


@pytest.mark.parametrize("text, seconds", [("90", 90), (90, 90), ("90s", 90), ("90m", 5400), ("1.5h", 5400),
                                           ("1h30m", 5400), ("0.5d", 43200), (12.5, 12.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds
    assert load_config(None, [f"train.max_time={text}"]).train.max_time == seconds


@pytest.mark.parametrize("text", ["ninety", "90x", "-5", "1h-30m", ""])
def test_bad_durations_are_refused(text):
    with pytest.raises(LmlabError, match="train.max_time"):
        load_config(None, [f"train.max_time={text}"])


@pytest.mark.parametrize("overrides, message", [
    (["optim.schedule=wsdd"], "did you mean 'wsd'"),
    (["optim.wsd_decay_shape=sqrt"], "1-sqrt"),
    (["optim.progress=time"], "needs train.max_time"),
    (["optim.progress=steps", "train.max_steps=0", "train.max_time=60"], "needs train.max_steps"),
    (["train.max_steps=0"], "train.max_time"),
    (["optim.wsd_decay_fraction=0"], "wsd_decay_fraction"),
    (["optim.plateau_factor=1.5"], "plateau_factor"),
    (["train.diverge_factor=0.5"], "diverge_factor"),
    (["train.context_schedule=64:0.5"], "last stage must end at 1"),
    (["train.context_schedule=48:0.5,128:1"], "must divide"),
    (["train.context_schedule=256:1"], "model.context_length=128"),
    (["train.context_schedule=64:0.6,128:0.5"], "must increase"),
    (["train.context_schedule=64"], "CONTEXT:UNTIL"),
])
def test_bad_schedule_settings_are_refused_with_the_key(overrides, message):
    with pytest.raises(LmlabError, match=message):
        load_config(None, overrides)


def test_context_schedule_parses_and_the_batch_grows_as_the_context_shrinks(small_corpus, data_cache):
    from lmlab.data.corpora import ensure_data
    from lmlab.data.curriculum import Curriculum
    from lmlab.data.batches import Batches

    assert parse_context_schedule("32:0.25, 64:1", 64, 8) == [(32, 0.25), (64, 1.0)]
    train, valid = small_corpus
    config = load_config(None, ["data.corpus=", f"data.train_files={train}", f"data.val_files={valid}",
                                "data.tokenizer_vocab_size=512", f"data.cache_dir={data_cache}",
                                "model.context_length=64", "train.batch_size=8",
                                "train.context_schedule=16:0.25,32:0.5,64:1"])
    _, shards = ensure_data(config.data, log=lambda *_: None)
    full = Batches(shards, "train", 8, 64)
    curriculum = Curriculum(config, shards, full)
    shapes = [tuple(curriculum.at(p).get(3)[0].shape) for p in (0.0, 0.2, 0.25, 0.49, 0.5, 1.0)]
    assert shapes == [(32, 16), (32, 16), (16, 32), (16, 32), (8, 64), (8, 64)]  # 512 tokens every step
    assert curriculum.at(0.9) is full


def test_schedule_command_plots_and_prints_the_exact_points(tmp_path, capsys):
    out = tmp_path / "wsd.png"
    assert main(["schedule", "optim.schedule=wsd", "optim.wsd_decay_fraction=0.25", "train.max_steps=401",
                 "optim.warmup_steps=20", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "warmup end   step      19  lr 0.003" in text
    assert "stable end   step     300  lr 0.003" in text
    assert "last step    step     400  lr 0.0003" in text
    points, measure = simulate(load_config(None, ["train.max_steps=0", "train.max_time=10m",
                                                  "train.context_schedule=32:0.5,128:1"]))
    assert measure == "time" and len(points) == 1000 and points[-1][1] == 600 and points[-1][3] == 3e-4
