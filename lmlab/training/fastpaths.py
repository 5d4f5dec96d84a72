"""The fast paths of a training step, switched on from the config in one place.

`prepare_model(model, config, device)` applies the speed switches and returns
the callable the training loop runs: `loss = step_fn(x, targets=y)` (and
`logits = step_fn(x)` for evaluation). None of the switches changes what is
computed, only how; tests/test_fastpaths.py checks each against the plain path.

    train.precision               bf16 / fp16 autocast, fp32 master weights (lmlab.device)
    train.attention               sdpa (default), eager, flash_attn, xformers (lmlab.model.layers.attend)
    train.activation_checkpointing  recompute each block in backward (Transformer.forward)
    train.loss_chunk              LM head + fp32 loss chunk by chunk of rows (model.chunked_lm_loss)
    train.compile                 torch.compile of the model, the loss included
    train.fuse_projections        q/k/v (and gate/up) packed in one matrix (lmlab.model.fused): fuse_for_training
    optim.name / optim.fused      adamw8bit (bitsandbytes) / fused AdamW (lmlab.training.optim)

Design choices:
- Switches are attributes of the model set here, not fields of ModelConfig:
  they are not architecture, so checkpoints and exports never see them.
- The loss runs inside the model's forward (`targets=`), so `torch.compile`
  compiles it with the model: with the plain loss inductor fuses the fp32
  cast, log-softmax and NLL; the chunked loss compiles as well (its chunks
  unroll into the graph).
- step_fn enters autocast itself, so the loop needs no precision code; an
  enclosing autocast of the same precision is harmless.
- A back-end that cannot run (package missing, no GPU, fp32 for flash-attn)
  is an LmlabError here, before any training, not a crash at the first step.
"""

import torch

from lmlab.device import autocast, resolve_precision
from lmlab.errors import LmlabError
from lmlab.model.fused import fuse_projections
from lmlab.model.layers import optional_module
from lmlab.model.transformer import Attention


def prepare_model(model, config, device, precision=None):
    """Apply train.attention / activation_checkpointing / loss_chunk / compile to `model`; return step_fn.

    `model` is a Transformer, or a wrapper holding one as `.module` (DDP); the
    switches go to the Transformer, compilation wraps what was passed.
    step_fn(x, targets=None) returns the mean loss with targets, logits without.
    """
    t = config.train
    precision = precision or resolve_precision(t.precision, device)
    check_attention(t.attention, device, precision)
    inner = getattr(model, "module", model)
    inner.loss_chunk = t.loss_chunk
    inner.activation_checkpointing = t.activation_checkpointing
    for module in inner.modules():
        if isinstance(module, Attention):
            module.backend = t.attention
    forward = torch.compile(model) if t.compile else model

    def step_fn(x, targets=None, **memory):  # memory=Memory with model.memory (lmlab.model.memory)
        with autocast(precision, device):
            return forward(x, targets=targets, **memory)

    step_fn.model = forward  # what step_fn runs (compiled or not), e.g. for evaluation code that wants logits
    return step_fn


AUTO_FUSE = ()  # what train.fuse_projections=auto packs: nothing, packing measured no faster on CPU (docs/speed.md)


def fuse_for_training(model, config, parallel="none"):
    """Pack the projections train.fuse_projections asks for, in place, before the model is wrapped and the
    optimizer built; returns the owner classes packed (() for none).

    Only with AdamW (elementwise, so the same step) and without FSDP; config
    validation refuses `true` elsewhere, and `auto` stays off there.
    """
    choice = config.train.fuse_projections
    if choice == "false" or config.optim.name != "adamw" or parallel == "fsdp":
        return ()
    owners = AUTO_FUSE if choice == "auto" else ("Attention", "SwiGLU")
    fuse_projections(model, owners)
    return owners


def check_attention(backend, device, precision):
    """Refuse an attention back-end that cannot run here, with one line saying what to do instead."""
    if backend not in ("flash_attn", "xformers"):
        return
    optional_module(backend, "xformers.ops" if backend == "xformers" else None)  # installed, or LmlabError
    if device.type != "cuda":
        raise LmlabError(f"train.attention={backend} runs on CUDA GPUs only (device is {device.type}); "
                         "use train.attention=sdpa")
    if backend == "flash_attn" and precision not in ("bf16", "fp16"):
        raise LmlabError("train.attention=flash_attn needs train.precision=bf16 or fp16 (flash-attn has no fp32 "
                         "kernels); or use train.attention=sdpa")
