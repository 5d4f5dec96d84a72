"""The training loop: data -> model -> AdamW, with evaluation, logging and a run directory.

Design choices:
- One function, `train(config)`, readable top to bottom; the CLI only parses.
- Data order is a function of (seed, step, micro-batch), so two runs with the
  same config and seed see the same batches and produce the same losses.
- Validation uses a fixed subset of the validation split (the same windows for
  every run with the same data and shape) so that runs compare.
- `elapsed_s` counts training time only; evaluation, sampling and saving are
  excluded so that time-based curves compare across eval frequencies.
- No host-device sync inside a step: the loop reads the device at logging,
  evaluation, norms and checkpoint steps only. The non-finite check before
  each update stays on the device with fused AdamW (faults.py).
- Checkpoints, resume, stop signals and non-finite steps live in their own
  modules (checkpoint.py, resume.py, signals.py, faults.py); the loop only
  calls them. A resumed run continues bit for bit (see resume.py).
- Under torchrun the same function runs on every rank; everything that
  depends on the world size goes through one `Parallel` object
  (distributed.py). Rank 0 logs, writes the run directory and samples; the
  step's loss and the validation loss are averaged over ranks, and clocks and
  stop signals are agreed every step so all ranks stop together.
"""

import functools
import math
import sys
import time

import torch
from tqdm import tqdm

from lmlab import atomic
from lmlab.rundir import run as rundir
from lmlab.config import resolve_d_ff, total_steps, validate
from lmlab.data.corpora import ensure_data
from lmlab.data.batches import Batches, FixedBatches, unigram_loss
from lmlab.device import autocast, grad_scaler, resolve_device, resolve_precision
from lmlab.errors import LmlabError
from lmlab.model.sampling import generate
from lmlab.training.fastpaths import prepare_model
from lmlab.model.transformer import Transformer
from lmlab.training.optim import build_optimizer, set_lr
from lmlab.training import schedules
from lmlab.data.curriculum import Curriculum
from lmlab.training.stops import StopRules
from lmlab.rundir.plots import plot_loss
from lmlab.rundir.metrics import MetricsLog, NoMetrics, write_summary
from lmlab.evals import bpb
from lmlab.training import perf
from lmlab.training.norms import NormProbe
from lmlab.evals.training import TrainingEvals
from lmlab.rundir.sinks import StatusLine, check_sinks, open_sinks
from lmlab.rundir.env import write_env
from lmlab.training import checkpoint
from lmlab.training import resume
from lmlab.training.distributed import Parallel
from lmlab.training.faults import NonFiniteGuard
from lmlab.training.signals import StopSignals


def build_model(config, tokenizer):
    """A fresh model (vocab and d_ff filled in from the tokenizer and defaults), or one from model.init_from.

    With model.init_from, the architecture and weights come from the Hugging Face
    folder; model.context_length and model.dropout stay as configured (training choices).
    """
    m = config.model
    if m.init_from:
        from lmlab.model.hf import load_hf_model

        pretrained, _, hf_config = load_hf_model(m.init_from)
        if tokenizer.vocab_size > hf_config.vocab_size:
            raise LmlabError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model in {m.init_from} "
                             f"only {hf_config.vocab_size} embeddings; use the folder's own tokenizer")
        hf_config.context_length, hf_config.dropout, hf_config.init_from = m.context_length, m.dropout, m.init_from
        config.model = hf_config
        model = Transformer(hf_config)
        model.load_state_dict(pretrained.state_dict())
        return model
    if m.vocab_size == 0:
        m.vocab_size = tokenizer.vocab_size
    elif m.vocab_size < tokenizer.vocab_size:
        raise LmlabError(
            f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens; "
            "set model.vocab_size=0 to follow the tokenizer"
        )
    m.d_ff = resolve_d_ff(m)
    m.n_kv_heads = m.n_kv_heads or m.n_heads
    torch.manual_seed(config.train.seed)
    return Transformer(m)


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
    for i in range(int(rounds)):
        if not own:
            break  # a rank without validation batches only happens with more ranks than eval_batches
        x, y = own[min(i, len(own) - 1)]
        x, y = x.to(device), y.to(device)
        with autocast(precision, device):
            loss = model(x, targets=y)
        if i < len(own):
            n = int((y != -100).sum())
            total += loss.item() * n
            count += n
    model.train()
    total, count = parallel.sum([total, count])
    return total / max(count, 1)


def write_samples(run_dir, model, tokenizer, config):
    t = config.train
    parts = [f"# Samples from {run_dir.name}\n",
             f"temperature {t.sample_temperature}, top-k {t.sample_top_k}, seed {t.seed}\n"]
    for prompt in t.sample_prompts:
        text = generate(model, tokenizer, prompt, max_new_tokens=t.sample_tokens,
                        temperature=t.sample_temperature, top_k=t.sample_top_k, seed=t.seed)
        parts.append(f"\n## {prompt!r}\n\n{prompt}{text}\n")
    atomic.write_text(run_dir / "samples.md", "".join(parts))
    return parts


def _quiet(*args, **kwargs):
    """The log of ranks other than 0: rank 0 speaks for the job."""


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
    wall_start = time.perf_counter()  # wall_s counts from here: setup, evaluation and saving included
    t, o = config.train, config.optim
    if t.threads:
        torch.set_num_threads(t.threads)
    local_accum = parallel.local_accum(t.grad_accum)  # micro-batches on this rank; the global batch is fixed
    device = parallel.device(resolve_device(t.device))  # cuda:LOCAL_RANK under torchrun; the process group starts
    precision = resolve_precision(t.precision, device)
    if config.model.init_from and not config.data.tokenizer:
        config.data.tokenizer = config.model.init_from  # a pretrained model reads with its own tokenizer
    resumed = resume.prepare(config, log=log)  # None for a new run; checks before any data work or writing
    with parallel.local_main_first():  # one process per machine builds the tokenizer and shards
        tokenizer, shards_dir = ensure_data(config.data, log=log)
    if resumed:
        resumed.check_data(shards_dir)  # the tokenizer and splits the run was trained on
    model = (Transformer(config.model) if resumed and resumed.checkpoint else build_model(config, tokenizer)).to(device)
    steps = total_steps(config)
    tokens_per_step = t.batch_size * t.grad_accum * config.model.context_length  # over all ranks

    pinned = device.type == "cuda"  # page-locked batches: the copy to the GPU overlaps the step
    train_batches = Batches(shards_dir, "train", t.batch_size, config.model.context_length,
                            packing=config.data.packing, seed=t.seed, pin_memory=pinned)
    all_val = Batches(shards_dir, "val", t.batch_size, config.model.context_length,
                      packing=config.data.packing, seed=t.seed, pin_memory=pinned).fixed(t.eval_batches)
    val_batches = FixedBatches(all_val.batches, all_val.picks[parallel.rank::parallel.world_size])  # this rank's share
    curriculum = Curriculum(config, shards_dir, train_batches)  # train_batches itself unless train.context_schedule
    schedule, run_progress = schedules.for_run(config, steps, tokens_per_step)  # lr = schedule.lr(step, progress)
    stops = StopRules(t, tokens_per_step)  # max_time, target_val_loss, divergence

    baseline = unigram_loss(train_batches, all_val)
    val_tokens, val_bytes = bpb.count_targets(all_val, bpb.token_byte_lengths(tokenizer))  # for val_bpb
    flops_per_token = model.flops_per_token()
    peak, peak_source = perf.peak_flops(device, precision, t.peak_tflops)  # for MFU, per device

    run_dir = resumed.run_dir if resumed else (rundir.new_run_dir(config) if parallel.is_main else None)
    run_dir = parallel.broadcast(run_dir)
    t.run_name, t.runs_dir = run_dir.name, str(run_dir.parent)
    if parallel.is_main:
        rundir.save_config(run_dir, config)
        tokenizer.save(run_dir)
        write_env(run_dir, device=device, precision=precision, peak_flops=peak, peak_flops_source=peak_source,
                  flops_per_token=flops_per_token, parallel=parallel.mode, world_size=parallel.world_size)
    log(f"run {run_dir}  device {device} {precision}  {steps or 'time-bounded'} steps x {tokens_per_step:,} tokens"
        + (f"  (at most {t.max_time:g}s of training)" if t.max_time else "")
        + (f"  {parallel.mode} over {parallel.world_size} processes" if parallel.active else ""))
    log(model.summary())
    log(f"unigram baseline (no context) on the validation subset: {baseline:.4f}")

    forward_model = parallel.wrap(model)  # DDP around the model, or the model sharded in place (FSDP)
    optimizer = build_optimizer(model, o, device)  # after sharding: FSDP's optimizer holds only this rank's shard
    scaler = grad_scaler(precision, device)
    step_fn = prepare_model(forward_model, config, device, precision)  # fast paths: loss = step_fn(x, targets=y)
    metrics = (MetricsLog(run_dir / "metrics.jsonl", sinks=open_sinks(config, run_dir), started=wall_start)
               if parallel.is_main else NoMetrics(started=wall_start))
    norm_probe = NormProbe(model, t.norms_every)
    train_evals = TrainingEvals(config, tokenizer, shards_dir, device, precision)  # train.evals; off by default
    status, best_val, val_loss, loss_value = "completed", math.inf, math.nan, math.nan
    elapsed, step = 0.0, 0
    checkpoints = checkpoint.Checkpointer(run_dir, config, train_batches.meta, log)  # every N steps / M minutes, end
    guard = NonFiniteGuard(t.on_nonfinite, metrics, log)  # NaN/inf loss or gradients: stop, or skip the batch
    stateful = {"schedule": schedule, "stops": stops, "nonfinite": guard}  # in checkpoints through state_dict()
    start = 0
    if resumed:  # weights, optimizer, RNGs and counters back in place; metrics.jsonl cut back to the checkpoint
        start, elapsed, best_val, val_loss, loss_value = resumed.restore(
            model, optimizer, scaler, metrics, checkpoints, stateful, log=log, parallel=parallel)
    progress = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr,
                    disable=None if parallel.is_main else True)
    plain_log = progress.disable  # no terminal: print a compact line at evaluations instead
    if plain_log:
        metrics.sinks.append(StatusLine(log, steps, t.print_every))  # and a status line every print_every steps

    def run_eval(step_done):
        nonlocal best_val, val_loss
        val_loss = evaluate(step_fn.model, val_batches, precision, device, parallel)
        best_val = min(best_val, val_loss)
        metrics.write(step=step_done, tokens=step_done * tokens_per_step, elapsed_s=round(elapsed, 3),
                      val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)),
                      val_bpb=bpb.bits_per_byte(val_loss, val_tokens, val_bytes))
        if train_evals.due(step_done, steps):  # train.evals: probes / multiple choice (lmlab/evals/training.py)
            metrics.write(step=step_done, tokens=step_done * tokens_per_step, elapsed_s=round(elapsed, 3),
                          **train_evals.run(model))
        schedule.observe_val_loss(val_loss)  # the plateau schedule reacts; the others ignore it
        stops.observe_val_loss(step_done, val_loss, elapsed)  # target_val_loss, NaN
        line = f"step {step_done}/{steps}  loss {loss_value:.4f}  val_loss {val_loss:.4f}  {elapsed:.0f}s"
        (log if plain_log else progress.write)(line)

    def save_checkpoint(step_done):
        checkpoints.save(step_done, model, optimizer, scaler, metrics, stateful, parallel=parallel,
                         tokens=step_done * tokens_per_step, elapsed_s=elapsed, best_val=best_val,
                         val_loss=val_loss, loss=loss_value)

    stop_signals = StopSignals(log).install()  # SIGINT / SIGTERM: finish the step, checkpoint, status interrupted
    try:
        window_start, window_tokens = time.perf_counter(), 0
        for step in range(start, steps or sys.maxsize):  # steps is None when only train.max_time bounds the run
            started = time.perf_counter()
            run_p = run_progress(step, elapsed)  # share of the budget used, in [0, 1]
            lr = schedule.lr(step, run_p)
            set_lr(optimizer, lr)
            loss_sum = torch.zeros((), device=device)
            stage_batches = curriculum.at(run_p)
            for micro in range(local_accum):
                x, y = stage_batches.get(step, parallel.global_micro(micro, local_accum))
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with parallel.gradient_sync(forward_model, last=micro == local_accum - 1):  # no_sync until the last
                    loss = step_fn(x, targets=y) / local_accum  # autocast inside; fp32 loss, chunked by default
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            loss_sum = parallel.mean(loss_sum)  # the global batch's loss, the same on every rank
            scaler.unscale_(optimizer)
            norm_probe.capture_grads(step + 1)  # per-layer gradient norms before clipping, on norms steps only
            grad_norm = _full(torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip or math.inf))
            verdict = guard.check(step + 1, loss_sum, grad_norm, scaler, (step + 1) * tokens_per_step, elapsed,
                                  optimizer)  # fused AdamW: "ok", the verdict stays on the device (no sync)
            if verdict == "stop":  # NaN/inf: the weights stay those of the last good step
                status, done = "diverged", step
                break
            if verdict == "ok":  # "skip": no update; the gradients are cleared below
                scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            elapsed += time.perf_counter() - started
            signalled = stop_signals.requested
            if parallel.active:  # one clock and one stop decision for all ranks (time budget, signals)
                elapsed, signalled = parallel.max([elapsed, float(signalled)])
            window_tokens += tokens_per_step
            done = step + 1
            log_due = done % t.log_every == 0 or done == steps or done == 1
            eval_due = t.eval_every and done % t.eval_every == 0 and done != steps
            checkpoint_due = checkpoints.due(done, elapsed)
            if guard.deferred and (log_due or eval_due or checkpoint_due or norm_probe.due(done) or signalled):
                verdict, last_good = guard.settle()  # the device-side checks of the steps since the last look
                if verdict == "stop":
                    status, done = "diverged", last_good
                    break

            if verdict == "ok" and log_due:
                loss_value = loss_sum.item()
                now = time.perf_counter()
                tokens_per_s = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0
                peak_mem = perf.peak_memory_mb(device)
                if parallel.active and peak_mem is not None:
                    peak_mem = parallel.max([peak_mem])[0]  # the fullest rank
                metrics.write(step=done, tokens=done * tokens_per_step, elapsed_s=round(elapsed, 3), lr=lr,
                              loss=loss_value, grad_norm=float(grad_norm), tokens_per_s=round(tokens_per_s, 1),
                              mfu=perf.mfu(tokens_per_s / parallel.world_size, flops_per_token, peak),
                              peak_mem_mb=peak_mem)
                progress.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                stops.observe_loss(done, loss_value, elapsed)  # NaN/inf or train.diverge_factor x best
            progress.update(1)
            if norm_probe.due(done):
                probe_start = time.perf_counter()
                metrics.write(step=done, tokens=done * tokens_per_step, elapsed_s=round(elapsed, 3), **norm_probe.event(x))
                window_start += time.perf_counter() - probe_start  # keep the probe out of tokens/s
            if eval_due and not stops.reason:
                eval_start = time.perf_counter()
                run_eval(done)
                window_start += time.perf_counter() - eval_start  # keep eval out of tokens/s
            stops.check_time(done, elapsed)
            if stops.reason:  # a stop rule fired: diverged, target_reached or time_budget
                status = stops.reason
                log(stops.message)
                break
            if checkpoint_due:
                pause = time.perf_counter()
                save_checkpoint(done)
                window_start += time.perf_counter() - pause  # keep saving out of tokens/s
            if signalled:
                status = "interrupted"
                log(f"interrupted at step {done}")
                break
        else:
            done = steps
        if status != "diverged" and guard.deferred:  # a stop rule, the end: settle before the last checkpoint
            verdict, last_good = guard.settle()
            if verdict == "stop":
                status, done = "diverged", last_good
        if status != "diverged":  # at the end, on a signal, on a stop rule; never over the last good one
            save_checkpoint(done)
    finally:  # a second Ctrl-C (KeyboardInterrupt) passes through: no checkpoint, the previous ones intact
        progress.close()
        stop_signals.restore()

    if status != "diverged" and done > 0 and stops.last_eval_step != done:
        run_eval(done)
    status = stops.final_status(status)  # e.g. the target reached at the final evaluation
    metrics.close()
    weights = parallel.full_weights(model)  # collective under FSDP; rank 0 holds the whole model
    if not parallel.is_main:
        return run_dir
    if parallel.mode == "fsdp":  # rank 0 writes and samples from an unsharded copy
        model = Transformer(config.model).to(device)
        model.load_state_dict(weights)
    rundir.save_weights(model, run_dir, state=weights)
    write_summary(run_dir, {
        "status": status, "steps": done, "tokens": done * tokens_per_step, "elapsed_s": round(elapsed, 3),
        "final_val_loss": val_loss, "best_val_loss": best_val if math.isfinite(best_val) else None,
        "final_train_loss": loss_value, "unigram_val_loss": baseline, "params": model.num_params(),
        "non_embedding_params": model.num_params(non_embedding=True),
        "architecture": model.summary(), "device": str(device), "precision": precision, "tokenizer": tokenizer.fingerprint,
        "parallel": parallel.mode, "world_size": parallel.world_size,
        **stops.summary(),  # max_time_s, target (time to target), diverged_at
        **guard.summary(), "signal": stop_signals.received,  # skipped_steps, nonfinite_at; SIGINT / SIGTERM
    })
    plot_loss(run_dir)
    if status in ("completed", "target_reached", "time_budget"):
        model.eval()
        for part in write_samples(run_dir, model, tokenizer, config)[2:]:
            log(part.rstrip())
    log(f"{status}: {done} steps, val_loss {val_loss:.4f}, {elapsed:.0f}s training -> {run_dir}")
    return run_dir


def _full(tensor):
    """A plain tensor from FSDP's DTensor results (the gradient norm); others unchanged."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
