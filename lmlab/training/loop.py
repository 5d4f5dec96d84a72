"""The training loop: set up, then step after step with the duties that follow each, then finish.

    run, state = setup(...)                   setup.py   model, data, optimizer, run directory; state new or resumed
    for step in range(state.step, steps):
        result = train_step(run, state, step) step.py    lr, forward/backward, clip, non-finite check, update
        after_step(run, state, result, ...)   duties.py  log, evaluate, norms, stop rules, checkpoint, signals
    checkpoint_at_end(run, state)             duties.py  the last checkpoint
    finish(run, state, signals)               finish.py  final eval, weights, summary.json, plot, samples

Design choices:
- One function, `train(config)`, and a loop that fits on one screen; the
  CLI only parses. Each phase lives in its own module, named for its job.
- The counters the loop moves (step, tokens, elapsed_s, best and last
  validation loss, last training loss, status) live in one TrainState
  (state.py). That object is what checkpoints save and what resume restores
  (all but the status), under the state.json keys checkpoints have always had.
- Data order is a function of (seed, step, micro-batch, rank), so two runs
  with the same config and seed see the same batches and produce the same
  losses, and a resumed run continues bit for bit (see resume.py).
- Validation uses a fixed subset of the validation split (the same windows
  for every run with the same data and shape) so that runs compare.
- `elapsed_s` counts training time only; evaluation, sampling and saving are
  excluded so that time-based curves compare across eval frequencies
  (the step times itself, step.py).
- No host-device sync inside a step: the loop reads the device at logging,
  evaluation, norms and checkpoint steps only (duties.py). The non-finite
  check before each update stays on the device with fused AdamW (faults.py).
- Checkpoints, resume, stop rules, stop signals and non-finite steps live in
  their own modules (checkpoint.py, resume.py, stops.py, signals.py,
  faults.py); the loop only calls them.
- An error after set-up ends the run with status failed in summary.json,
  the reason and the newest checkpoint, and one line (failure.py).
- Under torchrun the same function runs on every rank; everything that
  depends on the world size goes through one `Parallel` object
  (distributed.py). Rank 0 logs, writes the run directory and samples; the
  step's loss and the validation loss are averaged over ranks, and clocks and
  stop signals are agreed every step so all ranks stop together.
"""

import functools
import sys

from lmlab.config import validate
from lmlab.rundir.sinks import check_sinks
from lmlab.training.distributed import Parallel
from lmlab.training.duties import Throughput, after_step, checkpoint_at_end, evaluate
from lmlab.training.failure import fail
from lmlab.training.finish import finish, write_samples
from lmlab.training.setup import build_model, setup
from lmlab.training.signals import StopSignals
from lmlab.training.step import train_step

__all__ = ["build_model", "evaluate", "train", "write_samples"]  # tests and lmlab.train import them from here


def train(config, log=functools.partial(print, flush=True)):
    """Train a model as `config` says; returns the run directory (on every rank under torchrun)."""
    validate(config)
    check_sinks(config)  # a missing TensorBoard / wandb is reported before any work
    parallel = Parallel.from_launch(config)
    try:
        return _train(config, log if parallel.is_main else _quiet, parallel)
    finally:
        parallel.close()


def _train(config, log, parallel):
    run, state = setup(config, log, parallel)  # everything built and checked; state fresh or from a checkpoint
    signals = StopSignals(log).install()  # SIGINT / SIGTERM: finish the step, checkpoint, status interrupted
    try:
        speed = Throughput()  # tokens/s of the steps since the last logged one
        for step in range(state.step, run.steps or sys.maxsize):  # steps is None when only train.max_time bounds the run
            result = train_step(run, state, step)
            if result.stopped or after_step(run, state, result, signals, speed):
                break
        checkpoint_at_end(run, state)
    except Exception as error:  # summary.json says failed, and why (failure.py); signal handlers still in place
        fail(run, state, error)
    finally:  # a second Ctrl-C (KeyboardInterrupt) passes through: no checkpoint, the previous ones intact
        run.progress.close()
        signals.restore()
    try:
        return finish(run, state, signals)
    except Exception as error:
        fail(run, state, error)


def _quiet(*args, **kwargs):
    """The log of ranks other than 0: rank 0 speaks for the job."""
