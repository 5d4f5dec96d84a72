"""Non-finite loss or gradients, caught before the optimizer step.

    train.on_nonfinite = stop   status diverged; the weights stay those of the last good step,
                                no checkpoint is written over the last good one
    train.on_nonfinite = skip   drop the batch (no update, gradients cleared), count it, go on

Design choices:
- The check runs on every step, between clipping and the optimizer step, so a
  NaN never reaches the weights or Adam's moments; the stop rules in stops.py
  only read the loss at logged steps and would see a NaN too late.
- No host sync inside the step: with fused AdamW (the default on CUDA and CPU)
  the verdict stays on the device. The guard hands the optimizer a `found_inf`
  flag, the same one GradScaler uses, and the fused kernel skips the update
  (moments and step count included) when it is set; under `stop` the flag is
  sticky, so no later update is applied either. The host reads the flags of
  the steps since the last look in one sync (`settle`) when it needs to know:
  at logging, evaluation, norms and checkpoint steps, on a signal and at the
  end. The outcome is the one a per-step check gives: a stopped run ends with
  the weights of the last good step and no checkpoint after it, a skipped batch
  is counted and leaves its event (the loop may run up to `train.log_every`
  steps past a stop before it knows; their updates are never applied).
  Other optimizers (not fused, 8-bit) and fp16 are checked with one sync per
  step, as before.
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
        self.deferred = False  # decided per step: fused optimizer and no grad scaler
        self._pending = []  # deferred: (step, tokens, elapsed) of the steps not yet settled
        self._values = []  # deferred: per pending step, a device tensor [finite, loss finite, loss, grad_norm]
        self._stopped = None  # deferred, policy stop: device flag, set at the first non-finite step

    def check(self, step, loss, grad_norm, scaler, tokens, elapsed, optimizer=None):
        """'ok', 'skip' or 'stop' for optimizer step `step` (counted from 1), before it is taken.

        With a fused optimizer (and no grad scaler) the answer is always 'ok' and the update is
        gated on the device instead; `settle` tells the outcome later.
        """
        finite_loss = torch.isfinite(loss)
        finite = finite_loss if scaler.is_enabled() else finite_loss & torch.isfinite(grad_norm)
        self.deferred = _gateable(optimizer) and not scaler.is_enabled()
        if self.deferred:
            bad = ~finite
            if self.policy == "stop":
                self._stopped = bad if self._stopped is None else self._stopped | bad
                bad = self._stopped
            optimizer.found_inf = bad.float()  # the fused kernel skips the update when it is 1 (no sync)
            self._pending.append((step, tokens, elapsed))
            self._values.append(torch.stack([finite.float(), finite_loss.float(), loss.detach().float(),
                                             grad_norm.detach().float()]))
            return "ok"
        if optimizer is not None:
            optimizer.found_inf = None
        if bool(finite):  # the one host sync of the check
            return "ok"
        return self._report(step, tokens, elapsed, bool(finite_loss), float(loss), float(grad_norm))

    def settle(self):
        """Deferred steps' outcome, in one host sync: (verdict, step).

        verdict 'ok': all applied; 'skip': the latest step was dropped (do not log its loss);
        'stop': stopped, `step` is the last good step (the weights are its weights).
        """
        pending, values = self._pending, self._values
        self._pending, self._values = [], []
        if not pending:
            return "ok", None
        rows = torch.stack(values).tolist()
        verdict = "ok"
        for (step, tokens, elapsed), (finite, finite_loss, loss, grad_norm) in zip(pending, rows):
            if not finite:
                verdict = self._report(step, tokens, elapsed, bool(finite_loss), loss, grad_norm)
                if verdict == "stop":
                    return "stop", step - 1
        return verdict if not rows[-1][0] else "ok", None

    def _report(self, step, tokens, elapsed, finite_loss, loss, grad_norm):
        what = "loss" if not finite_loss else "gradients"
        action = "stop" if self.policy == "stop" else "skip"
        where = {"step": step, "tokens": tokens, "elapsed_s": round(elapsed, 3)}
        self.metrics.write(**where, kind="nonfinite", what=what, action=action,  # values nested: not a loss curve point
                           values={"loss": loss, "grad_norm": grad_norm})
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


def _gateable(optimizer):
    """True for optimizers that read `found_inf` on the device: torch's fused Adam / AdamW."""
    groups = getattr(optimizer, "param_groups", None) or []
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(g.get("fused") for g in groups)
