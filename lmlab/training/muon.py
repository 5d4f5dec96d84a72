"""Muon: Newton-Schulz-orthogonalised momentum for the blocks' matrices, AdamW for the rest.

Design choices:
- One torch.optim.Optimizer with two kinds of parameter groups ("muon" and
  "adamw"), not two optimizers: the trainer, the grad scaler, clipping,
  checkpoints and FSDP's state-dict helpers all see one optimizer, so resume
  and distributed training work as they do for AdamW.
- Muon for the 2-D weights inside the transformer blocks (attention and FFN
  projections). Embeddings, the LM head, norms' gains, biases and other
  scalars get AdamW: orthogonalising an embedding or a head treats rows of
  different tokens as one linear map, which they are not (Jordan et al. 2024,
  Moonlight 2025, nanochat all leave them to Adam).
- The update is msign(momentum) via 5 Newton-Schulz steps of the quintic
  X <- aX + (bA + cA^2)X, A = XX^T, with (a, b, c) = (3.4445, -4.7750, 2.0315),
  the coefficients of Keller Jordan's Muon: they push singular values into a
  band around 1 (about 0.7-1.2) quickly rather than exactly to 1. Computed in
  fp32 (no bf16 on CPU, where it is slower and less exact).
- Moonlight's scale: the orthogonal update is multiplied by
  0.2 * sqrt(max(rows, cols)), which gives it the RMS of a typical AdamW update
  (~0.2), so optim.lr and optim.weight_decay keep their AdamW meaning and the
  AdamW groups can share the schedule and default learning rate.
- Each group carries `lr_scale` (its learning rate / optim.lr); the schedule's
  lr is multiplied by it (optim.set_lr), so warm-up and decay apply to all.
- Momentum warm-up (optim.muon_momentum_warmup_steps): Muon's momentum rises
  linearly from 0.85 to optim.muon_momentum, as in modded-nanogpt; the step
  count lives in the optimizer state, so a resumed run continues it exactly.
- Distributed: under DDP the gradients are all-reduced before the step, so
  every rank orthogonalises the same full matrix and the update stays
  replicated. Under FSDP each rank holds a row shard; the momentum stays
  sharded (it is elementwise), and the Nesterov momentum is gathered to the
  full matrix, orthogonalised on every rank and each rank keeps its own rows.
"""

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
MOMENTUM_WARMUP_START = 0.85


def newton_schulz(grad, steps=5, eps=1e-7):
    """msign(grad) approximately: the quintic Newton-Schulz iteration on the Frobenius-normalised matrix."""
    a, b, c = NS_COEFFICIENTS
    x = grad.float()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: A = X X^T is then the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1: inside convergence
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def update_scale(shape):
    """Moonlight's factor: the orthogonal update's RMS matched to AdamW's typical 0.2."""
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


class Muon(torch.optim.Optimizer):
    """Muon for groups with kind="muon", AdamW (decoupled weight decay, bias-corrected) for kind="adamw"."""

    def __init__(self, groups, lr, betas=(0.9, 0.95), eps=1e-8, momentum=0.95, nesterov=True, ns_steps=5,
                 momentum_warmup_steps=0):
        defaults = {"lr": lr, "lr_scale": 1.0, "weight_decay": 0.0, "betas": betas, "eps": eps, "momentum": momentum,
                    "nesterov": nesterov, "ns_steps": ns_steps, "momentum_warmup_steps": momentum_warmup_steps,
                    "kind": "adamw"}
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["kind"] == "muon":
                    self._muon(p, group)
                else:
                    self._adamw(p, group)
        return loss

    def _muon(self, p, group):
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        mu = momentum_at(int(state["step"].item()), group["momentum"], group["momentum_warmup_steps"])
        buf = state["momentum_buffer"]
        buf.mul_(mu).add_(p.grad)
        direction = p.grad.add(buf, alpha=mu) if group["nesterov"] else buf
        ortho = _orthogonalise(direction, group["ns_steps"]).to(p.dtype)
        lr = group["lr"]
        if group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])
        p.add_(ortho, alpha=-lr * update_scale(p.shape))

    def _adamw(self, p, group):
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = state["step"].item()
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bias2)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)


def momentum_at(step, momentum, warmup_steps):
    """Muon's momentum at optimizer step `step` (from 1): 0.85 rising linearly to `momentum` over warmup_steps."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return momentum
    frac = step / warmup_steps
    return (1 - frac) * MOMENTUM_WARMUP_START + frac * momentum


def _orthogonalise(direction, steps):
    """newton_schulz of the full matrix; an FSDP-sharded DTensor is gathered, and each rank keeps its shard."""
    if not hasattr(direction, "full_tensor"):
        return newton_schulz(direction, steps)
    from torch.distributed.tensor import distribute_tensor

    full = newton_schulz(direction.full_tensor(), steps)  # the same on every rank: no scatter needed
    return distribute_tensor(full, direction.device_mesh, direction.placements, src_data_rank=None)
