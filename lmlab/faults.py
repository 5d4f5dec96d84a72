"""Non-finite loss or gradients, caught before the optimizer step.

    train.on_nonfinite = stop   status diverged; the weights stay those of the last good step,
                                no checkpoint is written over the last good one
    train.on_nonfinite = skip   drop the batch (no update, gradients cleared), count it, go on

Design choices:
- The check runs on every step, between clipping and the optimizer step, so a
  NaN never reaches the weights or Adam's moments. It costs one host sync per
  step (one boolean), about what reading the loss costs; the stop rules in
  stops.py only read the loss at logged steps and would see a NaN too late.
- The loss is always checked; the gradient norm too, except under fp16, whose
  grad scaler expects overflowing gradients now and then and skips those
  steps itself.
- Every non-finite step leaves a {"kind": "nonfinite", ...} event in
  metrics.jsonl; the number skipped goes to summary.json and to checkpoints
  (`state_dict`), so a resumed run keeps counting.
"""

import torch


class NonFiniteGuard:
    def __init__(self, policy, metrics, log=print):
        self.policy, self.metrics, self.log = policy, metrics, log
        self.skipped = 0
        self.first = None  # where the first non-finite step was, for the summary

    def check(self, step, loss, grad_norm, scaler, tokens, elapsed):
        """'ok', 'skip' or 'stop' for optimizer step `step` (counted from 1), before it is taken."""
        finite_loss = torch.isfinite(loss)
        finite = finite_loss if scaler.is_enabled() else finite_loss & torch.isfinite(grad_norm)
        if bool(finite):  # the one host sync of the check
            return "ok"
        what = "loss" if not bool(finite_loss) else "gradients"
        action = "stop" if self.policy == "stop" else "skip"
        where = {"step": step, "tokens": tokens, "elapsed_s": round(elapsed, 3)}
        self.metrics.write(**where, kind="nonfinite", what=what, action=action,  # values nested: not a loss curve point
                           values={"loss": float(loss), "grad_norm": float(grad_norm)})
        self.first = self.first or {**where, "what": what}
        if action == "stop":
            self.log(f"non-finite {what} at step {step}: stopped before the update (status diverged); "
                     "resume from the last checkpoint with a lower optim.lr, or with train.on_nonfinite=skip")
            return "stop"
        self.skipped += 1
        self.log(f"non-finite {what} at step {step}: batch skipped ({self.skipped} so far)")
        return "skip"

    def summary(self):
        """Entries for summary.json."""
        return {"skipped_steps": self.skipped, **({"nonfinite_at": self.first} if self.first else {})}

    def state_dict(self):
        return {"skipped": self.skipped, "first": self.first}

    def load_state_dict(self, state):
        self.skipped, self.first = state.get("skipped", 0), state.get("first")
