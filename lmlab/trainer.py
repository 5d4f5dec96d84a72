"""The training loop: data -> model -> AdamW, with evaluation, logging and a run directory.

Design choices:
- One function, `train(config)`, readable top to bottom; the CLI only parses.
- Data order is a function of (seed, step, micro-batch), so two runs with the
  same config and seed see the same batches and produce the same losses.
- Validation uses a fixed subset of the validation split (the same windows for
  every run with the same data and shape) so that runs compare.
- `elapsed_s` counts training time only; evaluation, sampling and saving are
  excluded so that time-based curves compare across eval frequencies.
- The loop synchronises with the device only at logging steps (`.item()`).
"""

import functools
import math
import sys
import time

import torch
from tqdm import tqdm

from lmlab import atomic, run as rundir
from lmlab.config import resolve_d_ff, total_steps, validate
from lmlab.corpora import ensure_data
from lmlab.data import Batches, unigram_loss
from lmlab.device import autocast, grad_scaler, resolve_device, resolve_precision
from lmlab.errors import LmlabError
from lmlab.sampling import generate
from lmlab.model import Transformer, lm_loss
from lmlab.optim import build_optimizer, lr_at, set_lr
from lmlab.report import plot_loss
from lmlab.track import MetricsLog, write_summary


def build_model(config, tokenizer):
    """A fresh model (vocab and d_ff filled in from the tokenizer and defaults), or one from model.init_from.

    With model.init_from, the architecture and weights come from the Hugging Face
    folder; model.context_length and model.dropout stay as configured (training choices).
    """
    m = config.model
    if m.init_from:
        from lmlab.export import load_hf_model

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
def evaluate(model, batches, precision, device):
    """Mean validation loss over the fixed validation subset."""
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(precision, device):
            logits = model(x)
        n = int((y != -100).sum())
        total += lm_loss(logits, y).item() * n
        count += n
    model.train()
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


def train(config, log=functools.partial(print, flush=True)):
    """Train a model as `config` says; returns the run directory."""
    validate(config)
    t, o = config.train, config.optim
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    precision = resolve_precision(t.precision, device)
    if config.model.init_from and not config.data.tokenizer:
        config.data.tokenizer = config.model.init_from  # a pretrained model reads with its own tokenizer
    tokenizer, shards_dir = ensure_data(config.data, log=log)
    model = build_model(config, tokenizer).to(device)
    steps = total_steps(config)
    tokens_per_step = t.batch_size * t.grad_accum * config.model.context_length

    train_batches = Batches(shards_dir, "train", t.batch_size, config.model.context_length,
                            packing=config.data.packing, seed=t.seed)
    val_batches = Batches(shards_dir, "val", t.batch_size, config.model.context_length,
                          packing=config.data.packing, seed=t.seed).fixed(t.eval_batches)

    baseline = unigram_loss(train_batches, val_batches)

    run_dir = rundir.new_run_dir(config)
    rundir.save_config(run_dir, config)
    tokenizer.save(run_dir)
    log(f"run {run_dir}  device {device} {precision}  {steps} steps x {tokens_per_step:,} tokens")
    log(model.summary())
    log(f"unigram baseline (no context) on the validation subset: {baseline:.4f}")

    optimizer = build_optimizer(model, o, device)
    scaler = grad_scaler(precision, device)
    step_fn = torch.compile(model) if t.compile else model
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    status, best_val, val_loss, loss_value = "completed", math.inf, math.nan, math.nan
    elapsed, step = 0.0, 0
    progress = tqdm(total=steps, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr,
                    disable=None)
    plain_log = progress.disable  # no terminal: print a compact line at evaluations instead

    def run_eval(step_done):
        nonlocal best_val, val_loss
        val_loss = evaluate(step_fn, val_batches, precision, device)
        best_val = min(best_val, val_loss)
        metrics.write(step=step_done, tokens=step_done * tokens_per_step, elapsed_s=round(elapsed, 3),
                      val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
        line = f"step {step_done}/{steps}  loss {loss_value:.4f}  val_loss {val_loss:.4f}  {elapsed:.0f}s"
        (log if plain_log else progress.write)(line)

    try:
        window_start, window_tokens = time.perf_counter(), 0
        for step in range(steps):
            started = time.perf_counter()
            lr = lr_at(step, o, steps)
            set_lr(optimizer, lr)
            loss_sum = torch.zeros((), device=device)
            for micro in range(t.grad_accum):
                x, y = train_batches.get(step, micro)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast(precision, device):
                    logits = step_fn(x)
                loss = lm_loss(logits, y) / t.grad_accum
                scaler.scale(loss).backward()
                loss_sum += loss.detach()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip or math.inf)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            elapsed += time.perf_counter() - started
            window_tokens += tokens_per_step
            done = step + 1

            if done % t.log_every == 0 or done == steps or done == 1:
                loss_value = loss_sum.item()
                now = time.perf_counter()
                tokens_per_s = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0
                metrics.write(step=done, tokens=done * tokens_per_step, elapsed_s=round(elapsed, 3), lr=lr,
                              loss=loss_value, grad_norm=float(grad_norm), tokens_per_s=round(tokens_per_s, 1))
                progress.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                if not math.isfinite(loss_value):
                    status = "diverged"
                    log(f"loss is {loss_value} at step {done}: stopping (status diverged)")
                    break
            progress.update(1)
            if t.eval_every and done % t.eval_every == 0 and done != steps:
                eval_start = time.perf_counter()
                run_eval(done)
                window_start += time.perf_counter() - eval_start  # keep eval out of tokens/s
        else:
            done = steps
    except KeyboardInterrupt:
        status = "interrupted"
        done = step
        log(f"interrupted at step {done}")
    finally:
        progress.close()

    if status != "diverged" and done > 0:
        run_eval(done)
    metrics.close()
    rundir.save_weights(model, run_dir)
    write_summary(run_dir, {
        "status": status, "steps": done, "tokens": done * tokens_per_step, "elapsed_s": round(elapsed, 3),
        "final_val_loss": val_loss, "best_val_loss": best_val if math.isfinite(best_val) else None,
        "final_train_loss": loss_value, "unigram_val_loss": baseline, "params": model.num_params(),
        "non_embedding_params": model.num_params(non_embedding=True),
        "architecture": model.summary(), "device": str(device), "precision": precision, "tokenizer": tokenizer.fingerprint,
    })
    plot_loss(run_dir)
    if status == "completed":
        model.eval()
        for part in write_samples(run_dir, model, tokenizer, config)[2:]:
            log(part.rstrip())
    log(f"{status}: {done} steps, val_loss {val_loss:.4f}, {elapsed:.0f}s training -> {run_dir}")
    return run_dir
