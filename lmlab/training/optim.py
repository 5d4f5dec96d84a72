"""Optimizer: AdamW and its parameter groups (schedules live in lmlab/training/schedules.py).

Design choices:
- AdamW from torch itself (fused kernel where the device has one), so the
  update rule is the reference one, not a re-implementation.
- `optim.name=adamw8bit` swaps in bitsandbytes' 8-bit AdamW (block-wise
  quantised moments: 2 bytes of state per parameter instead of 8), imported
  only when asked for; its absence is an LmlabError, not an ImportError.
- Weight decay only on matrices (dim >= 2: linear and embedding weights), never
  on norms' gains or biases: decaying a gain toward 0 fights the normalisation.
- `optim.name=muon` (lmlab/training/muon.py): Muon for the blocks' matrices at
  optim.lr, AdamW for embeddings (optim.embed_lr), the head (optim.head_lr) and
  norms / biases (optim.scalar_lr); a group's lr of 0 means optim.lr. Each group
  keeps `lr_scale` = its lr / optim.lr, and `set_lr` multiplies the schedule's
  lr by it, so every group warms up and decays together.
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
    if optim_cfg.name == "muon":
        return muon(model, optim_cfg)
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


def muon_groups(model, optim_cfg):
    """Muon for 2-D weights inside the blocks; AdamW groups for embeddings, the head, and norms/biases/scalars."""
    found = {"muon": [], "embed": [], "head": [], "scalar": []}
    seen = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))  # a tied head is the embedding: it trains once, at embed_lr
        if "embed_" in name:
            found["embed"].append(param)
        elif "lm_head" in name:
            found["head"].append(param)
        elif param.dim() >= 2 and "layers." in name:
            found["muon"].append(param)
        else:
            found["scalar"].append(param)
    o = optim_cfg
    lrs = {"muon": o.lr, "embed": o.embed_lr or o.lr, "head": o.head_lr or o.lr, "scalar": o.scalar_lr or o.lr}
    decay = {"muon": o.weight_decay, "embed": o.weight_decay, "head": o.weight_decay, "scalar": 0.0}
    return [{"params": params, "name": key, "kind": "muon" if key == "muon" else "adamw", "lr": lrs[key],
             "lr_scale": lrs[key] / o.lr, "weight_decay": decay[key]}
            for key, params in found.items() if params]


def muon(model, optim_cfg):
    """lmlab.training.muon.Muon over muon_groups; refuses settings it cannot serve."""
    from lmlab.training.muon import Muon

    if optim_cfg.fused == "true":
        raise LmlabError("optim.fused=true applies to optim.name=adamw; optim.name=muon runs its own update "
                         "(leave optim.fused=auto)")
    groups = muon_groups(model, optim_cfg)
    if not any(g["kind"] == "muon" for g in groups):
        raise LmlabError("optim.name=muon found no 2-D weights inside the blocks to orthogonalise; use optim.name=adamw")
    return Muon(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps,
                momentum=optim_cfg.muon_momentum, nesterov=optim_cfg.muon_nesterov, ns_steps=optim_cfg.muon_ns_steps,
                momentum_warmup_steps=optim_cfg.muon_momentum_warmup_steps)


def set_lr(optimizer, lr):
    """The schedule's lr on every group, times the group's lr_scale (per-group learning rates, Muon)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
