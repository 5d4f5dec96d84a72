"""The interchangeable parts of a block: norms, rotary positions, feed-forward layers.

Design choices:
- One small class per switch value, picked once by `make_norm` / `make_ffn`;
  the model never asks which variant it holds. "No norm" is `nn.Identity`, so
  a model without norms has no norm parameters at all.
- Norms compute in fp32 and apply their gain in the input dtype, exactly as
  Hugging Face's LlamaRMSNorm does, so bf16 autocast changes the matmuls and
  little else, and fp32 logits match `transformers` to rounding.
- Parameter names follow Hugging Face: `weight` (and `bias`) for norms,
  `gate_proj` / `up_proj` / `down_proj` for SwiGLU. The two-matrix MLP reuses
  `up_proj` / `down_proj` for W1 / W2, so every variant reads the same way.
- RoPE uses HF's convention (rotate_half over the two halves of a head,
  inv_freq = theta^(-2i/d)); tables are fp32.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain; computed in fp32 like HF's LlamaRMSNorm."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LayerNorm(nn.Module):
    """Mean-centred and variance-normalised, with a learned gain and optional bias (nanoGPT's LayerNorm)."""

    def __init__(self, dim, eps, bias):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        y = (self.weight * F.layer_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype))
        return y if self.bias is None else y + self.bias


NORMS = (RMSNorm, LayerNorm)


def make_norm(config, dim=None):
    """The norm that model.norm names, over `dim` features (default d_model)."""
    dim = dim or config.d_model
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    if config.norm == "layernorm":
        return LayerNorm(dim, config.norm_eps, bias=config.bias)
    if config.norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {config.norm!r}")


def rope_tables(head_dim, length, theta, device=None):
    """cos and sin of shape (length, head_dim) in fp32, laid out for rotate_half (HF's convention)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    positions = torch.arange(length, dtype=torch.float32, device=device)
    freqs = torch.outer(positions, inv_freq)  # (length, head_dim / 2)
    angles = torch.cat((freqs, freqs), dim=-1)  # both halves of a head rotate by the same angles
    return angles.cos(), angles.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """Rotate x of shape (B, heads, T, head_dim) by the angles of its T positions."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): Llama's feed-forward layer, three matrices."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    """down(act(up(x))): the two-matrix MLP, with SiLU (CS336's ablation) or GELU (GPT-2)."""

    def __init__(self, config, activation):
        super().__init__()
        self.activation = activation
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x):
        return self.down_proj(self.activation(self.up_proj(x)))


def make_ffn(config):
    """The feed-forward layer that model.ffn names."""
    if config.ffn == "swiglu":
        return SwiGLU(config)
    if config.ffn == "silu":
        return MLP(config, F.silu)
    if config.ffn == "gelu":
        return MLP(config, F.gelu)  # the exact (erf) GELU, HF's "gelu"
    raise ValueError(f"unknown ffn {config.ffn!r}")
