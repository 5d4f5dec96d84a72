"""The largest micro-batch whose training step fits: on a GPU by trying, on a CPU against a memory budget.

    section = find_batch(load_config("cpu-quickstart"))
    print(section.markdown())

Design choices:
- A trial is one real training step, the one `lmlab train` runs (see
  lmlab.bench.train: prepare_model with the config's switches, build_optimizer,
  forward with the loss, backward, optimizer step) on a fresh model, so
  activation checkpointing, train.loss_chunk, precision and compile count.
- Search: double from 1 until a batch does not fit (or max_batch), then
  bisect between the last that fit and the first that did not: about
  2 log2(answer) trials.
- CUDA: a batch fits when its step raises no OutOfMemoryError (and its peak is
  within budget_mib, when one is given); the cache is emptied after every trial.
- CPU has no out-of-memory error to catch: past the RAM the machine swaps or
  the kernel kills the process. So a batch fits when the step's peak memory
  (growth of the peak resident set) is within a budget, by default 90% of
  MemAvailable. And a trial predicted to exceed the budget by more than 5%
  is not run but reported as "predicted": the prediction is affine in the
  batch, through the largest measured batch that fit and the fixed cost of
  weights, gradients and AdamW state (16 bytes a parameter). Without it,
  doubling a batch that fits 90% of the RAM would ask for 180%; with the
  margin, the batches next to the answer are measured, not guessed.
- One unreported step at batch 1 comes first: a process's first step pays
  one-off costs (thread pools, lazy imports: ~90 MiB of RSS here) that would
  otherwise be charged to the first trial.
"""

import dataclasses
import gc
import os

import torch

from lmlab.bench.common import Section
from lmlab.bench.train import build_lmlab, random_batch, shape_name, step_peak
from lmlab.device import resolve_device, resolve_precision
from lmlab.errors import LmlabError
from lmlab.model.transformer import Transformer

BUDGET_SHARE = 0.9  # default CPU budget: this share of MemAvailable
STATIC_BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW's two moments
PREDICTION_MARGIN = 1.05  # on CPU, a trial predicted above this x budget is not run (near the budget: measured)


def find_batch(config, device="cpu", precision=None, budget_mib=None, max_batch=4096, log=print):
    """A Section with every trial (batch, peak MiB, fits) and, in its notes, the largest batch that fits."""
    device = resolve_device(device)
    precision = resolve_precision(precision or config.train.precision, device)
    config = _resolved(config)
    if device.type not in ("cpu", "cuda"):
        raise LmlabError(f"find_batch measures memory on cpu and cuda only, not {device.type}")
    if device.type == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        raise LmlabError("find_batch on CPU measures the resident set through Linux's /proc, which this system lacks")
    if max_batch < 1:
        raise LmlabError(f"max_batch must be at least 1, got {max_batch}")
    if budget_mib is not None and not budget_mib > 0:
        raise LmlabError(f"budget_mib must be a positive number of MiB, got {budget_mib}")
    budget, budget_source = budget_mib, "given"
    if device.type == "cpu" and budget is None:
        budget, budget_source = default_budget_mib(), f"{BUDGET_SHARE:.0%} of MemAvailable (/proc/meminfo)"

    try:
        step_peak_mib(config, 1, device, precision)  # the process's one-off costs, unreported
    except torch.cuda.OutOfMemoryError:
        pass  # the first trial will say so
    _free(device)
    static = STATIC_BYTES_PER_PARAM * _params(config) / 2**20
    trials = []

    def fits(batch):
        predicted = _predict(trials, batch, static) if device.type == "cpu" else None
        if predicted is not None and predicted > PREDICTION_MARGIN * budget:
            trial = {"batch": batch, "peak_mib": predicted, "fits": False, "how": "predicted"}
        else:
            try:
                peak = step_peak_mib(config, batch, device, precision)
                ok = budget is None or (peak is not None and peak <= budget)
                trial = {"batch": batch, "peak_mib": peak, "fits": ok, "how": "measured"}
            except torch.cuda.OutOfMemoryError:
                trial = {"batch": batch, "peak_mib": None, "fits": False, "how": "out of memory"}
            if trial["how"] == "out of memory":
                _free(device)  # what the failed step held, now that the exception (and its frames) are gone
        trial["tokens"] = batch * config.model.context_length
        trial["result"] = "fits" if trial["fits"] else "does not fit"
        trials.append(trial)
        log(f"batch {batch}: {_describe(trial)}")
        return trial["fits"]

    best, too_big = _search(fits, max_batch)
    if best == 0:
        raise LmlabError(f"not even one row of {config.model.context_length} tokens fits "
                         f"({_describe(trials[0])}, budget {_mib(budget)}): shorten model.context_length, "
                         "or set train.activation_checkpointing=true / a smaller train.loss_chunk")
    return Section(
        title=f"Largest micro-batch: {shape_name(config.model)} on {device.type}, {precision}",
        rows=trials,
        columns=[("batch", "batch"), ("tokens", "tokens"), ("peak_mib", "peak MiB"), ("result", "result"),
                 ("how", "how")],
        notes=_notes(config, device, best, too_big, max_batch, budget, budget_source),
    )


def step_peak_mib(config, batch_size, device, precision):
    """Peak MiB of building the model and optimizer and running one training step of batch_size rows."""
    x, y = random_batch(config.model, batch_size, device)
    mib, _ = step_peak(lambda: build_lmlab(config, x, y, device, precision), device, 1)
    return mib


def default_budget_mib():
    """BUDGET_SHARE of MemAvailable in MiB; an LmlabError where /proc/meminfo cannot tell."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return BUDGET_SHARE * int(line.split()[1]) / 1024
    except OSError:
        pass
    raise LmlabError("cannot read MemAvailable from /proc/meminfo to set a memory budget; give budget_mib")


def _search(fits, max_batch):
    """(largest batch that fits, smallest that does not or None): doubling from 1, then bisection."""
    good, bad, batch = 0, None, 1
    while True:
        if not fits(batch):
            bad = batch
            break
        good = batch
        if batch >= max_batch:
            break
        batch = min(2 * batch, max_batch)
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good, bad


def _predict(trials, batch, static):
    """Peak MiB expected at `batch`: affine through the largest measured batch that fit and the static cost."""
    measured = [t for t in trials if t["how"] == "measured" and t["fits"] and t["peak_mib"] is not None]
    if not measured:
        return None
    ref = max(measured, key=lambda t: t["batch"])
    base = min(static, ref["peak_mib"])
    return base + (ref["peak_mib"] - base) * batch / ref["batch"]


def _resolved(config):
    """A copy of config with the model resolved, its vocab data.tokenizer_vocab_size when model.vocab_size is 0."""
    model = dataclasses.replace(config.model.resolved(vocab_size=config.data.tokenizer_vocab_size), init_from="")
    return dataclasses.replace(config, model=model)


def _params(config):
    with torch.device("meta"):  # shapes only: no memory, no init
        return Transformer(config.model).num_params()


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _mib(value):
    return "none" if value is None else f"{value:,.0f} MiB"


def _describe(trial):
    if trial["how"] == "out of memory":
        return "out of memory"
    fits = "fits" if trial["fits"] else "does not fit"
    return f"{'predicted ' if trial['how'] == 'predicted' else ''}peak {trial['peak_mib']:,.1f} MiB, {fits}"


def _split(global_rows, best):
    """(micro-batch, accumulation steps): the largest divisor of the global batch that fits, and its quotient."""
    micro = max(d for d in range(1, min(global_rows, best) + 1) if global_rows % d == 0)
    return micro, global_rows // micro


def _notes(config, device, best, too_big, max_batch, budget, budget_source):
    t, context = config.train, config.model.context_length
    stop = f"batch {too_big} does not" if too_big else f"max_batch={max_batch} reached"
    notes = [f"largest micro-batch that fits: {best} rows of {context} tokens = {best * context:,} tokens ({stop})"]
    if device.type == "cpu":
        notes.append(f"fits = peak resident-set growth of building the model and optimizer and one step <= "
                     f"budget {_mib(budget)} ({budget_source}); 'predicted' trials, extrapolated to over "
                     f"{PREDICTION_MARGIN:g} x the budget, were not run (see lmlab/bench/find_batch.py)")
    else:
        notes.append("fits = the step raised no CUDA OutOfMemoryError"
                     + (f" and torch's peak allocation stayed within {_mib(budget)}" if budget is not None else ""))
    notes.append("a step: prepare_model (train.attention, activation_checkpointing, loss_chunk, compile as configured) "
                 "+ build_optimizer + forward with the loss + backward + optimizer step")
    global_rows = t.batch_size * t.grad_accum
    micro, accum = _split(global_rows, best)
    notes.append(f"for the config's global batch of {global_rows} rows ({global_rows * context:,} tokens per optimizer "
                 f"step, per process): train.batch_size={micro} train.grad_accum={accum}")
    return notes
