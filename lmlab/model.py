"""The model: a decoder-only Llama-style transformer, and its KV cache.

Design choices:
- Llama architecture: token embedding, pre-norm blocks (RMSNorm -> attention,
  RMSNorm -> SwiGLU MLP, each added to the residual stream), a final RMSNorm and
  an LM head. No biases anywhere, no absolute position embedding.
- Module and parameter names are exactly Hugging Face's `LlamaForCausalLM`
  names without the "model." prefix (`embed_tokens`, `layers.0.self_attn.q_proj`,
  ..., `norm`, `lm_head`), and RoPE uses HF's convention (rotate_half over the
  two halves of a head, inv_freq = theta^(-2i/d)). Export is then a key rename,
  and `transformers` itself can check our numbers (tests/test_model.py does).
- Attention goes through `F.scaled_dot_product_attention` (flash / memory-
  efficient kernels where available; the softmax runs inside it in fp32 or
  better). Grouped-query attention uses SDPA's `enable_gqa`, which repeats each
  key/value head for n_heads / n_kv_heads consecutive query heads, as HF does.
- RMSNorm normalizes in fp32 and the RoPE tables are computed in fp32, so
  bf16 autocast changes the matmuls and little else. Logits come back in the
  compute dtype; `lm_loss` upcasts them to fp32.
- The RoPE tables cover `context_length` positions and no more: a position the
  model never saw in training is a clear error, not silent extrapolation.
  (`generate` never asks for one; it slides its window instead.)
- The KV cache is preallocated (one (B, n_kv_heads, max_len, head_dim) tensor
  pair per layer) and the same `forward` serves training, prefill and decoding.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.config import ModelConfig


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


class KVCache:
    """Keys and values of the positions seen so far, for every layer.

    `pos` is the number of positions filled; `Transformer.forward` writes the
    next T positions and advances it. Make one with `model.new_kv_cache(...)`.
    """

    def __init__(self, n_layers, batch_size, n_kv_heads, max_len, head_dim, device=None, dtype=None):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch_size = batch_size
        self.max_len = max_len
        self.pos = 0

    def reset(self):
        self.pos = 0

    def update(self, layer, k, v):
        """Store k, v (B, n_kv_heads, T, head_dim) at positions pos.. and return all keys/values so far."""
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads or config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.d_model, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=False)

    def forward(self, x, cos, sin, kv_cache=None, layer=0, attn_mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Without a cache (training) or at the start of one, queries and keys
        # cover the same positions and is_causal is the mask. Otherwise the T
        # queries sit at the end of a longer key sequence: one query sees all
        # keys; a chunk needs `attn_mask`, because is_causal aligns the
        # triangle to the top-left corner, not the bottom-right.
        is_causal = attn_mask is None and T > 1
        if kv_cache is not None:
            is_causal = is_causal and kv_cache.pos == 0
            k, v = kv_cache.update(layer, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)  # the cache may be kept in another dtype than autocast's
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, kv_cache=None, layer=0, attn_mask=None):
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, layer, attn_mask))
        x = x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))
        return x


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        assert config.vocab_size > 0 and config.d_ff > 0, "resolve vocab_size and d_ff before building the model"
        assert config.d_model % config.n_heads == 0 and (config.d_model // config.n_heads) % 2 == 0
        self.config = config
        self.head_dim = config.d_model // config.n_heads
        self.n_kv_heads = config.n_kv_heads or config.n_heads
        assert config.n_heads % self.n_kv_heads == 0

        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

        # Non-persistent: derived from the config, so they stay out of checkpoints
        # (and out of the HF state dict, which has no such keys).
        cos, sin = rope_tables(self.head_dim, config.context_length, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        # Each block adds two branches (attention, MLP) to the residual stream.
        # With unscaled init the stream's variance grows with the number of
        # additions, 2 * n_layers; scaling the projections that write into it
        # by 1/sqrt(2 * n_layers) keeps its size independent of depth (GPT-2).
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for block in self.layers:
            nn.init.normal_(block.self_attn.o_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.down_proj.weight, mean=0.0, std=residual_std)

    def forward(self, input_ids, kv_cache=None):
        """Logits (B, T, vocab) for input_ids (B, T); with a cache, at positions cache.pos.. ."""
        B, T = input_ids.shape
        start = 0 if kv_cache is None else kv_cache.pos
        end = start + T
        if kv_cache is not None:
            if end > kv_cache.max_len:
                raise ValueError(f"KV cache overflow: {kv_cache.pos} positions cached + {T} new > max_len {kv_cache.max_len}")
            if B != kv_cache.batch_size:
                raise ValueError(f"batch size {B} does not match the KV cache's {kv_cache.batch_size}")
        if end > self.config.context_length:
            raise ValueError(
                f"positions up to {end} requested, but the model's context_length is {self.config.context_length}; "
                "crop the input to the last context_length tokens"
            )
        cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        attn_mask = None
        if kv_cache is not None and start > 0 and T > 1:
            # Query i (at position start + i) may see keys 0 .. start + i.
            attn_mask = torch.ones(T, end, dtype=torch.bool, device=input_ids.device).tril(diagonal=start)

        x = self.embed_tokens(input_ids)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, kv_cache, i, attn_mask)
        logits = self.lm_head(self.norm(x))
        if kv_cache is not None:
            kv_cache.pos = end
        return logits

    def new_kv_cache(self, batch_size, max_len=None, device=None, dtype=None):
        """An empty KVCache for up to max_len (default and at most context_length) positions."""
        max_len = max_len or self.config.context_length
        if max_len > self.config.context_length:
            raise ValueError(f"KV cache max_len {max_len} exceeds the model's context_length {self.config.context_length}")
        weight = self.embed_tokens.weight
        return KVCache(
            self.config.n_layers, batch_size, self.n_kv_heads, max_len, self.head_dim,
            device=device or weight.device, dtype=dtype or weight.dtype,
        )

    def num_params(self, non_embedding=False):
        """Parameter count; tied embeddings count once. non_embedding drops embed_tokens and lm_head."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token: 6N + 12 L d T (PaLM appendix B, nanoGPT's estimate_mfu).

        N counts the weights used in matmuls: everything but the embedding
        lookup (the LM head is a matmul; a tied matrix counts once, as the head).
        The attention term counts the full T x T score matrix, as PaLM does,
        though causal kernels skip about half of it.
        """
        c = self.config
        seq_len = seq_len or c.context_length
        n = self.num_params()
        if not c.tie_embeddings:
            n -= self.embed_tokens.weight.numel()
        return 6 * n + 12 * c.n_layers * c.d_model * seq_len

    def summary(self):
        c = self.config
        theta = f"{c.rope_theta:.0f}" if float(c.rope_theta).is_integer() else f"{c.rope_theta:g}"
        return (
            f"Transformer {c.n_layers}L d{c.d_model} h{c.n_heads}/kv{self.n_kv_heads} ff{c.d_ff} "
            f"ctx{c.context_length} vocab{c.vocab_size} rope({theta}) swiglu rmsnorm "
            f"{'tied' if c.tie_embeddings else 'untied'} | "
            f"{_human(self.num_params())} params, {_human(self.num_params(non_embedding=True))} non-embedding"
        )


def lm_loss(logits, targets):
    """Mean cross-entropy in fp32 over targets that are not -100."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


def _human(n):
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
