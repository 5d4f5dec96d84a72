"""After each optimizer step: log, evaluate, probe norms, apply the stop rules, checkpoint, heed signals.

Design choices:
- The host reads the device only when a duty is due: at logging steps
  (train.log_every, the first and the last step), evaluations, norm probes,
  checkpoints and stop signals. Before it does, the guard's deferred
  non-finite verdicts are settled in one sync, so a step that was dropped is
  never logged and a stopped run is rolled back to its last good step.
- Under torchrun the clock and the signal flag are agreed (max over ranks)
  after every step, so every rank takes the same decisions and stops at the
  same step: none waits forever in a collective.
- Divergence is only seen at logged steps (stops.py): reading the loss every
  step would synchronise the GPU.
- tokens/s is the speed of training alone: the time spent probing norms,
  evaluating and saving is taken out of its window (`Throughput.paused`).
- The order after a step is fixed: settle, log, norm probe, evaluation (not
  when a stop rule has already fired), the stop rules, checkpoint, signals.
  A stop rule ends the run before the periodic checkpoint; the loop writes
  the last checkpoint once the run has stopped (`checkpoint_at_end`).
- A checkpoint is never written over the last good one: after a non-finite
  stop (status diverged) there is no final checkpoint.
"""

import contextlib
import math
import time
from dataclasses import dataclass

import torch

from lmlab.device import autocast
from lmlab.evals import bpb
from lmlab.model.memory import inner_model
from lmlab.rundir.status import DIVERGED, INTERRUPTED
from lmlab.training import launcher, perf
from lmlab.training.checkpoint import step_name
from lmlab.training.distributed import Parallel


def after_step(run, state, result, signals, speed):
    """Every duty due after the step in `result`, in order; True when the run stops here."""
    signalled = _agree_clock_and_signal(run, state, signals)
    speed.count(run.tokens_per_step)
    due = Due.after(run, state)
    verdict = result.verdict
    if run.guard.deferred and (due.anything or signalled):
        verdict, last_good = run.guard.settle()  # the device-side checks of the steps since the last look
        if verdict == "stop":
            _roll_back_to(run, state, last_good)
            return True
    if verdict == "ok" and due.log:
        log_step(run, state, result, speed)
    run.progress.update(1)
    if due.norms:
        with speed.paused():
            run.metrics.write(**state.where(), **run.norm_probe.event(result.x))
    if due.eval and not run.stops.reason:
        with speed.paused():
            evaluate_and_record(run, state)
    return _stop_rules_checkpoint_signal(run, state, due.checkpoint, signalled, speed)


@dataclass
class Due:
    """Which duties fall on the step just done."""

    log: bool
    eval: bool
    norms: bool
    checkpoint: bool

    @classmethod
    def after(cls, run, state):
        """The duties due once `state.step` steps are done (the last step is evaluated by finish.py)."""
        t, done = run.config.train, state.step
        return cls(log=done % t.log_every == 0 or done == run.steps or done == 1,
                   eval=bool(t.eval_every and done % t.eval_every == 0 and done != run.steps),
                   norms=run.norm_probe.due(done),
                   checkpoint=run.checkpoints.due(done, state.elapsed_s))

    @property
    def anything(self):
        return self.log or self.eval or self.norms or self.checkpoint


def _agree_clock_and_signal(run, state, signals):
    """Whether a stop signal came; under torchrun, one clock and one decision for all ranks."""
    signalled = signals.requested
    if run.parallel.active:
        state.elapsed_s, signalled = run.parallel.max([state.elapsed_s, float(signalled)])
    return signalled


def _roll_back_to(run, state, last_good):
    """A deferred non-finite stop: the run ends at the last good step, whose weights the model still has."""
    state.status = DIVERGED
    state.at_step(last_good, run.tokens_per_step)


def log_step(run, state, result, speed):
    """Read the loss from the device (the one sync of a logging step), write the step's event, watch for divergence."""
    state.loss = result.loss.item()
    tokens_per_s = speed.rate()
    peak_mem = perf.peak_memory_mb(run.device)
    if run.parallel.active and peak_mem is not None:
        peak_mem = run.parallel.max([peak_mem])[0]  # the fullest rank
    run.metrics.write(**state.where(), lr=result.lr, loss=state.loss, grad_norm=float(result.grad_norm),
                      tokens_per_s=round(tokens_per_s, 1),
                      mfu=perf.mfu(tokens_per_s / run.parallel.world_size, run.flops_per_token, run.peak_flops),
                      peak_mem_mb=peak_mem)
    run.progress.set_postfix(loss=f"{state.loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
    run.stops.observe_loss(state.step, state.loss, state.elapsed_s)  # NaN/inf or train.diverge_factor x best


def _stop_rules_checkpoint_signal(run, state, checkpoint_due, signalled, speed):
    """The stop rules (a rule that fires ends the run), the periodic checkpoint, then a stop signal; True to stop."""
    run.stops.check_time(state.step, state.elapsed_s)
    if run.stops.reason:  # diverged, target_reached or time_budget
        state.status = run.stops.reason
        run.log(run.stops.message)
        return True
    if checkpoint_due:
        with speed.paused():
            save_checkpoint(run, state)
    if signalled:
        state.status = INTERRUPTED
        run.log(f"interrupted at step {state.step}")
        return True
    return False


def checkpoint_at_end(run, state):
    """The last checkpoint: at the end, on a signal or a stop rule, never over the last good one (diverged)."""
    if state.status != DIVERGED and run.guard.deferred:  # settle first: the last steps may not have been checked
        verdict, last_good = run.guard.settle()
        if verdict == "stop":
            _roll_back_to(run, state, last_good)
    if state.status != DIVERGED:
        save_checkpoint(run, state)


def save_checkpoint(run, state):
    """A checkpoint of the run at `state`; a failed write only warns (checkpoint.Checkpointer).

    Under torchrun, a checkpoint slower than half torchrun's SIGTERM grace is said once (launcher.py).
    """
    started = time.perf_counter()
    run.checkpoints.save(state, run.model, run.optimizer, run.scaler, run.metrics, run.stateful,
                         parallel=run.parallel)
    warning = launcher.checkpoint_grace_warning(run.run_dir, step_name(state.step), time.perf_counter() - started)
    if warning:
        run.log(warning)


def evaluate_and_record(run, state):
    """Validation loss now: into the state, metrics.jsonl, the plateau schedule, the stop rules and the log.

    train.evals (probes, multiple choice) run here too, when due.
    """
    state.val_loss = evaluate(run.step_fn.model, run.val_batches, run.precision, run.device, run.parallel)
    state.best_val = min(state.best_val, state.val_loss)
    run.metrics.write(**state.where(), val_loss=state.val_loss, val_ppl=math.exp(min(state.val_loss, 50)),
                      val_bpb=bpb.bits_per_byte(state.val_loss, run.val_tokens, run.val_bytes))
    if run.train_evals.due(state.step, run.steps):  # lmlab/evals/training.py
        run.metrics.write(**state.where(), **run.train_evals.run(run.model))
    run.schedule.observe_val_loss(state.val_loss)  # the plateau schedule reacts; the others ignore it
    run.stops.observe_val_loss(state.step, state.val_loss, state.elapsed_s)  # target_val_loss, NaN
    line = f"step {state.step}/{run.steps}  loss {state.loss:.4f}  val_loss {state.val_loss:.4f}  {state.elapsed_s:.0f}s"
    (run.log if run.plain_log else run.progress.write)(line)


@torch.no_grad()
def evaluate(model, batches, precision, device, parallel=None):
    """Mean validation loss over the fixed validation subset (over every rank's share of it under torchrun).

    `model(x, targets=y)` gives the loss (the training step's own, chunked, compiled path).
    Every rank runs the same number of forward passes (a rank with fewer batches repeats one and
    does not count it): FSDP gathers weights collectively in each forward.
    """
    parallel = parallel or Parallel()
    model.eval()
    total, count = 0.0, 0
    rounds = max(parallel.max([len(batches)])[0], 1) if parallel.active else len(batches)
    own = list(batches)
    memory = _eval_memory(model, own, device)
    for i in range(int(rounds)):
        if not own:
            break  # a rank without validation batches only happens with more ranks than eval_batches
        batch = own[min(i, len(own) - 1)]
        x, y = batch
        x, y = x.to(device), y.to(device)
        with autocast(precision, device):
            if memory is None:
                loss = model(x, targets=y)
            else:
                memory.reset(batch.new_doc)
                loss = model(x, targets=y, memory=memory)
        if i < len(own):
            n = int((y != -100).sum())
            total += loss.item() * n
            count += n
    model.train()
    total, count = parallel.sum([total, count])
    return total / max(count, 1)


def _eval_memory(model, batches, device):
    """With model.memory and stream batches: a fresh Memory, carried through the subset's consecutive segments."""
    inner = inner_model(model)
    if not getattr(inner.config, "memory", 0) or not batches or not hasattr(batches[0], "new_doc"):
        return None
    return inner.new_memory(len(batches[0][0]), device=device)


class Throughput:
    """tokens/s of the training steps since the last logged step, with probes, evaluation and saving left out."""

    def __init__(self):
        self.start, self.tokens = time.perf_counter(), 0

    def count(self, tokens):
        self.tokens += tokens

    def rate(self):
        """tokens/s since the last call (or since the loop began); starts the next window."""
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        self.start, self.tokens = now, 0
        return rate

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside does not count as training time for tokens/s."""
        began = time.perf_counter()
        yield
        self.start += time.perf_counter() - began
