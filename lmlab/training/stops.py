"""Stop rules: when a run ends before its step / token budget, and why.

    train.max_steps / train.max_tokens   the loop's length (status completed)
    train.max_time                       training time budget (status time_budget)
    train.target_val_loss                first evaluation at or below it (status target_reached)
    train.diverge_factor, _patience      loss NaN/inf, or above factor x min(best, first) for
                                         diverge_patience steps (status diverged)

Design choices:
- The trainer calls `observe_loss` at logged steps, `observe_val_loss` after
  each evaluation and `check_time` after each step; the first rule that fires
  sets `reason` and the trainer stops. Divergence is only seen where the loss
  is read (train.log_every): reading it every step would synchronise the GPU.
- Time is training time (`elapsed_s`: evaluation, sampling and saving
  excluded), the same clock as the curves and the time-based schedule.
- Divergence compares with min(best, first) logged loss, not the last one:
  single-batch losses are noisy, and a factor (default 3) far above that noise
  still catches the runs that blow up. The loss must stay above the bar for
  diverge_patience steps: measured on the bundled corpus, a model without
  norms at lr 3e-2 spiked from 6 to 2000 and back within 4 steps and then
  trained on, and a spike that recovers is not a divergence. NaN / inf stop at once.
- Where a rule fired (step, tokens, elapsed_s, value) goes into summary.json:
  `target` (time to target) and `diverged_at`.
"""

import math

from lmlab.rundir.status import COMPLETED, DIVERGED, TARGET_REACHED, TIME_BUDGET


class StopRules:
    def __init__(self, train_cfg, tokens_per_step):
        self.max_time = train_cfg.max_time
        self.target = train_cfg.target_val_loss
        self.factor, self.patience = train_cfg.diverge_factor, train_cfg.diverge_patience
        self.above_since = None  # first logged step of the current run of losses above the bar
        self.tokens_per_step = tokens_per_step
        self.first = self.best = None
        self.reason, self.message = None, ""
        self.target_hit = self.diverged_at = None
        self.last_eval_step = None

    def _where(self, step, elapsed, **values):
        return {"step": step, "tokens": step * self.tokens_per_step, "elapsed_s": round(elapsed, 3), **values}

    def _stop(self, reason, message):
        if self.reason is None:
            self.reason, self.message = reason, message

    def _diverge(self, step, elapsed, what, value, why):
        if self.diverged_at is None:
            recorded = value if math.isfinite(value) else str(value)  # JSON has no NaN / inf
            self.diverged_at = self._where(step, elapsed, **{what: recorded}, reason=why)
            self._stop(DIVERGED, f"{what} {value:.4g} at step {step}: {why}; stopping (status diverged)")

    def observe_loss(self, step, loss, elapsed):
        """A logged training loss (after `step` optimizer steps)."""
        if not math.isfinite(loss):
            self._diverge(step, elapsed, "loss", loss, f"loss is {loss}")
            return
        if self.first is None:
            self.first = self.best = loss
        reference = min(self.best, self.first)
        if self.factor and loss > self.factor * reference:
            if self.above_since is None:
                self.above_since = step
            if step - self.above_since >= self.patience:
                self._diverge(step, elapsed, "loss", loss,
                              f"above train.diverge_factor={self.factor:g} x {reference:.4g} (best so far) "
                              f"since step {self.above_since}")
        else:
            self.above_since = None
        self.best = min(self.best, loss)

    def observe_val_loss(self, step, val_loss, elapsed):
        """An evaluation after `step` optimizer steps."""
        self.last_eval_step = step
        if not math.isfinite(val_loss):
            self._diverge(step, elapsed, "val_loss", val_loss, f"validation loss is {val_loss}")
        elif self.target and val_loss <= self.target and self.target_hit is None:
            self.target_hit = self._where(step, elapsed, val_loss=val_loss)
            self._stop(TARGET_REACHED, f"val_loss {val_loss:.4f} <= train.target_val_loss={self.target:g} at "
                                         f"step {step} ({elapsed:.0f}s): stopping (status target_reached)")

    def check_time(self, step, elapsed):
        if self.max_time and elapsed >= self.max_time:
            self._stop(TIME_BUDGET, f"train.max_time={self.max_time:g}s used up at step {step}: "
                                      "stopping (status time_budget)")

    def final_status(self, status):
        """The run's status: the loop's own (completed, interrupted, ...) unless a rule fired."""
        if self.reason and status == COMPLETED:
            return self.reason
        return status

    def state_dict(self):
        """What a checkpoint keeps: the reference losses and what was reached (not the stop itself,
        so a resumed run with a larger budget goes on)."""
        return {"first": self.first, "best": self.best, "above_since": self.above_since,
                "target": self.target, "target_hit": self.target_hit, "diverged_at": self.diverged_at,
                "last_eval_step": self.last_eval_step}

    def load_state_dict(self, state):
        self.first, self.best, self.above_since = state["first"], state["best"], state["above_since"]
        self.target_hit = state["target_hit"] if state.get("target") == self.target else None
        self.diverged_at, self.last_eval_step = state["diverged_at"], state["last_eval_step"]

    def summary(self):
        """Entries for summary.json."""
        out = {}
        if self.max_time:
            out["max_time_s"] = self.max_time
        if self.target:
            out["target"] = {"target_val_loss": self.target, "reached": self.target_hit is not None, **(self.target_hit or {})}
        if self.diverged_at:
            out["diverged_at"] = self.diverged_at
        return out
