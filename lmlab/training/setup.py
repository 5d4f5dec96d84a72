"""Setting up a run: everything the loop needs, built once, before the first step.

    setup(config, log, parallel) -> (Run, TrainState)

Design choices:
- `setup` is a short list of the parts a run is made of, each built by one
  small function: device, data, model and batches, run directory, optimizer,
  bookkeeping, then the counters, fresh or from a checkpoint. `Run` holds the
  parts, which do not change once built. The counters change every step and
  live in TrainState (state.py), so the loop's moving state can be seen in
  one place.
- The order matters, and is kept on purpose. Every check (config, resume,
  data) runs before the run directory is written, so a refused run leaves
  nothing behind. A new model is initialised right after
  `torch.manual_seed(train.seed)` (build_model), before anything else draws
  random numbers, so the same seed gives the same weights. The optimizer is
  built after the model is sharded, because under FSDP it holds only this
  rank's shard. A resumed run builds its model from the checkpoint's config,
  and `Resumed.restore` puts the weights back once the optimizer exists.
- Data order is a function of (seed, step, micro-batch, rank) (data/batches.py).
  Validation uses a fixed subset of the validation split: the same windows
  for every run with the same data and shape, so runs compare. Each rank
  evaluates its own share of that subset.
- The first log lines say what is being trained: the run directory, device,
  precision, budget, the model, and the unigram baseline (the loss of a
  model with no context), so a number can be judged as soon as it is printed.
"""

import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from lmlab.config import absolute_inputs, total_steps
from lmlab.data.batches import Batches, unigram_loss
from lmlab.data.corpora import ensure_data
from lmlab.data.curriculum import Curriculum
from lmlab.device import grad_scaler, resolve_device, resolve_precision
from lmlab.errors import LmlabError
from lmlab.evals import bpb
from lmlab.evals.training import TrainingEvals
from lmlab.model.transformer import Transformer
from lmlab.rundir import run as rundir
from lmlab.rundir.env import write_env
from lmlab.rundir.metrics import MetricsLog, NoMetrics
from lmlab.rundir.sinks import StatusLine, open_sinks
from lmlab.training import checkpoint, diskspace, perf, resume, schedules
from lmlab.training.fastpaths import fuse_for_training, prepare_model
from lmlab.training.faults import NonFiniteGuard
from lmlab.training.memories import Memories
from lmlab.training.norms import NormProbe
from lmlab.training.optim import build_optimizer
from lmlab.training.state import TrainState
from lmlab.training.stops import StopRules


@dataclass
class Run:
    """The parts of a run, built by `setup`. They do not change once built; the counters are in TrainState."""

    config: Any
    log: Any  # print for rank 0, silent for the other ranks
    parallel: Any  # everything that depends on the world size (distributed.py)
    wall_start: float  # time.perf_counter() when setup began: wall_s counts from here
    # where it runs
    device: Any = None
    precision: str = ""
    local_accum: int = 1  # micro-batches per step on this rank; the global batch is train.grad_accum
    # data and model
    tokenizer: Any = None
    shards_dir: Any = None
    model: Any = None  # the plain module: weights, norms, checkpoints, samples
    steps: int | None = None  # the step budget; None when only train.max_time bounds the run
    tokens_per_step: int = 0  # over all ranks
    val_batches: Any = None  # this rank's share of the fixed validation subset
    curriculum: Any = None  # the training batches at a point of the run: curriculum.at(progress)
    schedule: Any = None  # lr = schedule.lr(step, progress)
    run_progress: Any = None  # progress = run_progress(step, elapsed_s), the share of the budget used
    stops: Any = None  # stop rules: max_time, target_val_loss, divergence
    baseline: float = 0.0  # unigram loss on the validation subset
    val_tokens: int = 0  # for val_bpb
    val_bytes: int = 0
    flops_per_token: float = 0.0  # for MFU
    peak_flops: float = 0.0
    peak_flops_source: str = ""
    run_dir: Any = None
    # optimization
    forward_model: Any = None  # the model as the step runs it: wrapped in DDP, or sharded in place (FSDP)
    step_fn: Any = None  # loss = step_fn(x, targets=y): the fast paths (compile, chunked loss) around forward_model
    optimizer: Any = None
    scaler: Any = None  # fp16's grad scaler; a no-op otherwise
    # bookkeeping
    metrics: Any = None  # metrics.jsonl and its sinks (rank 0), or NoMetrics
    norm_probe: Any = None
    train_evals: Any = None  # train.evals: probes / multiple choice during training; off by default
    checkpoints: Any = None  # when to save, and saving that warns instead of failing
    guard: Any = None  # NaN/inf loss or gradients: stop, or skip the batch
    stateful: dict | None = None  # the objects whose state_dict() goes into checkpoints
    memories: Any = None  # model.memory: this rank's Transformer-XL memories (memories.py); None without
    progress: Any = None  # the tqdm bar (disabled without a terminal)
    plain_log: bool = False  # no terminal: evaluation lines go to the log, and a status line every print_every


def setup(config, log, parallel):
    """(Run, TrainState) for `config`: every part built and checked, the counters fresh or resumed."""
    run = Run(config, log, parallel, wall_start=time.perf_counter())
    _place(run)
    resumed = _resume_and_data(run)
    train_batches = _model_and_data(run, resumed)
    if run.parallel.is_main:  # room for the checkpoints and final weights, before anything is written
        diskspace.check(run.model, config, resumed.run_dir if resumed else None)
    _open_run_dir(run, resumed)
    _log_start(run)
    _optimization(run)
    _bookkeeping(run, train_batches)
    state = _restore_or_start(run, resumed)
    _progress_bar(run, state)
    return run, state


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
    config.model = m.resolved()  # written back: the saved config.toml holds the numbers used
    torch.manual_seed(config.train.seed)
    return Transformer(config.model)


def _place(run):
    """Threads, device and precision. Under torchrun the device is cuda:LOCAL_RANK and the process group starts."""
    t = run.config.train
    if t.threads:
        torch.set_num_threads(t.threads)
    run.local_accum = run.parallel.local_accum(t.grad_accum)  # the global batch stays fixed whatever the ranks
    run.device = run.parallel.device(resolve_device(t.device))
    run.precision = resolve_precision(t.precision, run.device)


def _resume_and_data(run):
    """The run to resume (None for a new one; its name and folder checked), before any data work; then the data.

    A resumed run must read the data it was trained on: that is checked here too, still before any write.
    """
    config = absolute_inputs(run.config)  # config.toml works from any folder (config.absolute_inputs)
    if config.model.init_from and not config.data.tokenizer:
        config.data.tokenizer = config.model.init_from  # a pretrained model reads with its own tokenizer
    resumed = resume.prepare(config, log=run.log)
    if not resumed and run.parallel.is_main:
        rundir.check_new_run_dir(config)  # a name taken or a folder not writable: said before the data is built
    with run.parallel.local_main_first():  # one process per machine builds the tokenizer and shards
        run.tokenizer, run.shards_dir = ensure_data(config.data, log=run.log)
    if resumed:
        resumed.check_data(run.shards_dir)
    return resumed


def _model_and_data(run, resumed):
    """The model, the batches, the LR schedule and stop rules, and the numbers that judge them; returns the train batches."""
    config, t = run.config, run.config.train
    run.model = (Transformer(config.model) if resumed and resumed.checkpoint
                 else build_model(config, run.tokenizer)).to(run.device)
    run.steps = total_steps(config)
    run.tokens_per_step = t.batch_size * t.grad_accum * config.model.context_length
    train_batches, all_val = _batches(run)
    run.curriculum = Curriculum(config, run.shards_dir, train_batches)  # train_batches itself unless context_schedule
    if not resumed:  # a resumed run keeps the warm-up it started with
        warning = schedules.fit_warmup(config, run.steps)  # before config.toml is written: it holds the value used
        if warning:
            run.log(warning)
    run.schedule, run.run_progress = schedules.for_run(config, run.steps, run.tokens_per_step)
    run.stops = StopRules(t, run.tokens_per_step)
    run.baseline = unigram_loss(train_batches, all_val)
    run.val_tokens, run.val_bytes = bpb.count_targets(all_val, bpb.token_byte_lengths(run.tokenizer))
    run.flops_per_token = run.model.flops_per_token()
    run.peak_flops, run.peak_flops_source = perf.peak_flops(run.device, run.precision, t.peak_tflops)  # per device
    return train_batches


def _batches(run):
    """(train batches, the whole fixed validation subset); run.val_batches gets this rank's share of the subset."""
    t, context = run.config.train, run.config.model.context_length
    pinned = run.device.type == "cuda"  # page-locked batches: the copy to the GPU overlaps the step
    d = run.config.data
    train_batches = Batches(run.shards_dir, "train", t.batch_size, context, packing=d.packing, seed=t.seed,
                            pin_memory=pinned, segments_per_document=d.segments_per_document,
                            streams=t.batch_size * t.grad_accum)
    all_val = Batches(run.shards_dir, "val", t.batch_size, context, packing=d.packing, seed=t.seed,
                      pin_memory=pinned, segments_per_document=d.segments_per_document).fixed(t.eval_batches)
    run.val_batches = all_val.for_rank(run.parallel.rank, run.parallel.world_size)
    if d.packing == "stream" and train_batches.stream.longest() <= 1:
        run.log(f"warning: no training document is longer than one segment of model.context_length={context} "
                "tokens: data.packing = stream adds nothing over document packing (and model.memory has nothing "
                "to carry)")
    return train_batches, all_val


def _open_run_dir(run, resumed):
    """The run directory (new, or the resumed one) on every rank; rank 0 writes config.toml, the tokenizer, env.json."""
    parallel, t = run.parallel, run.config.train
    run_dir = resumed.run_dir if resumed else (rundir.new_run_dir(run.config) if parallel.is_main else None)
    run.run_dir = parallel.broadcast(run_dir)
    t.run_name, t.runs_dir = run.run_dir.name, str(run.run_dir.parent)
    if parallel.is_main:
        rundir.save_config(run.run_dir, run.config)
        run.tokenizer.save(run.run_dir)
        write_env(run.run_dir, device=run.device, precision=run.precision, peak_flops=run.peak_flops,
                  peak_flops_source=run.peak_flops_source, flops_per_token=run.flops_per_token,
                  parallel=parallel.mode, world_size=parallel.world_size)


def _log_start(run):
    """What is being trained, on what, for how long; the model; the baseline a loss should beat."""
    t, parallel = run.config.train, run.parallel
    run.log(f"run {run.run_dir}  device {run.device} {run.precision}  {run.steps or 'time-bounded'} steps x "
            f"{run.tokens_per_step:,} tokens"
            + (f"  (at most {t.max_time:g}s of training)" if t.max_time else "")
            + (f"  {parallel.mode} over {parallel.world_size} processes" if parallel.active else ""))
    run.log(run.model.summary())
    run.log(f"unigram baseline (no context) on the validation subset: {run.baseline:.4f}")


def _optimization(run):
    """The model wrapped for data parallelism, the optimizer (after sharding), the grad scaler, the fast paths."""
    fuse_for_training(run.model, run.config, run.parallel.mode)  # before DDP / the optimizer see the parameters
    run.forward_model = run.parallel.wrap(run.model)
    run.optimizer = build_optimizer(run.model, run.config.optim, run.device)
    run.scaler = grad_scaler(run.precision, run.device)
    run.step_fn = prepare_model(run.forward_model, run.config, run.device, run.precision)


def _bookkeeping(run, train_batches):
    """metrics.jsonl, the norm probe, training evals, checkpoints and the non-finite guard."""
    config, t = run.config, run.config.train
    run.metrics = (MetricsLog(run.run_dir / "metrics.jsonl", sinks=open_sinks(config, run.run_dir),
                              started=run.wall_start)
                   if run.parallel.is_main else NoMetrics(started=run.wall_start))
    run.norm_probe = NormProbe(run.model, t.norms_every)
    run.train_evals = TrainingEvals(config, run.tokenizer, run.shards_dir, run.device, run.precision)
    run.checkpoints = checkpoint.Checkpointer(run.run_dir, config, train_batches.meta, run.log)
    run.guard = NonFiniteGuard(t.on_nonfinite, run.metrics, run.log)
    run.stateful = {"schedule": run.schedule, "stops": run.stops, "nonfinite": run.guard}
    if config.model.memory:  # carried from step to step and saved in checkpoints
        run.memories = Memories(run.model, t.batch_size, run.local_accum, run.parallel, run.device)
        run.stateful["memory"] = run.memories


def _restore_or_start(run, resumed):
    """The counters to start from. Resuming also restores the weights, optimizer, RNGs and stateful objects.

    It cuts metrics.jsonl back to the checkpoint, too.
    """
    if not resumed:
        return TrainState()
    return resumed.restore(run.model, run.optimizer, run.scaler, run.metrics, run.checkpoints, run.stateful,
                           log=run.log, parallel=run.parallel)


def _progress_bar(run, state):
    """A tqdm bar on a terminal (rank 0). Without one, a compact status line every train.print_every steps."""
    run.progress = tqdm(total=run.steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr, disable=None if run.parallel.is_main else True)
    run.plain_log = run.progress.disable
    if run.plain_log:
        run.metrics.sinks.append(StatusLine(run.log, run.steps, run.config.train.print_every))
