"""The interchangeable parts of a block: norms, rotary positions, feed-forward layers.

Design choices:
- One small class per switch value, picked once by `make_norm` / `make_ffn`;
  the model never asks which variant it holds. "No norm" is `nn.Identity`, so
  a model without norms has no norm parameters at all.
- Norms compute in fp32, so bf16 autocast changes the matmuls and little
  else, and fp32 logits match `transformers` to rounding. RMSNorm applies its
  gain in the input dtype, exactly as Hugging Face's LlamaRMSNorm does;
  LayerNorm is one `F.layer_norm` call with gain and bias inside, as
  nn.LayerNorm (GPT-2, nanoGPT) is: separate multiply and add ops made
  lmlab's GPT-2 step ~4% slower than GPT2LMHeadModel's on CPU.
- Parameter names follow Hugging Face: `weight` (and `bias`) for norms,
  `gate_proj` / `up_proj` / `down_proj` for SwiGLU. The two-matrix MLP reuses
  `up_proj` / `down_proj` for W1 / W2, so every variant reads the same way.
- RoPE uses HF's convention (rotate_half over the two halves of a head,
  inv_freq = theta^(-2i/d)); tables are fp32.
- Attention has one entry point, `attend`, with interchangeable back-ends
  (`train.attention`): PyTorch's SDPA (default; it picks flash / memory-
  efficient kernels on GPU itself), an eager reference written out in plain
  ops, and the optional flash-attn and xformers kernels. The optional ones
  serve only the training shape (causal self-attention, no cache, no mask),
  which is where their speed matters; anything else goes to SDPA.
"""

import importlib
import math

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
        # One fused op with the gain and bias inside (as nn.LayerNorm): separate
        # multiply and add cost ~50 extra element-wise ops a step at 4 layers, forward and backward.
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), bias, self.eps).to(x.dtype)


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
        self.gate_up_proj = None  # gate/up packed in one matrix at run time (lmlab.model.fused)

    def forward(self, x):
        gate, up = self.gate_up_proj.split(x) if self.gate_up_proj is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(F.silu(gate) * up)


class MLP(nn.Module):
    """down(act(up(x))): the two-matrix MLP, with SiLU (CS336's ablation), GELU (GPT-2) or ReLU^2."""

    def __init__(self, config, activation):
        super().__init__()
        self.activation = activation
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x):
        return self.down_proj(self.activation(self.up_proj(x)))


def relu_squared(x):
    """ReLU(x)^2 (So et al. 2021, Primer; modded-nanogpt): sparse like ReLU, smooth at 0. HF's "relu2"."""
    return F.relu(x).square()


def make_ffn(config):
    """The feed-forward layer that model.ffn names."""
    if config.ffn == "swiglu":
        return SwiGLU(config)
    if config.ffn == "silu":
        return MLP(config, F.silu)
    if config.ffn == "gelu":
        return MLP(config, F.gelu)  # the exact (erf) GELU, HF's "gelu"
    if config.ffn == "relu2":
        return MLP(config, relu_squared)
    raise ValueError(f"unknown ffn {config.ffn!r}")


ATTENTION_BACKENDS = ("sdpa", "eager", "flash_attn", "xformers")
OPTIONAL_BACKENDS = {"flash_attn": "flash-attn", "xformers": "xformers"}  # back-end -> pip package


def attend(q, k, v, backend="sdpa", is_causal=False, attn_mask=None, dropout_p=0.0, scale=None):
    """Attention of q (B, heads, T, head_dim) over k, v (B, kv_heads, S, head_dim) -> (B, heads, T, head_dim).

    Grouped-query attention: each key/value head serves heads / kv_heads
    consecutive query heads (HF's repeat_kv). `attn_mask` (T, S) is True where
    a query may look; `is_causal` aligns the triangle to the top-left corner
    (used when T == S). `scale` None means 1/sqrt(head_dim).
    """
    fast_shape = is_causal and attn_mask is None  # causal self-attention over the same T positions
    if backend == "flash_attn" and fast_shape:
        return _flash_attn(q, k, v, dropout_p, scale)
    if backend == "xformers" and fast_shape:
        return _xformers(q, k, v, dropout_p, scale)
    if backend == "eager":
        return eager_attention(q, k, v, is_causal, attn_mask, dropout_p, scale)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )


def eager_attention(q, k, v, is_causal=False, attn_mask=None, dropout_p=0.0, scale=None):
    """softmax(q k^T * scale + mask) v in plain PyTorch ops, softmax in fp32: the reference the kernels must match."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)).float() * scale  # (B, heads, T, S)
    if is_causal:
        attn_mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    probs = F.dropout(scores.softmax(dim=-1), p=dropout_p) if dropout_p else scores.softmax(dim=-1)
    return probs.to(v.dtype) @ v


def optional_module(backend, module=None):
    """Import an optional attention package (or one of its modules); missing is an LmlabError saying what to install."""
    from lmlab.errors import LmlabError

    try:
        return importlib.import_module(module or backend)
    except ImportError as e:
        raise LmlabError(f"train.attention={backend} needs the {OPTIONAL_BACKENDS[backend]} package, which could not "
                         f"be imported ({e}): pip install {OPTIONAL_BACKENDS[backend]}, or use train.attention=sdpa"
                         ) from None


def _flash_attn(q, k, v, dropout_p, scale):
    # flash-attn wants (B, T, heads, head_dim) and handles grouped-query heads itself.
    flash_attn = optional_module("flash_attn")
    y = flash_attn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                   dropout_p=dropout_p, softmax_scale=scale, causal=True)
    return y.transpose(1, 2)


def _xformers(q, k, v, dropout_p, scale):
    # xformers wants (B, T, heads, head_dim); key/value heads are repeated for grouped-query attention.
    ops = optional_module("xformers", "xformers.ops")
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    y = ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_bias=ops.LowerTriangularMask(), p=dropout_p, scale=scale)
    return y.transpose(1, 2)
