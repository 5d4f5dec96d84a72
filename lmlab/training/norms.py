"""Per-layer norms of weights, gradients and activations, now and then: the debugging view of a run.

CS336's advice for a run that misbehaves is to look at the norms layer by
layer: a gradient that explodes in one block, a residual stream that grows
without bound (no norm, post-norm), an attention output that dies. Every
`train.norms_every` steps the trainer records one event of kind "norms":

    {"step": 100, "kind": "norms", "weight_l2": {"layers.0.self_attn": 5.1, ...},
     "grad_l2": {...}, "act_rms": {"embed_tokens": 0.02, "layers.0": 0.9, ...},
     "key_l2": {"layers.0": 3.5, ...}}

Design choices:
- Parameters are grouped by the module that owns them, one level inside a
  block (`layers.0.self_attn`, `layers.0.mlp`, `layers.0.input_layernorm`), plus
  `embed_tokens`, `norm`, `lm_head`; a tied matrix is reported once.
- Gradient norms are read after unscaling and before clipping: the gradient
  the model actually produced, not the clipped one.
- Activations come from a separate forward pass of the step's last
  micro-batch with forward hooks, in eval mode and without autograd, on the
  uncompiled model: the training step itself is untouched (no hooks in the
  compiled graph, no extra dropout randomness), and steps in between pay
  nothing but a modulo.
- RMS for activations (independent of batch and width), L2 for weights and
  gradients (what clipping and weight decay act on).
- key_l2: the mean L2 norm of one head's key vector at one position, per
  layer, as k_proj makes it (before QK-norm, KeyNorm or RoPE, which keeps
  norms). Attention logits q.k/sqrt(head_dim) grow with |k|: its growth over
  training is what KeyNorm (keys normalised to length 1) takes away.
"""

import torch

from lmlab.model.fused import part_forward_hook


def group_of(name):
    """'layers.0.self_attn.q_proj.weight' -> 'layers.0.self_attn'; 'embed_tokens.weight' -> 'embed_tokens'."""
    parts = name.split(".")
    return ".".join(parts[:3]) if parts[0] == "layers" else parts[0]


class NormProbe:
    def __init__(self, model, every):
        self.model, self.every = model, every
        self.groups = {}
        for name, p in model.named_parameters():
            self.groups.setdefault(group_of(name), []).append(p)
        self._grads = None

    def due(self, step):
        return bool(self.every) and step % self.every == 0

    @torch.no_grad()
    def _l2(self, tensors):
        """{group: L2 norm over its tensors}, computed on the device and synced once."""
        names, norms = [], []
        for group, ts in tensors.items():
            ts = [t.full_tensor() if hasattr(t, "full_tensor") else t for t in ts if t is not None]  # FSDP shards
            if ts:
                names.append(group)
                norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in ts])))
        return dict(zip(names, torch.stack(norms).tolist())) if norms else {}

    def capture_grads(self, step):
        """On a norms step (step counted from 1), remember the per-group gradient norms."""
        if self.due(step):
            self._grads = self._l2({g: [p.grad for p in ps] for g, ps in self.groups.items()})

    @torch.no_grad()
    def activations(self, x):
        """({module: RMS of its output} for the embedding, every block, its attention and MLP, the final norm;
        {layer: mean L2 norm of a head's key})."""
        model, found, hooks = self.model, {}, []

        def hook(name):
            def record(module, args, output):
                found[name] = output.detach().float().pow(2).mean().sqrt()
            return record

        def key_hook(name, head_dim):
            def record(module, args, output):
                keys[name] = output.detach().float().unflatten(-1, (-1, head_dim)).norm(dim=-1).mean()
            return record

        keys = {}

        watched = [("embed_tokens", model.embed_tokens)]
        for i, block in enumerate(model.layers):
            watched += [(f"layers.{i}.self_attn", block.self_attn), (f"layers.{i}.mlp", block.mlp),
                        (f"layers.{i}", block)]
        watched.append(("norm", model.norm))
        was_training = model.training
        try:
            hooks = [module.register_forward_hook(hook(name)) for name, module in watched]
            hooks += [part_forward_hook(block.self_attn, "k_proj", key_hook(f"layers.{i}", block.self_attn.head_dim))
                      for i, block in enumerate(model.layers)]
            model.eval()
            model(x)
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
        order = [name for name, _ in watched if name in found]
        values = torch.stack([found[n] for n in order] + list(keys.values())).tolist()
        return dict(zip(order, values)), dict(zip(keys, values[len(order):]))

    def event(self, x):
        """The norms event for this step: weights now, gradients as captured, activations on x."""
        grads, self._grads = self._grads or {}, None
        acts, keys = self.activations(x)
        return {"kind": "norms", "weight_l2": _round(self._l2(self.groups)), "grad_l2": _round(grads),
                "act_rms": _round(acts), "key_l2": _round(keys)}


def _round(values):
    return {k: float(f"{v:.6g}") for k, v in values.items()}
