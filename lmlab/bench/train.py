"""Training step: lmlab next to transformers' LlamaForCausalLM and GPT2LMHeadModel, same shape, weights and batch.

    section = training_step()                 # the default ladder, fp32 on CPU
    print(section.markdown())

Design choices:
- The reference is built from lmlab's own exporter (`hf_config`,
  `hf_state_dict`), so both models hold the same weights; for a shape with
  lmlab's GPT-2 switches it is GPT2LMHeadModel, nanoGPT's architecture, with
  the weights mapped by `lmlab.bench.gpt2`; before anything is
  timed the first-step losses must agree (1e-4 relative in fp32), else this
  is an LmlabError: a ratio of two different computations means nothing.
- A step is what the trainer does per micro-batch, minus data loading and
  gradient clipping: forward with the loss, backward, AdamW step,
  zero_grad(set_to_none). lmlab goes through `prepare_model` and
  `build_optimizer` with default switches (sdpa attention, chunked loss), as
  `lmlab train` would; transformers through its own loss path, with
  `shift_labels=targets`, so that its ForCausalLMLoss sees exactly lmlab's
  targets (its internal shift would drop the last position of every row),
  and torch's AdamW with lmlab's parameter groups, hyper-parameters and fused
  setting. The learning rate stays at optim.lr: a schedule costs nothing.
- Timing is in turns (`common.time_side_by_side`); the checked first step
  is each candidate's first warm-up step. Peak memory is measured after
  timing, with each candidate alone and the other freed: fresh model,
  optimizer and a few steps inside `common.peak_memory`. After, because the
  process's first training step pays one-off costs (thread pools, lazy
  imports, ~90 MiB of RSS here) that would be charged to whoever came first.
- The ladder is sized for a 2-core CPU (a couple of minutes in all); a GPU
  user passes bigger shapes (dicts of ModelConfig fields, or ModelConfigs).
"""

import gc
import math

import torch

from lmlab.training import perf
from lmlab.bench import common
from lmlab.bench.gpt2 import ARCHITECTURE as GPT2, gpt2_model, gpt2_shape, gpt2_state_dict, is_gpt2
from lmlab.bench.common import Section, peak_memory, return_freed_memory, sync, time_side_by_side, transformers_model
from lmlab.config import Config, TrainConfig, validate
from lmlab.device import autocast, grad_scaler, resolve_device, resolve_precision
from lmlab.errors import LmlabError
from lmlab.model.hf import hf_architecture, hf_state_dict
from lmlab.training.fastpaths import prepare_model
from lmlab.model.transformer import Transformer
from lmlab.training.optim import build_optimizer, param_groups

QUICKSTART = dict(d_model=128, n_layers=4, n_heads=4, context_length=128, vocab_size=2048)  # configs/cpu-quickstart.toml
D256 = dict(d_model=256, n_layers=4, n_heads=4, context_length=256, vocab_size=2048)
LADDER = (
    QUICKSTART,
    D256,
    dict(d_model=384, n_layers=6, n_heads=6, context_length=512, vocab_size=4096),
    gpt2_shape(QUICKSTART),  # against GPT2LMHeadModel (nanoGPT's model.py)
    gpt2_shape(D256),
)
MEMORY_STEPS = 2  # steps inside the memory measurement: the first allocates AdamW's state, the second runs with it
LOSS_RTOL = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2}  # first-step loss agreement required before timing
SEED = 0


def training_step(shapes=LADDER, device="cpu", precision="fp32", batch_size=8, steps=5, warmup=1,
                  compile=False, reference=True, log=print):
    """Tokens/s, MFU and peak memory of a training step of lmlab and of transformers, shape by shape."""
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    return_freed_memory()  # before the timed steps too, so that what they free leaves the resident set
    why_alone = None if reference else "reference=False"
    if reference and _transformers() is None:
        why_alone = "transformers is not installed (pip install transformers)"
    if not shapes:
        raise LmlabError("training_step needs at least one shape (a dict of ModelConfig fields or a ModelConfig)")
    if steps < 1:
        raise LmlabError(f"steps must be at least 1 (timed steps per candidate), got {steps}")
    warmup = max(warmup, 1)  # the first step, whose losses are checked, is always a warm-up step
    peak, peak_source = perf.peak_flops(device, precision)
    rows, fused = [], None
    for shape in shapes:
        config = bench_config(shape, batch_size, precision, compile)
        if why_alone is None:
            reference_class(config.model)  # a shape with no reference class is an LmlabError before any work
        row, fused = measure_shape(config, device, precision, steps, warmup, peak, why_alone is None)
        rows.append(row)
        log(_progress(row))
    return Section(
        title=f"Training step: lmlab vs transformers ({device.type}, {precision}, batch {batch_size})"
        if why_alone is None else f"Training step: lmlab ({device.type}, {precision}, batch {batch_size})",
        rows=rows, columns=_columns(why_alone is None),
        notes=_notes(rows, device, precision, batch_size, steps, warmup, compile, peak, peak_source, fused,
                     why_alone),
    )


# --- one shape ----------------------------------------------------------------------


def bench_config(shape, batch_size=8, precision="fp32", compile=False):
    """A lmlab Config for one shape (a dict of ModelConfig fields or a ModelConfig), d_ff and vocab resolved."""
    model = common.model_config(shape)
    config = Config(model=model, train=TrainConfig(batch_size=batch_size, precision=precision, compile=compile))
    validate(config)
    if model.dropout:
        raise LmlabError(f"benchmark shape {shape_name(model)}: model.dropout={model.dropout} makes every step "
                         "random; use model.dropout=0 to compare steps")
    return config


def measure_shape(config, device, precision, steps, warmup, peak, reference):
    """(row of the table, AdamW's fused setting) for one shape."""
    m = config.model
    x, y = random_batch(m, config.train.batch_size, device)
    torch.manual_seed(SEED)
    source = Transformer(m)
    weights = {name: t.detach().clone() for name, t in source.state_dict().items()}
    flops_per_token, params = source.flops_per_token(), source.num_params()
    hf_weights = reference_weights(source) if reference else None
    del source
    fused = lmlab_fused(config, device)
    builders = {"lmlab": lambda: build_lmlab(config, x, y, device, precision, weights)}
    if reference:
        builders["transformers"] = lambda: build_transformers(config, x, y, device, precision, hf_weights, fused)

    candidates = {name: build() for name, build in builders.items()}
    first_loss = {name: step().item() for name, step in candidates.items()}  # also the first warm-up step
    rel_diff = check_same_loss(first_loss, precision) if reference else None
    seconds = time_side_by_side(candidates, repeats=steps, warmup=warmup - 1, device=device)
    del candidates
    mib = {name: step_peak(build, device, MEMORY_STEPS)[0] for name, build in builders.items()}

    tokens = config.train.batch_size * m.context_length
    tok_s = {name: tokens / s for name, s in seconds.items()}
    row = {"shape": shape_name(m), "params": params, "tokens": tokens,
           "lmlab_tok_s": tok_s["lmlab"], "lmlab_mfu": perf.mfu(tok_s["lmlab"], flops_per_token, peak),
           "lmlab_mib": mib["lmlab"], "loss": first_loss["lmlab"]}
    if reference:
        row.update(hf_tok_s=tok_s["transformers"], speed_ratio=tok_s["lmlab"] / tok_s["transformers"],
                   hf_mfu=perf.mfu(tok_s["transformers"], flops_per_token, peak), hf_mib=mib["transformers"],
                   memory_ratio=_ratio(mib["lmlab"], mib["transformers"]), loss_rel_diff=rel_diff,
                   reference=reference_class(m))
    return row, fused


def random_batch(model_config, batch_size, device, seed=SEED):
    """(x, y): uniform random tokens and their next tokens, from a fixed seed; contiguous, as HF's loss views them."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model_config.vocab_size, (batch_size, model_config.context_length + 1), generator=g)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def step_peak(build, device, n_steps):
    """(peak MiB, first loss) of building a candidate and running n_steps of it, nothing else alive."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # peak_memory itself collects garbage first
    with peak_memory(device) as peak:
        step = build()
        first = step()
        for _ in range(n_steps - 1):
            step()
        sync(device)
    first = first.item()
    del step
    _free(device)
    return peak.mib, first


def check_same_loss(first_loss, precision):
    """Relative difference of the first-step losses; an LmlabError when it exceeds LOSS_RTOL[precision]."""
    ours, theirs = first_loss["lmlab"], first_loss["transformers"]
    rel_diff = abs(ours - theirs) / max(abs(theirs), 1e-12)
    if not math.isfinite(ours) or not math.isfinite(theirs) or rel_diff > LOSS_RTOL[precision]:
        raise LmlabError(f"lmlab and transformers disagree on the first step's loss ({ours:.6g} vs {theirs:.6g}, "
                         f"relative difference {rel_diff:.2g} > {LOSS_RTOL[precision]:g} in {precision}): "
                         "they are not computing the same step, so their timings cannot be compared")
    return rel_diff


# --- the two candidates -------------------------------------------------------------


def _train_step(loss_fn, optimizer, scaler):
    """A zero-argument training step around loss_fn; returns the loss (detached, not synced)."""

    def step():
        loss = loss_fn()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def build_lmlab(config, x, y, device, precision, weights=None):
    """lmlab's step as `lmlab train` runs it: prepare_model + build_optimizer. step.model is the Transformer."""
    if weights is None:
        torch.manual_seed(SEED)
    model = Transformer(config.model)
    if weights is not None:
        model.load_state_dict(weights)
    model.to(device).train()
    step_fn = prepare_model(model, config, device, precision)
    optimizer = build_optimizer(model, config.optim, device)
    step = _train_step(lambda: step_fn(x, targets=y), optimizer, grad_scaler(precision, device))
    step.model = model
    return step


def reference_class(model_config):
    """The transformers class the shape is timed against: GPT2LMHeadModel for the GPT-2 switches, else Llama / Qwen3."""
    return GPT2 if is_gpt2(model_config) else hf_architecture(model_config)


def reference_weights(source):
    """The Transformer's weights under the reference class's names (and layouts)."""
    if is_gpt2(source.config):
        return gpt2_state_dict(source.state_dict(), source.config.n_layers)
    return {name: t.clone() for name, t in hf_state_dict(source).items()}


def build_transformers(config, x, y, device, precision, hf_weights, fused):
    """transformers' step on the same weights: its model and loss, torch AdamW like lmlab's; step.model is its model."""
    if is_gpt2(config.model):
        model = gpt2_model(config.model, hf_weights, device)
    else:
        model = transformers_model(config.model, hf_weights, device)
    model.to(device).train()
    forward = torch.compile(model) if config.train.compile else model
    o = config.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=o.eps, fused=fused)

    def loss_fn():
        with autocast(precision, device):
            return forward(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss

    step = _train_step(loss_fn, optimizer, grad_scaler(precision, device))
    step.model = model
    return step


def lmlab_fused(config, device):
    """The `fused=` lmlab's build_optimizer passes to AdamW here (asked of it on a one-weight model)."""
    return build_optimizer(torch.nn.Linear(2, 2, bias=False).to(device), config.optim, device).defaults["fused"]


# --- helpers ------------------------------------------------------------------------


def shape_name(m):
    name = f"d{m.d_model} {m.n_layers}L h{m.n_heads} ctx{m.context_length} v{m.vocab_size}"
    return name + " gpt2" if is_gpt2(m) else name


def _transformers():
    try:
        import transformers
    except ImportError:
        return None
    return transformers


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _ratio(a, b):
    return a / b if a is not None and b else None


def _progress(row):
    line = f"{row['shape']}: lmlab {row['lmlab_tok_s']:,.0f} tok/s"
    if "hf_tok_s" in row:
        line += f", transformers {row['hf_tok_s']:,.0f} tok/s (x{row['speed_ratio']:.2f})"
    return line


def _columns(reference):
    columns = [("shape", "shape"), ("params", "params"), ("tokens", "tokens/step"),
               ("lmlab_tok_s", "lmlab tok/s")]
    if reference:
        columns += [("hf_tok_s", "transformers tok/s"), ("speed_ratio", "speed ratio")]
    columns += [("lmlab_mfu", "lmlab MFU")]
    if reference:
        columns += [("hf_mfu", "transformers MFU")]
    columns += [("lmlab_mib", "lmlab peak MiB")]
    if reference:
        columns += [("hf_mib", "transformers peak MiB"), ("memory_ratio", "memory ratio")]
    return columns


def _notes(rows, device, precision, batch_size, steps, warmup, compile, peak, peak_source, fused, why_alone):
    step = ("a step = forward with the loss + backward + AdamW step + zero_grad (no data loading, no gradient "
            f"clipping), {batch_size} rows of context_length random tokens; median of {steps} steps taken in "
            f"turns after {warmup} warm-up step(s); tokens/s = tokens/step / median step time")
    t = TrainConfig()  # bench_config keeps the defaults of every other switch
    notes = [step,
             f"lmlab: prepare_model (train.attention={t.attention}, train.loss_chunk={t.loss_chunk}, "
             f"activation_checkpointing={str(t.activation_checkpointing).lower()}) + build_optimizer "
             f"(AdamW, fused={bool(fused)})" + (", both models torch.compile'd" if compile else "")]
    if why_alone is None:
        transformers = _transformers()
        classes = sorted({row["reference"] for row in rows})
        agreement = max(row["loss_rel_diff"] for row in rows)
        notes += [
            f"reference: transformers {transformers.__version__} {'/'.join(classes)} (sdpa attention) with lmlab's "
            "weights (lmlab.model.hf; lmlab.bench.gpt2 for GPT2LMHeadModel, against lmlab with model.norm=layernorm, "
            "position=learned, ffn=gelu, tie_embeddings=true, bias=true: shapes marked gpt2), its own loss with shift_labels=targets (the same targets as lmlab), "
            "torch AdamW with lmlab's parameter groups, hyper-parameters and fused setting",
            f"first-step losses agree to {agreement:.1g} relative (required: {LOSS_RTOL[precision]:g})",
            "speed ratio = lmlab tok/s / transformers tok/s (> 1: lmlab faster); "
            "memory ratio = lmlab / transformers peak (< 1: lmlab needs less)",
        ]
    else:
        notes.append(f"lmlab only: {why_alone}")
    notes.append(f"MFU against {peak / 1e12:.3g} TFLOP/s ({peak_source}); FLOPs per token from "
                 "Transformer.flops_per_token() (6N + 12 L d T)")
    if device.type == "cuda":
        notes.append(f"peak memory: torch's peak allocated bytes while building the model and optimizer and "
                     f"running {MEMORY_STEPS} steps, each candidate alone")
    else:
        notes.append(f"peak memory: growth of the process's peak resident set (RSS, not only tensors) while "
                     f"building the model and optimizer and running {MEMORY_STEPS} steps, each candidate alone; "
                     "below a few MiB it is noise (small blocks reuse heap freed earlier)")
    return notes
