"""Optimizer: AdamW and its parameter groups (schedules live in lmlab/training/schedules.py).

Design choices:
- AdamW from torch itself (fused kernel where the device has one), so the
  update rule is the reference one, not a re-implementation.
- `optim.name=adamw8bit` swaps in bitsandbytes' 8-bit AdamW (block-wise
  quantised moments: 2 bytes of state per parameter instead of 8), imported
  only when asked for; its absence is an LmlabError, not an ImportError.
- Weight decay only on matrices (dim >= 2: linear and embedding weights), never
  on norms' gains or biases: decaying a gain toward 0 fights the normalisation.
- `lr_at` (re-exported from lmlab.training.schedules) gives a step-based schedule's
  learning rate without building a run: linear warmup reaches `lr` exactly at
  the last warmup step, and cosine decay reaches `min_lr` exactly at the last step.
"""

import torch

from lmlab.errors import LmlabError
from lmlab.training.schedules import lr_at  # noqa: F401  (the schedule's value at a step, kept importable from here)


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
    if optim_cfg.name == "adamw8bit":
        return adamw_8bit(model, optim_cfg)
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


def adamw_8bit(model, optim_cfg):
    """bitsandbytes' AdamW8bit with the same parameter groups and hyper-parameters as the torch one."""
    if optim_cfg.fused == "true":
        raise LmlabError("optim.fused=true applies to optim.name=adamw; bitsandbytes' 8-bit AdamW has its own kernels "
                         "(leave optim.fused=auto)")
    try:
        import bitsandbytes
    except ImportError as e:
        raise LmlabError(f"optim.name=adamw8bit needs bitsandbytes, which could not be imported ({e}): "
                         "pip install bitsandbytes, or use optim.name=adamw") from None
    return bitsandbytes.optim.AdamW8bit(
        param_groups(model, optim_cfg.weight_decay),
        lr=optim_cfg.lr,
        betas=(optim_cfg.beta1, optim_cfg.beta2),
        eps=optim_cfg.eps,
    )


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
