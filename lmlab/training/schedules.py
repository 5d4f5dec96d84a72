"""Learning-rate schedules as functions of training progress.

    optim.schedule = cosine | linear | wsd | constant | plateau
    optim.progress = auto | steps | tokens | time

Design choices:
- Warmup is counted in optimizer steps (optim.warmup_steps): it exists for the
  optimizer's sake (Adam's second moments), whatever the budget. It ends with
  the learning rate exactly at optim.lr on the last warmup step.
- After warmup, a schedule is a function of the run's *progress* p in [0, 1]:
  the share of the budget used before the step. p = 1 on the last step, so the
  decaying schedules reach optim.min_lr exactly there.
    steps   p = step / (total_steps - 1)
    tokens  p = tokens before the step / tokens before the last step; tokens per
            step are fixed in lmlab (the context curriculum keeps them so), so
            this is the same curve as steps, spelled in the budget's unit
    time    p = training time so far / train.max_time (elapsed_s, evaluation
            excluded): the run warms up and decays inside its time budget
    auto    the largest of those whose budget is set: the schedule ends where
            the run stops, whichever budget stops it
- cosine and linear decay over the progress left after warmup, from the peak
  to min_lr. wsd (warmup-stable-decay) holds the peak and decays over the last
  optim.wsd_decay_fraction of the whole run (1-sqrt, linear or cosine shape),
  so its stable phase can be reused and branched at any point.
- plateau is torch's ReduceLROnPlateau on validation loss (mode min, relative
  threshold, patience and cooldown counted in evaluations, floor min_lr).
  It is the one stateful schedule; its state (and the progress at the peak,
  which a time-based run only learns when it gets there) is a small JSON-able
  dict: `state_dict()` / `load_state_dict()` for checkpoints.
"""

import math

from lmlab.errors import LmlabError


class Progress:
    """p in [0, 1] for a step, from the budgets that are set (see the module docstring)."""

    def __init__(self, measure, total_steps, max_time, tokens_per_step=1):
        self.total_steps, self.max_time, self.tokens_per_step = total_steps, max_time, tokens_per_step
        if measure == "auto":
            measure = "steps" if not max_time else "time" if not total_steps else "auto"
        if measure in ("steps", "tokens") and not total_steps:
            raise LmlabError(f"optim.progress={measure} needs train.max_steps or train.max_tokens")
        if measure == "time" and not max_time:
            raise LmlabError("optim.progress=time needs train.max_time")
        self.measure = measure

    def _by_steps(self, step):
        if self.total_steps <= 1:
            return 1.0
        if self.measure == "tokens":
            return step * self.tokens_per_step / ((self.total_steps - 1) * self.tokens_per_step)
        return step / (self.total_steps - 1)

    def __call__(self, step, elapsed):
        """Progress before optimizer step `step` (0-based) after `elapsed` seconds of training."""
        if self.measure in ("steps", "tokens"):
            p = self._by_steps(step)
        elif self.measure == "time":
            p = elapsed / self.max_time
        else:
            p = max(self._by_steps(step), elapsed / self.max_time)
        return min(max(p, 0.0), 1.0)

    def known_in_advance(self):
        """True when p depends on the step alone (not on the clock)."""
        return self.measure in ("steps", "tokens")


class Schedule:
    """lr(step, progress); observe_val_loss is a no-op except for plateau."""

    def __init__(self, optim_cfg, peak_progress=None):
        self.cfg = optim_cfg
        self.peak_step = max(optim_cfg.warmup_steps - 1, 0)  # the step at which lr is at its peak
        self.peak_progress = peak_progress  # None: learned when the peak step runs (time-based progress)

    def lr(self, step, progress):
        """Learning rate for optimizer step `step` (0-based) taken at `progress` in [0, 1]."""
        o = self.cfg
        if step == self.peak_step and self.peak_progress is None:
            self.peak_progress = progress
        if step < o.warmup_steps:
            return self.peak_lr() * ((step + 1) / o.warmup_steps)  # the ratio is exactly 1 on the last warmup step
        return self.after_warmup(progress)

    def peak_lr(self):
        return self.cfg.lr

    def after_warmup(self, progress):
        o = self.cfg
        if o.schedule == "constant":
            return o.lr
        if o.schedule == "wsd":
            return self._wsd(progress)
        # cosine / linear run over the progress left after the peak: u = 0 at the peak, 1 at the end
        start = self.peak_progress or 0.0
        u = 1.0 if start >= 1 else min(max((progress - start) / (1 - start), 0.0), 1.0)
        if u == 0:
            return o.lr
        if o.schedule == "linear":
            return o.min_lr + (o.lr - o.min_lr) * (1 - u)
        if o.schedule == "cosine":
            return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * u))
        raise LmlabError(f"unknown optim.schedule '{o.schedule}'")

    def _wsd(self, progress):
        o = self.cfg
        decay_start = max(1 - o.wsd_decay_fraction, self.peak_progress or 0.0)
        if progress <= decay_start:
            return o.lr
        d = 1.0 if decay_start >= 1 else min((progress - decay_start) / (1 - decay_start), 1.0)
        left = {"linear": 1 - d, "cosine": 0.5 * (1 + math.cos(math.pi * d)), "1-sqrt": 1 - math.sqrt(d)}
        return o.min_lr + (o.lr - o.min_lr) * left[o.wsd_decay_shape]

    def observe_val_loss(self, loss):
        """Called after every evaluation (only the plateau schedule reacts)."""

    def state_dict(self):
        return {"peak_progress": self.peak_progress}

    def load_state_dict(self, state):
        self.peak_progress = state.get("peak_progress")


class PlateauSchedule(Schedule):
    """Warmup to optim.lr, then cut by plateau_factor when validation loss stops improving.

    Mirrors torch.optim.lr_scheduler.ReduceLROnPlateau(mode="min", threshold_mode="rel").
    """

    def __init__(self, optim_cfg, peak_progress=None):
        super().__init__(optim_cfg, peak_progress)
        self.current = optim_cfg.lr
        self.best = math.inf
        self.bad_evals = 0
        self.cooldown_left = 0
        self.cuts = []  # validation losses at which lr was cut (for the record)

    def peak_lr(self):
        return self.current  # a cut during warmup lowers the warmup's target too

    def after_warmup(self, progress):
        return self.current

    def observe_val_loss(self, loss):
        o = self.cfg
        if not math.isfinite(loss):
            return
        if loss < self.best * (1 - o.plateau_threshold):
            self.best, self.bad_evals = loss, 0
        else:
            self.bad_evals += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_evals = 0
        if self.bad_evals > o.plateau_patience:
            self.current = max(self.current * o.plateau_factor, o.min_lr)
            self.cooldown_left, self.bad_evals = o.plateau_cooldown, 0
            self.cuts.append(loss)

    def state_dict(self):
        return {"peak_progress": self.peak_progress, "current": self.current,
                "best": self.best if math.isfinite(self.best) else None,
                "bad_evals": self.bad_evals, "cooldown_left": self.cooldown_left, "cuts": list(self.cuts)}

    def load_state_dict(self, state):
        self.peak_progress = state.get("peak_progress")
        self.current = state["current"]
        self.best = math.inf if state["best"] is None else state["best"]
        self.bad_evals, self.cooldown_left = state["bad_evals"], state["cooldown_left"]
        self.cuts = list(state.get("cuts", []))


def build_schedule(optim_cfg, progress):
    """The schedule object for `optim_cfg`, driven by `progress` (a Progress)."""
    peak = max(optim_cfg.warmup_steps - 1, 0)
    peak_progress = progress(peak, 0.0) if progress.known_in_advance() else None
    cls = PlateauSchedule if optim_cfg.schedule == "plateau" else Schedule
    return cls(optim_cfg, peak_progress)


def fit_warmup(config, total_steps):
    """Cap a warm-up that would outlast the run at a tenth of its steps; returns the warning, or None.

    optim.warmup_steps >= the run's steps (e.g. the quick start's 50 with
    train.max_steps=30) ends the run still warming up: the peak learning rate is
    never reached and nothing decays. Such a run is almost always a short try of
    a longer preset, so the warm-up is cut to a tenth of the run (at least one
    step), written back to the config (config.toml holds the value used), and a
    warning names both numbers. A time-bounded run (total_steps None) is left
    alone: its steps are not known in advance.
    """
    o = config.optim
    if not total_steps or o.warmup_steps < total_steps:
        return None
    capped = max(1, total_steps // 10)
    if capped == o.warmup_steps:
        return None
    warning = (f"warning: optim.warmup_steps={o.warmup_steps} is not shorter than the run's {total_steps} steps "
               f"(it would end still warming up, with no decay); warm-up capped at {capped} steps, a tenth of the "
               "run (set optim.warmup_steps below the run's steps to choose)")
    o.warmup_steps = capped
    return warning


def for_run(config, total_steps, tokens_per_step):
    """(schedule, progress) of a run: each step takes `schedule.lr(step, progress(step, elapsed))`."""
    progress = Progress(config.optim.progress, total_steps, config.train.max_time, tokens_per_step)
    return build_schedule(config.optim, progress), progress


def lr_at(step, optim_cfg, total_steps):
    """Learning rate at `step` (0-based) of a run of `total_steps`, progress in steps, without state.

    For plateau: the learning rate before any cut.
    """
    progress = Progress("steps", total_steps, 0.0)
    return build_schedule(optim_cfg, progress).lr(step, progress(step, 0.0))


def simulate(config, n_steps=None):
    """([(step, elapsed_s, progress, lr)], progress measure) of a run's schedule, before it runs.

    Time-based progress assumes the steps spread evenly over train.max_time
    (train.max_steps of them, or 1000 when only the time is set); the plateau
    schedule is shown without cuts (they depend on the validation loss).
    """
    from lmlab.config import total_steps

    t = config.train
    if n_steps is not None and (isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1):
        raise LmlabError(f"the steps to draw (--steps) must be a whole number >= 1, got {n_steps!r}")
    steps = total_steps(config)
    fit_warmup(config, steps)  # as the run would: lmlab schedule shows what lmlab train does
    tokens_per_step = t.batch_size * t.grad_accum * config.model.context_length
    schedule, progress = for_run(config, steps, tokens_per_step)
    n = n_steps or steps or 1000
    seconds_per_step = t.max_time / max(n - 1, 1) if t.max_time else 0.0  # the last point at the budget
    points = []
    for step in range(n):
        elapsed = step * seconds_per_step
        p = progress(step, elapsed)
        points.append((step, elapsed, p, schedule.lr(step, p)))
    return points, progress.measure


def plot_schedule(config, out, n_steps=None):
    """Plot the learning rate (and the context curriculum) of `config` to `out` (PNG); returns text lines.

    n_steps: the steps a time-bounded run is expected to take (default: simulate's).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmlab import atomic
    from lmlab.config import total_steps
    from lmlab.data.curriculum import parse_context_schedule

    o, t = config.optim, config.train
    warning = fit_warmup(config, total_steps(config))  # simulate would cap it too, silently
    points, measure = simulate(config, n_steps)
    by_time = measure == "time"
    xs = [e / 60 for _, e, _, _ in points] if by_time else [s for s, _, _, _ in points]
    lrs = [lr for *_, lr in points]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(xs, lrs, color="tab:blue", label="learning rate")
    ax.set_xlabel("training time (min), steps spread evenly" if by_time else "step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    warm = min(max(o.warmup_steps - 1, 0), len(points) - 1)
    lines = [f"schedule {o.schedule}, progress {measure}, {len(points)} steps shown"
             + (f" over {t.max_time:g}s" + (" (the steps you gave)" if n_steps else
                                              " (a guess of the steps that fit: set it with --steps)")
                if by_time else ""),
             f"  warmup end   step {warm:>7}  lr {lrs[warm]:.6g}"]
    if warning:
        lines.insert(0, warning)
    stable = max((i for i, lr in enumerate(lrs) if lr == o.lr), default=None)  # None: drawn steps end in warmup
    if o.schedule == "wsd" and stable is not None:
        lines.append(f"  stable end   step {stable:>7}  lr {lrs[stable]:.6g}")
        ax.axvline(xs[stable], color="gray", linestyle=":", label="end of stable phase")
    lines.append(f"  last step    step {len(points) - 1:>7}  lr {lrs[-1]:.6g}")
    if o.schedule == "plateau":
        lines.append("  (plateau: cuts by optim.plateau_factor follow the validation loss; shown without cuts)")
    ax.axvline(xs[warm], color="gray", linestyle="--", label="end of warmup")
    stages = parse_context_schedule(t.context_schedule, config.model.context_length, t.batch_size)
    if stages:
        ctx = ax.twinx()
        contexts = [next((c for c, until in stages if p < until), stages[-1][0]) for _, _, p, _ in points]
        ctx.step(xs, contexts, where="post", color="tab:orange", label="context length")
        ctx.set_ylabel("context length", color="tab:orange")
        lines.append("  context " + ", ".join(f"{c} until {until:g}" for c, until in stages))
    ax.set_title(f"{config.name}: {o.schedule} schedule (lr {o.lr:g} -> min {o.min_lr:g})")
    handles = [h for axis in fig.axes for h in axis.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, loc="center left", fontsize=8)
    fig.tight_layout()
    with atomic.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return lines
