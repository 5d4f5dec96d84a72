"""model.memory = M: Transformer-XL memory, the keys and values of a row's last M tokens carried to its next segment.

    segment s of a row:   queries at positions M .. M+T-1
                          keys    at positions 0 .. M-1 (memory, from segment s-1 and before) and M .. M+T-1

Design choices:
- One `Memory` per stream of rows (per micro-batch of a step), outside the
  model: the weights stay exactly those of a model without memory, so a run
  trained with memory exports and loads as a plain Llama (it then simply sees
  one segment at a time). With model.memory = 0 no Memory exists and nothing
  in the forward pass changes.
- Keys are kept *before* RoPE and rotated again at every segment: memory slot
  j sits at position j, the current segment after it, so the distance between
  any query and key is the true distance in the document (RoPE only sees
  distances), with tables of context_length + M positions.
- The memory is detached: gradients stay inside a segment (Transformer-XL's
  stop-gradient), so a step costs one segment's backward, whatever M.
- Each row has its own fill level: a row that starts a new document (the
  batch's `new_doc`, lmlab/data/stream.py) is emptied, and a slot not yet
  filled is masked, so a row never sees another document.
- A forward pass writes the new memory into `pending` and `commit` makes it
  current after the pass. Recomputation (activation checkpointing) reads the
  same old memory and writes the same pending values, so it changes nothing.
- `state_dict` / `load_state_dict` hold the exact bytes, for checkpoints: a
  resumed run carries on with the memory the interrupted one had.
"""

import base64

import numpy as np
import torch

from lmlab.model.layers import apply_rope


class Memory:
    """Keys (pre-RoPE) and values of the last `size` tokens of each of `batch_size` rows, for every layer."""

    def __init__(self, size, n_layers, batch_size, n_kv_heads, head_dim, device=None, dtype=torch.float32):
        shape = (n_layers, batch_size, n_kv_heads, size, head_dim)
        self.size, self.batch_size = size, batch_size
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.filled = torch.zeros(batch_size, dtype=torch.long, device=device)  # valid trailing slots per row
        self.pending = {}

    def reset(self, rows=None):
        """Empty the memory of `rows` (a bool tensor: the rows starting a new document), or of every row."""
        if rows is None:
            self.filled.zero_()
        else:
            self.filled[rows.to(self.filled.device)] = 0

    def segment(self, T, rope):
        """The view one forward pass of T tokens uses: the attention mask, RoPE tables, old keys and values."""
        return SegmentView(self, T, rope)

    def commit(self, T):
        """After the forward pass: the new keys and values become the memory, each row holds T more tokens."""
        for layer, (k, v) in self.pending.items():
            self.k[layer], self.v[layer] = k, v
        self.pending = {}
        self.filled = (self.filled + T).clamp(max=self.size)

    def state_dict(self):
        """The memory's exact bytes as JSON-able values (for a checkpoint's state.json)."""
        return {"dtype": str(self.k.dtype).removeprefix("torch."), "shape": list(self.k.shape),
                **{name: _b64(getattr(self, name)) for name in ("k", "v", "filled")}}

    def load_state_dict(self, state):
        dtype = getattr(torch, state["dtype"])
        shape = tuple(state["shape"])
        if shape != tuple(self.k.shape):
            raise ValueError(f"saved memory has shape {shape}, this model's is {tuple(self.k.shape)}")
        device = self.k.device
        self.k = _unb64(state["k"], dtype, shape).to(device)
        self.v = _unb64(state["v"], dtype, shape).to(device)
        self.filled = _unb64(state["filled"], torch.long, (self.batch_size,)).to(device)


class SegmentView:
    """What every layer needs from the memory during one forward pass of T tokens."""

    def __init__(self, memory, T, rope):
        self.memory, self.rope = memory, rope
        M, device = memory.size, memory.filled.device
        slot = torch.arange(M, device=device)
        seen = slot[None, :] >= M - memory.filled[:, None]  # (B, M): filled slots are the last ones
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        self.mask = torch.cat([seen[:, None, :].expand(-1, T, -1), causal.expand(len(seen), -1, -1)], dim=2)[:, None]

    def join(self, layer, q, k, v):
        """(q, keys, values, mask) for attention over memory + segment; stores the layer's new memory.

        q, k, v: (B, heads, T, head_dim) with k before RoPE.
        """
        memory, M = self.memory, self.memory.size
        old_k, old_v = memory.k[layer].to(k.dtype), memory.v[layer].to(v.dtype)
        keys, values = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        memory.pending[layer] = (keys[:, :, -M:].detach().to(memory.k.dtype), values[:, :, -M:].detach().to(memory.v.dtype))
        if self.rope is not None:
            cos, sin = self.rope
            q, keys = apply_rope(q, cos[M:], sin[M:]), apply_rope(keys, cos, sin)
        return q, keys, values, self.mask


def _b64(tensor):
    return base64.b64encode(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).decode("ascii")


def _unb64(text, dtype, shape):
    raw = torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())
    return raw.view(dtype).reshape(shape)


def inner_model(model):
    """The Transformer inside DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model
