"""One optimizer step: learning rate, forward and backward over the micro-batches, clip, check, update.

Design choices:
- No host-device sync inside a step. The loss stays a device tensor (it is
  read at logging steps only, in duties.py). The non-finite check before the
  update stays on the device with fused AdamW (faults.py), and the gradient
  norm is returned as a tensor too.
- The step times itself: `elapsed_s` grows by the step's own duration only,
  so evaluation, sampling and saving are not counted, and time-based curves
  and budgets compare across evaluation frequencies. A step the guard stops
  (non-finite, policy stop) is not counted, because its update never happens.
- Gradient accumulation: the loss of each micro-batch is divided by the
  number of micro-batches, so the gradients are those of the mean over the
  global batch. Gradients are synchronised across ranks on the last
  micro-batch only (DDP no_sync / FSDP's requires_gradient_sync).
- Micro-batch m of this rank is global micro-batch `parallel.global_micro(m)`,
  drawn as a single process would draw it. That is why 1 process and N
  processes train on the same tokens, and why a resumed run continues exactly.
- The learning rate comes from the schedule at (step, share of the budget
  used), so a time-bounded run's schedule decays on the training clock.
"""

import math
import time
from dataclasses import dataclass

import torch

from lmlab.rundir.status import DIVERGED
from lmlab.training.optim import set_lr


@dataclass
class StepResult:
    verdict: str  # the guard's: "ok", "skip" (no update) or "stop"; with fused AdamW "ok" until duties.py settles it
    lr: float
    loss: torch.Tensor  # on the device: the mean over the global batch, the same on every rank
    grad_norm: torch.Tensor  # on the device, before clipping
    x: torch.Tensor  # the last micro-batch's inputs: the norm probe measures activations on them

    @property
    def stopped(self):
        """The guard stopped the run before this step's update (non-finite, train.on_nonfinite=stop)."""
        return self.verdict == "stop"


def train_step(run, state, step):
    """Optimizer step `step` (0-based) of `run`; advances `state` (step, tokens, elapsed_s) unless the guard stops it."""
    started = time.perf_counter()
    progress = run.run_progress(step, state.elapsed_s)  # share of the budget used, in [0, 1]
    lr = run.schedule.lr(step, progress)
    set_lr(run.optimizer, lr)
    loss, x = _forward_backward(run, step, progress)
    run.scaler.unscale_(run.optimizer)
    run.norm_probe.capture_grads(step + 1)  # per-layer gradient norms before clipping, on norms steps only
    grad_norm = _full(torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.optim.grad_clip or math.inf))
    verdict = run.guard.check(step + 1, loss, grad_norm, run.scaler, (step + 1) * run.tokens_per_step,
                              state.elapsed_s, run.optimizer)  # fused AdamW: "ok", the verdict stays on the device
    if verdict == "stop":  # NaN/inf: the weights stay those of the last good step
        state.status = DIVERGED
        return StepResult(verdict, lr, loss, grad_norm, x)
    if verdict == "ok":  # "skip": no update; the gradients are cleared below
        run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    state.elapsed_s += time.perf_counter() - started
    state.at_step(step + 1, run.tokens_per_step)
    return StepResult(verdict, lr, loss, grad_norm, x)


def _forward_backward(run, step, progress):
    """Gradients of the global batch's mean loss; returns (that loss on the device, the last micro-batch's inputs)."""
    loss_sum = torch.zeros((), device=run.device)
    batches = run.curriculum.at(progress)  # the batches of this point of a train.context_schedule
    for micro in range(run.local_accum):
        batch = batches.get(step, run.parallel.global_micro(micro, run.local_accum))
        x, y = batch
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        memory = {"memory": run.memories.for_batch(micro, batch)} if run.memories else {}  # model.memory (memories.py)
        with run.parallel.gradient_sync(run.forward_model, last=micro == run.local_accum - 1):  # no_sync until the last
            loss = run.step_fn(x, targets=y, **memory) / run.local_accum  # autocast inside; fp32 loss, chunked
            run.scaler.scale(loss).backward()
        loss_sum += loss.detach()
    return run.parallel.mean(loss_sum), x  # the global batch's loss, the same on every rank


def _full(tensor):
    """A plain tensor from FSDP's DTensor results (the gradient norm); others unchanged."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
