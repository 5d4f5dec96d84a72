"""Optimizer and learning-rate schedule.

Design choices:
- AdamW from torch itself (fused kernel where the device has one), so the
  update rule is the reference one, not a re-implementation.
- Weight decay only on matrices (dim >= 2: linear and embedding weights), never
  on norms' gains or biases: decaying a gain toward 0 fights the normalisation.
- The schedule is a pure function of the step, so resuming needs no state:
  linear warmup reaches `lr` exactly at the last warmup step, and cosine decay
  reaches `min_lr` exactly at the last step of the run.
"""

import math

import torch

from lmlab.errors import LmlabError


def param_groups(model, weight_decay):
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model, optim_cfg, device):
    fused = {"auto": device.type in ("cuda", "cpu"), "true": True, "false": False}[optim_cfg.fused]
    try:
        return torch.optim.AdamW(
            param_groups(model, optim_cfg.weight_decay),
            lr=optim_cfg.lr,
            betas=(optim_cfg.beta1, optim_cfg.beta2),
            eps=optim_cfg.eps,
            fused=fused or None,
        )
    except RuntimeError as e:
        raise LmlabError(f"optim.fused=true is not supported on {device.type}: {e}") from None


def lr_at(step, optim_cfg, total_steps):
    """Learning rate for optimizer step `step` (0-based) of a run of `total_steps`."""
    lr, min_lr, warmup = optim_cfg.lr, optim_cfg.min_lr, optim_cfg.warmup_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    if optim_cfg.schedule == "constant":
        return lr
    if optim_cfg.schedule != "cosine":
        raise LmlabError(f"unknown optim.schedule '{optim_cfg.schedule}'")
    decay_start = max(warmup - 1, 0)  # the step at which lr is at its peak
    decay_steps = total_steps - 1 - decay_start
    if decay_steps <= 0:
        return lr
    progress = min(1.0, (step - decay_start) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
