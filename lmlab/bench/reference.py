"""`lmlab bench reference`: a run's training repeated by an independent implementation.

    run_dir = train_reference(load_config(None, ["train.max_steps=200"]))

It takes the config of `lmlab train` and trains the same model again with
transformers' LlamaForCausalLM in a plain PyTorch loop, into a run directory
that `lmlab compare`, `runs`, `report` and `eval` read like any other. When a
finding (a loss curve, a phase change in copy accuracy) shows in both, it is
not an artefact of lmlab's model, loss or training step.

Design choices:
- Shared with `lmlab train`, on purpose, so that the two runs see the same
  problem: the config; the data (lmlab's tokenizer, shards and Batches, so
  the same batches come in the same order: a batch is a function of (seed,
  step, micro-batch)); the initial weights (lmlab's init under train.seed,
  exported with model/hf.py, so both start equal and the first-step losses
  agree to float rounding); the learning rate of each step (lmlab's schedule
  object); the validation subset; the probes of train.evals (lmlab/evals,
  through evals/adapter.py); the run directory's files.
- Not shared: everything a step computes. The forward pass is transformers'
  (LlamaForCausalLM; Qwen3ForCausalLM for model.qk_norm), the loss a plain
  F.cross_entropy over its logits, the optimizer torch's AdamW in its default
  (not fused) implementation with the two parameter groups written out here
  (decay on matrices only, lmlab's rule), clipping torch's clip_grad_norm_.
  lmlab's Transformer is built only to draw the initial weights and to save
  the final ones under lmlab's names (model.safetensors), so `lmlab eval`
  reads the reference run as it reads any run.
- A config the reference cannot follow exactly is refused with every reason
  at once, before any data work: switches transformers' classes have no form
  for (model/hf.py's list, model.memory, model.dropout), optimizers other
  than AdamW, budgets on the clock (train.max_time, optim.progress=time: two
  implementations run at different speeds, so their schedules would part),
  resuming, and torchrun.
- A deliberately plain loop: one process, no compile, no fast paths, no
  checkpoints, no samples, no TensorBoard / wandb. The loss is read every
  step, and a non-finite loss or gradient ends the run as diverged before the
  update. train.target_val_loss stops it as it stops lmlab; diverge_factor
  does not apply.
- The run is named after the one it repeats: train.run_name (or the preset
  name and the time) with "-reference" after it, so `lmlab train` and
  `lmlab bench reference` take the same overrides and write side by side.
"""

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmlab.bench.common import transformers_model
from lmlab.config import absolute_inputs, total_steps, validate
from lmlab.data.batches import IGNORE, Batches, unigram_loss
from lmlab.data.corpora import ensure_data
from lmlab.data.curriculum import Curriculum
from lmlab.device import autocast, grad_scaler, resolve_device, resolve_precision
from lmlab.errors import LmlabError
from lmlab.evals import bpb
from lmlab.evals.adapter import LogitsModel
from lmlab.evals.training import TrainingEvals
from lmlab.model import weights
from lmlab.model.hf import hf_architecture, hf_refusals, hf_state_dict
from lmlab.rundir import run as rundir
from lmlab.rundir.env import write_env
from lmlab.rundir.metrics import MetricsLog, write_summary
from lmlab.rundir.plots import plot_loss
from lmlab.rundir.status import DIVERGED, TARGET_REACHED
from lmlab.training import schedules
from lmlab.training.setup import build_model
from lmlab.training.state import TrainState

SUFFIX = "-reference"
OPTIMIZER = "torch.optim.AdamW (default implementation, not fused)"


def check_reference(config):
    """The HF class that repeats this run; an LmlabError naming everything the reference cannot follow."""
    m, o, t = config.model, config.optim, config.train
    reasons = hf_refusals(m)
    if m.memory:
        reasons.append(f"model.memory={m.memory} (transformers' classes carry no memory from segment to segment)")
    if m.dropout:
        reasons.append(f"model.dropout={m.dropout:g} (transformers' Llama drops no residual branches, and random "
                       "masks would part the two runs; use model.dropout=0)")
    if o.name != "adamw":
        reasons.append(f"optim.name={o.name} (the reference trains with torch's AdamW)")
    if t.max_time or o.progress == "time":
        reasons.append("a budget on the clock (train.max_time, optim.progress=time): the two implementations run at "
                       "different speeds, so their schedules would part; give train.max_steps or train.max_tokens")
    if t.resume:
        reasons.append("train.resume (the reference always starts from the initial weights)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        reasons.append("torchrun (the reference is a one-process loop)")
    if reasons:
        raise LmlabError("lmlab bench reference cannot repeat this run with transformers: " + "; ".join(reasons))
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise LmlabError(f"lmlab bench reference needs transformers, which could not be imported ({e}): "
                         "pip install 'lmlab[bench]'") from None
    return hf_architecture(m)


@dataclass
class Reference:
    """The parts of a reference run, built once by `_setup`."""

    config: Any
    architecture: str
    device: Any
    precision: str
    tokenizer: Any
    shards_dir: Any
    source: Any  # lmlab's Transformer: the initial weights, and the final ones saved under lmlab's names
    model: Any  # transformers' model: what trains
    steps: int
    tokens_per_step: int
    curriculum: Any
    val_batches: Any
    schedule: Any
    progress: Any
    optimizer: Any
    scaler: Any
    run_dir: Any = None
    metrics: Any = None
    evals: Any = None
    baseline: float = 0.0
    val_tokens: int = 0
    val_bytes: int = 0
    last_eval: int = -1


def train_reference(config, log=print):
    """Train the config's model with transformers in a plain loop; returns the run directory."""
    validate(config)
    check_reference(config)
    wall_start = time.perf_counter()
    ref = _setup(config, log)
    _open_run_dir(ref, wall_start, log)
    state = _loop(ref, log)
    return _finish(ref, state, log)


def _setup(config, log):
    """Device, data, initial weights (lmlab's, exported), the HF model, batches, schedule and optimizer."""
    import transformers

    t, d = config.train, config.data
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    precision = resolve_precision(t.precision, device)
    config = absolute_inputs(config)
    if config.model.init_from and not d.tokenizer:
        d.tokenizer = config.model.init_from  # as lmlab train: a pretrained model reads with its own tokenizer
    t.run_name = (t.run_name or f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}") + SUFFIX
    taken = Path(t.runs_dir).expanduser() / t.run_name
    if taken.exists():
        raise LmlabError(f"run directory {taken} already exists (a reference run is not resumed); give another "
                         "train.run_name, or remove it (nothing was written)")
    rundir.check_new_run_dir(config)  # before any data work
    tokenizer, shards_dir = ensure_data(d, log=log)
    source = build_model(config, tokenizer)  # torch.manual_seed(train.seed), then lmlab's init: lmlab train's weights
    architecture = f"{hf_architecture(config.model)} (transformers {transformers.__version__})"
    model = transformers_model(config.model, {k: v.clone() for k, v in hf_state_dict(source).items()}, device)
    model.config.use_cache = False
    model.train()
    steps = total_steps(config)
    context = config.model.context_length
    train_batches = Batches(shards_dir, "train", t.batch_size, context, packing=d.packing, seed=t.seed,
                            segments_per_document=d.segments_per_document, streams=t.batch_size * t.grad_accum)
    val_batches = Batches(shards_dir, "val", t.batch_size, context, packing=d.packing, seed=t.seed,
                          segments_per_document=d.segments_per_document).fixed(t.eval_batches)
    warning = schedules.fit_warmup(config, steps)  # as lmlab train: a warm-up longer than the run is capped
    if warning:
        log(warning)
    tokens_per_step = t.batch_size * t.grad_accum * context
    schedule, progress = schedules.for_run(config, steps, tokens_per_step)
    ref = Reference(config, architecture, device, precision, tokenizer, shards_dir, source, model, steps,
                    tokens_per_step, Curriculum(config, shards_dir, train_batches), val_batches, schedule, progress,
                    plain_adamw(model, config.optim), grad_scaler(precision, device))
    ref.baseline = unigram_loss(train_batches, val_batches)
    ref.val_tokens, ref.val_bytes = bpb.count_targets(val_batches, bpb.token_byte_lengths(tokenizer))
    return ref


def plain_adamw(model, optim_cfg):
    """torch's AdamW, default implementation: weight decay on matrices (dim >= 2) only, as lmlab decays."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim_cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps)


def _open_run_dir(ref, wall_start, log):
    """The run directory: config.toml, tokenizer, env.json, metrics.jsonl; train.evals ready."""
    config = ref.config
    ref.run_dir = rundir.new_run_dir(config)
    rundir.save_config(ref.run_dir, config)
    ref.tokenizer.save(ref.run_dir)
    write_env(ref.run_dir, device=ref.device, precision=ref.precision, reference=ref.architecture,
              optimizer=OPTIMIZER)
    ref.metrics = MetricsLog(ref.run_dir / "metrics.jsonl", started=wall_start)
    ref.evals = TrainingEvals(config, ref.tokenizer, ref.shards_dir, ref.device, ref.precision)
    log(f"reference run {ref.run_dir}: {ref.architecture} in a plain loop, {OPTIMIZER}; device {ref.device} "
        f"{ref.precision}; {ref.steps} steps x {ref.tokens_per_step:,} tokens")
    log(ref.source.summary())
    log(f"unigram baseline (no context) on the validation subset: {ref.baseline:.4f}")


def _loop(ref, log):
    """Step after step: train, log every train.log_every steps, evaluate every train.eval_every; the final state."""
    t, state = ref.config.train, TrainState()
    window_tokens, window_s = 0, 0.0
    for step in range(ref.steps):
        started = time.perf_counter()
        loss, grad_norm, lr, finite = train_step(ref, step, state.elapsed_s)
        if not finite:
            state.status = DIVERGED
            log(f"step {step + 1}: non-finite loss or gradients ({loss}, grad norm {grad_norm}); the run stops "
                "before that update (status diverged)")
            break
        took = time.perf_counter() - started
        state.elapsed_s += took
        window_tokens, window_s = window_tokens + ref.tokens_per_step, window_s + took
        state.at_step(step + 1, ref.tokens_per_step)
        state.loss = loss
        done = state.step
        if done % t.log_every == 0 or done == 1 or done == ref.steps:
            ref.metrics.write(**state.where(), lr=lr, loss=loss, grad_norm=grad_norm,
                              tokens_per_s=round(window_tokens / max(window_s, 1e-9), 1))
            window_tokens, window_s = 0, 0.0
        if t.eval_every and done % t.eval_every == 0 and done != ref.steps and evaluate_and_record(ref, state, log):
            break  # train.target_val_loss reached
    return state


def train_step(ref, step, elapsed_s):
    """One optimizer step: (loss, gradient norm, lr, finite); a non-finite step makes no update."""
    progress = ref.progress(step, elapsed_s)
    lr = ref.schedule.lr(step, progress)
    for group in ref.optimizer.param_groups:
        group["lr"] = lr
    batches = ref.curriculum.at(progress)
    accum = ref.config.train.grad_accum
    total = 0.0
    for micro in range(accum):
        x, y = batches.get(step, micro)[:2]
        loss = _loss(ref, x, y) / accum  # the mean over the global batch, as lmlab's step takes it
        ref.scaler.scale(loss).backward()
        total += loss.item()
    ref.scaler.unscale_(ref.optimizer)
    clip = ref.config.optim.grad_clip or math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(ref.model.parameters(), clip))
    finite = math.isfinite(total) and (math.isfinite(grad_norm) or ref.precision == "fp16")  # fp16: the scaler skips
    if finite:
        ref.scaler.step(ref.optimizer)
        ref.scaler.update()
    ref.optimizer.zero_grad(set_to_none=True)
    return total, grad_norm, lr, finite


def _loss(ref, x, y, reduction="mean"):
    """Cross-entropy of transformers' logits for targets y (-100 ignored), in fp32."""
    with autocast(ref.precision, ref.device):
        logits = ref.model(input_ids=x.to(ref.device)).logits
    return F.cross_entropy(logits.float().flatten(0, 1), y.to(ref.device).flatten(), ignore_index=IGNORE,
                           reduction=reduction)


@torch.no_grad()
def validation_loss(ref):
    """Mean loss per target over the fixed validation subset (lmlab's), computed by transformers' model."""
    ref.model.eval()
    total, count = 0.0, 0
    for batch in ref.val_batches:
        x, y = batch[:2]
        total += _loss(ref, x, y, reduction="sum").item()
        count += int((y != IGNORE).sum())
    ref.model.train()
    return total / max(count, 1)


def evaluate_and_record(ref, state, log):
    """Validation loss (and train.evals when due) into metrics.jsonl; True when train.target_val_loss is reached."""
    state.val_loss = validation_loss(ref)
    state.best_val = min(state.best_val, state.val_loss)
    ref.last_eval = state.step
    ref.metrics.write(**state.where(), val_loss=state.val_loss, val_ppl=math.exp(min(state.val_loss, 50)),
                      val_bpb=bpb.bits_per_byte(state.val_loss, ref.val_tokens, ref.val_bytes))
    if ref.evals.due(state.step, ref.steps):
        context = ref.config.model.context_length
        probed = LogitsModel(ref.model, ref.config.model.vocab_size, context)
        ref.metrics.write(**state.where(), **ref.evals.run(probed))
    ref.schedule.observe_val_loss(state.val_loss)  # the plateau schedule reacts to its own run's loss
    log(f"step {state.step}/{ref.steps}  loss {state.loss:.4f}  val_loss {state.val_loss:.4f}  "
        f"{state.elapsed_s:.0f}s")
    target = ref.config.train.target_val_loss
    if target and state.val_loss <= target:
        state.status = TARGET_REACHED
        log(f"validation loss {state.val_loss:.4f} <= train.target_val_loss={target:g} at step {state.step}")
        return True
    return False


def _finish(ref, state, log):
    """Final evaluation, model.safetensors (lmlab's names), summary.json and the loss plot; the run directory."""
    if state.status != DIVERGED and state.step > 0 and ref.last_eval != state.step:
        evaluate_and_record(ref, state, log)
    ref.metrics.close()
    hf_names = ref.model.state_dict()
    state_dict = {name.removeprefix("model."): tensor for name, tensor in hf_names.items()
                  if "rotary_emb" not in name}
    ref.source.load_state_dict(weights.to_load(ref.source, state_dict))
    rundir.save_weights(ref.source, ref.run_dir)
    write_summary(ref.run_dir, _summary(ref, state))
    plot_loss(ref.run_dir)
    log(f"{state.status}: {state.step} steps, val_loss {state.val_loss:.4f}, {state.elapsed_s:.0f}s training "
        f"-> {ref.run_dir}")
    return ref.run_dir


def _summary(ref, state):
    """summary.json, with the keys of lmlab train's (so runs / compare / report read it) and what trained."""
    return {
        "status": state.status, "steps": state.step, "tokens": state.tokens, "elapsed_s": round(state.elapsed_s, 3),
        "final_val_loss": state.val_loss, "best_val_loss": state.best_val if math.isfinite(state.best_val) else None,
        "final_train_loss": state.loss, "unigram_val_loss": ref.baseline, "params": ref.source.num_params(),
        "non_embedding_params": ref.source.num_params(non_embedding=True),
        "architecture": f"{ref.architecture}: {ref.source.summary()}", "device": str(ref.device),
        "precision": ref.precision, "tokenizer": ref.tokenizer.fingerprint, "parallel": "none", "world_size": 1,
        "reference": {"implementation": ref.architecture, "optimizer": OPTIMIZER, "loop": "lmlab bench reference"},
    }
