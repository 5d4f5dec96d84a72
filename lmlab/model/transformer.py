"""The model: a decoder-only transformer, Llama by default, with switches for ablations; and its KV cache.

Design choices:
- Llama architecture by default: token embedding, pre-norm blocks (RMSNorm ->
  attention, RMSNorm -> SwiGLU MLP, each added to the residual stream), a final
  RMSNorm and an LM head. No biases, no absolute position embedding.
- Every ablation is one `model.` config key (norm, norm_position, position,
  ffn, qk_norm, key_norm, bias, tie_embeddings, n_kv_heads, dropout); the
  pieces it swaps live in `lmlab.model.layers`. The Llama default is unchanged by
  the switches' existence: same parameters, same numbers. Post-norm changes
  the blocks only; the final norm before the head stays, as in CS336's
  ablation, so that one switch changes one thing.
- Module and parameter names are exactly Hugging Face's `LlamaForCausalLM`
  names without the "model." prefix (`embed_tokens`, `layers.0.self_attn.q_proj`,
  ..., `norm`, `lm_head`; QK-norm adds Qwen3's `q_norm` / `k_norm`), and RoPE
  uses HF's convention. Export is then a key rename, and `transformers` itself
  can check our numbers (tests/test_export.py does). Parts outside those
  families get names in the same style (`embed_positions`, `key_scale`) and
  save and load like the rest.
- Attention goes through `F.scaled_dot_product_attention` (flash / memory-
  efficient kernels where available; the softmax runs inside it in fp32 or
  better). Grouped-query attention uses SDPA's `enable_gqa`, which repeats each
  key/value head for n_heads / n_kv_heads consecutive query heads, as HF does.
- Position tables (RoPE) and learned position embeddings cover
  `context_length` positions and no more: a position the model never saw in
  training is a clear error, not silent extrapolation. (`generate` never asks
  for one; it slides its window instead.)
- The KV cache is preallocated (one (B, n_kv_heads, max_len, head_dim) tensor
  pair per layer) and the same `forward` serves training, prefill and decoding.
- `forward(ids, targets=y)` returns the training loss instead of logits, so
  that the loss can skip the full logits: with `loss_chunk` set, the LM head
  and an fp32 log-softmax run a chunk of rows at a time (`chunked_lm_loss`).
- Speed switches that change no number are plain attributes set by
  `lmlab.training.fastpaths.prepare_model`, not config fields of the model (they are
  not part of the architecture and stay out of checkpoints and exports):
  `loss_chunk`, `activation_checkpointing` and each attention's `backend`.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmlab.config import ModelConfig
from lmlab.model.memory import Memory
from lmlab.model.layers import NORMS, RMSNorm, apply_rope, attend, make_ffn, make_norm, rope_tables


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
        self.n_kv_heads, self.head_dim = config.n_kv_heads, config.head_dim  # resolved by Transformer
        self.dropout = config.dropout
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.d_model, q_dim, bias=config.bias)
        self.k_proj = nn.Linear(config.d_model, kv_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.d_model, kv_dim, bias=config.bias)
        self.o_proj = nn.Linear(q_dim, config.d_model, bias=config.bias)
        self.qkv_proj = None  # q/k/v packed in one matrix at run time (lmlab.model.fused); names stay q/k/v_proj
        # QK-norm as in Qwen3: one RMSNorm gain over head_dim, shared by all heads,
        # applied to every head's query and key before RoPE.
        self.qk_norm = config.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        # KeyNorm (Su, 2023): unit-length keys make q.k/|k| about as large as
        # q.k/sqrt(head_dim) is for keys of norm sqrt(head_dim), so a scale of 1
        # replaces 1/sqrt(head_dim); a learned scale (one per head) may sharpen it.
        self.key_norm = config.key_norm
        self.scale = (config.key_norm_scale or 1.0) if self.key_norm else None  # None: SDPA's 1/sqrt(head_dim)
        learned_scale = self.key_norm and not config.key_norm_scale
        self.key_scale = nn.Parameter(torch.ones(self.n_heads)) if learned_scale else None
        self.backend = "sdpa"  # train.attention: sdpa, eager, flash_attn, xformers (lmlab.model.layers.attend)

    def forward(self, x, rope=None, kv_cache=None, layer=0, attn_mask=None, memory=None):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj.split(x) if self.qkv_proj is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if self.key_norm:
            k = F.normalize(k.float(), dim=-1).to(q.dtype)
            if self.key_scale is not None:
                q = q * self.key_scale.view(1, -1, 1, 1).to(q.dtype)
        if memory is not None:  # model.memory: the previous segment's keys and values too (lmlab.model.memory)
            q, k, v, attn_mask = memory.join(layer, q, k, v)
        elif rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # Without a cache (training) or at the start of one, queries and keys
        # cover the same positions and is_causal is the mask. Otherwise the T
        # queries sit at the end of a longer key sequence: one query sees all
        # keys; a chunk needs `attn_mask`, because is_causal aligns the
        # triangle to the top-left corner, not the bottom-right. (is_causal must
        # not depend on T: under torch.compile with dynamic shapes T > 1 is a
        # symbolic bool, which SDPA rejects.)
        is_causal = attn_mask is None and (kv_cache is None or kv_cache.pos == 0)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)  # the cache may be kept in another dtype than autocast's
        y = attend(q, k, v, backend=self.backend, is_causal=is_causal, attn_mask=attn_mask,
                   dropout_p=self.dropout if self.training else 0.0, scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class Block(nn.Module):
    """Attention then feed-forward, each with its norm, pre-norm (Llama) or post-norm.

    The norms keep HF's names in both orders: `input_layernorm` belongs to the
    attention sublayer, `post_attention_layernorm` to the feed-forward one.
    """

    def __init__(self, config):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = make_ffn(config)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.post_norm = config.norm_position == "post"

    def forward(self, x, rope=None, kv_cache=None, layer=0, attn_mask=None, memory=None):
        if self.post_norm:
            # z = Norm(x + Attn(x)), y = Norm(z + FFN(z)): the residual stream
            # itself is normalised after every sublayer (Vaswani et al., 2017).
            x = self.input_layernorm(x + self.resid_dropout(self.self_attn(x, rope, kv_cache, layer, attn_mask, memory)))
            return self.post_attention_layernorm(x + self.resid_dropout(self.mlp(x)))
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), rope, kv_cache, layer, attn_mask, memory))
        return x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        assert config.vocab_size > 0, "set vocab_size (ModelConfig.resolved(tokenizer.vocab_size)) before building"
        assert config.head_dim or config.d_model % config.n_heads == 0
        self.config = config
        config = config.resolved()  # d_ff, n_kv_heads, head_dim filled in; the caller's config is left as it is
        self.head_dim, self.n_kv_heads = config.head_dim, config.n_kv_heads
        assert config.n_heads % self.n_kv_heads == 0

        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_positions = None  # learned absolute positions (GPT-2's wpe), when model.position = learned
        if config.position == "learned":
            self.embed_positions = nn.Embedding(config.context_length, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

        # Non-persistent: derived from the config, so they stay out of checkpoints
        # (and out of the HF state dict, which has no such keys).
        self.rope = config.position == "rope"
        if self.rope:
            assert self.head_dim % 2 == 0, "RoPE rotates pairs of features: head_dim must be even"
            positions = config.context_length + config.memory  # model.memory: the memory's slots come first
            cos, sin = rope_tables(self.head_dim, positions, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

        # Speed switches (set by lmlab.training.fastpaths.prepare_model; the results do not change):
        self.loss_chunk = 0  # rows of logits per chunk of the loss with targets; 0 = all at once
        self.activation_checkpointing = False  # recompute each block's activations in backward

        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        # One N(0, init_std) for every matrix, the tied one included. That is
        # GPT-2's (and HF Llama / Qwen3's) choice for tied embeddings, and it
        # suits tying because the output side is the one a tied matrix must
        # get right: logits = Norm(h) E^T start with std ~ init_std * sqrt(d_model)
        # (0.45 at d_model 512), i.e. near-uniform predictions and a first loss
        # of about ln(vocab). The input side needs no larger scale: every
        # sublayer reads the residual stream through a norm, which ignores its
        # size. (Untied recipes that grow the embedding or shrink the head to
        # ~0 cannot be applied to one shared tensor.)
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, NORMS):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Attention) and module.key_scale is not None:
                nn.init.ones_(module.key_scale)
        # Each block adds two branches (attention, MLP) to the residual stream.
        # With unscaled init the stream's variance grows with the number of
        # additions, 2 * n_layers; scaling the projections that write into it
        # by 1/sqrt(2 * n_layers) keeps its size independent of depth (GPT-2).
        # model.zero_init_proj starts them at zero instead: every block is the identity at step 0.
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for block in self.layers:
            for proj in (block.self_attn.o_proj, block.mlp.down_proj):
                if self.config.zero_init_proj:
                    nn.init.zeros_(proj.weight)
                else:
                    nn.init.normal_(proj.weight, mean=0.0, std=residual_std)

    def forward(self, input_ids, kv_cache=None, targets=None, memory=None):
        """Logits (B, T, vocab) for input_ids (B, T); with a cache, at positions cache.pos.. .

        With a Memory (model.memory, `new_memory`), the segment also attends to the
        row's previous tokens kept there, and leaves its own last tokens in it.

        With targets (B, T), the mean fp32 cross-entropy over targets that are
        not -100 instead, i.e. lm_loss(logits, targets), chunked when loss_chunk > 0.
        """
        B, T = input_ids.shape
        start = 0 if kv_cache is None else kv_cache.pos
        end = start + T
        if kv_cache is not None:
            if end > kv_cache.max_len:
                raise ValueError(f"KV cache overflow: {kv_cache.pos} positions cached + {T} new > max_len {kv_cache.max_len}")
            if B != kv_cache.batch_size:
                raise ValueError(f"batch size {B} does not match the KV cache's {kv_cache.batch_size}")
        if memory is not None and (kv_cache is not None or B != memory.batch_size):
            raise ValueError(f"a Memory of {memory.batch_size} rows needs a batch of as many rows and no KV cache")
        if end > self.config.context_length:
            raise ValueError(
                f"positions up to {end} requested, but the model's context_length is {self.config.context_length}; "
                "crop the input to the last context_length tokens"
            )
        rope = (self.rope_cos[start:end], self.rope_sin[start:end]) if self.rope else None
        if memory is not None:
            rope = (self.rope_cos[:memory.size + T], self.rope_sin[:memory.size + T]) if self.rope else None
            memory = memory.segment(T, rope)
        attn_mask = None
        if kv_cache is not None and start > 0 and T > 1:
            # Query i (at position start + i) may see keys 0 .. start + i.
            attn_mask = torch.ones(T, end, dtype=torch.bool, device=input_ids.device).tril(diagonal=start)

        x = self.embed_tokens(input_ids)
        if self.embed_positions is not None:
            x = x + self.embed_positions(torch.arange(start, end, device=input_ids.device))
        # Activation checkpointing keeps only each block's input for backward and
        # recomputes the rest there: ~1/3 more compute for activation memory of
        # one block instead of n_layers. Non-reentrant, RNG state preserved, so
        # dropout masks and gradients are exactly those of the plain pass.
        recompute = self.activation_checkpointing and kv_cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.layers):
            if recompute:
                x = checkpoint(block, x, rope, None, i, attn_mask, memory, use_reentrant=False)
            else:
                x = block(x, rope, kv_cache, i, attn_mask, memory)
        x = self.norm(x)
        if kv_cache is not None:
            kv_cache.pos = end
        if memory is not None:
            memory.memory.commit(T)
        cap = self.config.logit_softcap
        if targets is None:
            return softcap(self.lm_head(x), cap)
        if self.loss_chunk:
            return chunked_lm_loss(x, self.lm_head.weight, targets, self.loss_chunk, cap)
        return lm_loss(softcap(self.lm_head(x), cap), targets)

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

    def new_memory(self, batch_size, device=None):
        """An empty Memory of model.memory tokens per row (lmlab.model.memory), or None when model.memory = 0."""
        if not self.config.memory:
            return None
        return Memory(self.config.memory, self.config.n_layers, batch_size, self.n_kv_heads, self.head_dim,
                      device=device or self.embed_tokens.weight.device)

    def num_params(self, non_embedding=False):
        """Parameter count; tied embeddings count once. non_embedding drops the embeddings and lm_head."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
            if self.embed_positions is not None:
                n -= self.embed_positions.weight.numel()
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token: 6N + 12 L d T (PaLM appendix B, nanoGPT's estimate_mfu).

        N counts the weights used in matmuls, i.e. those of the nn.Linear layers:
        not the embedding lookups, norm gains or biases (the LM head is a matmul;
        a tied matrix counts once, as the head). The attention term counts the
        full T x T score matrix, as PaLM does, though causal kernels skip about
        half of it; d is the attention width n_heads * head_dim (= d_model unless
        model.head_dim is set). tests/test_track.py checks both terms against a
        hand count and against torch's FlopCounterMode.
        """
        c = self.config
        seq_len = seq_len or c.context_length
        n = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * n + 12 * c.n_layers * c.n_heads * self.head_dim * seq_len

    def summary(self):
        """One line: shape, then every architecture switch, then parameter counts."""
        c = self.config
        theta = f"{c.rope_theta:.0f}" if float(c.rope_theta).is_integer() else f"{c.rope_theta:g}"
        position = {"rope": f"rope({theta})", "nope": "nope", "learned": "learned-pos"}[c.position]
        norm = "no-norm" if c.norm == "none" else ("post-" if c.norm_position == "post" else "") + c.norm
        switches = [position, c.ffn, norm]
        if c.qk_norm:
            switches.append("qk-norm")
        if c.key_norm:
            switches.append(f"key-norm({c.key_norm_scale:g})" if c.key_norm_scale else "key-norm(learned)")
        if c.bias:
            switches.append("bias")
        if c.dropout:
            switches.append(f"dropout{c.dropout:g}")
        if c.memory:
            switches.append(f"memory{c.memory}")
        if c.logit_softcap:
            switches.append(f"softcap{c.logit_softcap:g}")
        switches.append("tied" if c.tie_embeddings else "untied")
        head_dim = f" hd{self.head_dim}" if c.head_dim and c.head_dim * c.n_heads != c.d_model else ""
        return (
            f"Transformer {c.n_layers}L d{c.d_model} h{c.n_heads}/kv{self.n_kv_heads}{head_dim} ff{c.d_ff} "
            f"ctx{c.context_length} vocab{c.vocab_size} {' '.join(switches)} | "
            f"{_human(self.num_params())} params, {_human(self.num_params(non_embedding=True))} non-embedding"
        )


def lm_loss(logits, targets):
    """Mean cross-entropy in fp32 over targets that are not -100."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


def softcap(logits, cap):
    """cap * tanh(logits / cap) (model.logit_softcap; Gemma 2, modded-nanogpt): logits kept inside (-cap, cap).

    Near zero it is the identity, so it bounds only confident logits; 0 = off (the logits unchanged).
    """
    return cap * torch.tanh(logits / cap) if cap else logits


def chunked_lm_loss(hidden, weight, targets, chunk_rows, cap=0.0):
    """lm_loss(hidden @ weight.T, targets) without ever holding more than chunk_rows rows of logits.

    The full logits of a step are large: (B*T, vocab) in fp32 is 1 GiB at
    B*T = 8192 and a 32k vocabulary, plus the log-softmax that backward keeps.
    Here the LM head and the fp32 log-softmax run one chunk of rows at a time,
    and each chunk's gradient (softmax - one_hot) goes straight into the
    gradients of `hidden` and `weight` during the forward pass (as Liger
    Kernel's fused linear cross-entropy does), so no chunk's logits outlive
    their iteration and backward has nothing to recompute. The matmuls follow
    autocast like the plain LM head; log-softmax and loss are fp32.
    """
    hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedLMLoss.apply(hidden, weight, targets, chunk_rows, cap)
    loss_sum, count = _chunk_loop(hidden, weight, targets, chunk_rows, cap)
    return loss_sum / count


def _chunk_loop(hidden, weight, targets, chunk_rows, cap, grad_hidden=None, grad_weight=None):
    """Summed loss and the number of counted targets; fills the (unnormalised) gradients when given buffers."""
    keep = targets != -100
    safe_targets = targets.clamp(min=0)  # ignored rows gather some logit; `keep` zeroes their loss and gradient
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        h, t, k = hidden[rows], safe_targets[rows, None], keep[rows]
        logits = F.linear(h, weight).float()  # (rows, vocab)
        if cap:  # softcap; its derivative 1 - tanh^2 scales the gradient below
            squash = torch.tanh(logits.div_(cap))
            logits = squash * cap
        # One fused log-softmax pass, then everything in its buffer: on a CPU this
        # loss is ~30% of a quick-start step, and logsumexp + subtract + exp + a
        # masking multiply went over the (rows, vocab) block twice as often.
        logp = torch.log_softmax(logits, dim=-1)
        del logits
        loss_sum = loss_sum - torch.where(k, logp.gather(1, t).squeeze(1), 0.0).sum()
        if grad_hidden is None and grad_weight is None:
            continue
        # d loss_row / d logits_row = softmax(logits_row) - one_hot(target); 0 for ignored rows,
        # whose mask is applied on the small side of each product (rows x d_model, not rows x vocab).
        # The 1 / count of the mean comes at the end.
        g = logp.exp_()
        g.scatter_add_(1, t, torch.full_like(t, -1, dtype=g.dtype))
        if cap:
            g.mul_(1 - squash.square_())
        mask = k[:, None].to(g.dtype)
        if grad_hidden is not None:
            grad_hidden[rows] = (g @ weight).mul_(mask)
        if grad_weight is not None:
            grad_weight += g.T @ (h * mask.to(h.dtype))
    return loss_sum, keep.sum()


class _ChunkedLMLoss(torch.autograd.Function):
    """The loss of `chunked_lm_loss`, whose gradients are computed in forward and only scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, cap):
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        loss_sum, count = _chunk_loop(hidden, weight, targets, chunk_rows, cap, grad_hidden, grad_weight)
        if grad_hidden is not None:
            grad_hidden.div_(count)
        if grad_weight is not None:
            grad_weight = grad_weight.div_(count).to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_loss,
                None if grad_weight is None else grad_weight * grad_loss, None, None, None)


def _human(n):
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
