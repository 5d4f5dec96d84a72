"""Run-time fusion of the projections that read the same input: q/k/v, and SwiGLU's gate/up.

    fuse_projections(model)     # in place, before the optimizer is built; returns the model
    unfuse_projections(model)   # back to separate nn.Linear modules

Design choices:
- Why: at small widths a CPU training step pays per matmul call as much as
  per FLOP. Three projections of the same x are three GEMMs forward and six
  backward; one packed (q+k+v, d) matrix makes them one and two, as nanoGPT's
  `c_attn` does. Same FLOPs, fewer and larger calls.
- Only the run-time layout changes: one packed nn.Linear (`qkv_proj`,
  `gate_up_proj`) whose rows are the parts' rows stacked in order. The
  module's state_dict still shows the parts under their Hugging Face names
  (`q_proj.weight`, ...), split off the packed tensor by a state_dict hook,
  and load_state_dict takes those names and stacks them again (a load
  pre-hook on the same module). So checkpoints, exports, `lmlab.model.weights`
  and parity with transformers never see the packing.
- The hooks sit on the module that owns the projections (Attention, SwiGLU),
  not on the packed Linear: load_state_dict checks a module's own keys for
  unexpected names before it visits the children.
- The packed module takes the parts' place in the owner's module order, so
  state_dict keys keep the unfused order and the parameters keep theirs
  (the packed one where the first part was).
- What the optimizer sees does change: one parameter instead of three. AdamW
  is elementwise, so the step is the same; Muon orthogonalises whole
  matrices, so it is not fused under Muon (see lmlab.training.fastpaths).
"""

import torch
from torch import nn

# owner class name -> (packed module's name, the parts it replaces, in order)
PACKS = {"Attention": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
         "SwiGLU": ("gate_up_proj", ("gate_proj", "up_proj"))}


class PackedLinear(nn.Linear):
    """One nn.Linear computing several of them at once: its output is theirs side by side.

    `parts` names them and `sizes` gives their output widths, in order;
    `split(x)` returns their outputs (views of one result).
    """

    def __init__(self, parts, sizes, in_features, bias, device=None, dtype=None):
        super().__init__(in_features, sum(sizes), bias=bias, device=device, dtype=dtype)
        self.parts, self.sizes = tuple(parts), tuple(sizes)

    def split(self, x):
        return self(x).split(self.sizes, dim=-1)


def fuse_projections(model, owners=tuple(PACKS)):
    """Replace every Attention's q/k/v and every SwiGLU's gate/up by one PackedLinear, weights kept; in place.

    `owners` limits it to some of the classes in PACKS ("Attention", "SwiGLU").
    """
    for owner in list(model.modules()):
        pack = PACKS.get(type(owner).__name__)
        if pack is not None and type(owner).__name__ in owners and getattr(owner, pack[0], None) is None:
            _fuse(owner, *pack)
    return model


def unfuse_projections(model):
    """Undo fuse_projections: separate nn.Linear modules holding the packed weights; in place."""
    for owner in list(model.modules()):
        pack = PACKS.get(type(owner).__name__)
        if pack is not None and getattr(owner, pack[0], None) is not None:
            _unfuse(owner, *pack)
    return model


def is_fused(model):
    return any(isinstance(m, PackedLinear) for m in model.modules())


@torch.no_grad()
def _fuse(owner, name, parts):
    linears = [getattr(owner, part) for part in parts]
    first = linears[0]
    packed = PackedLinear(parts, [lin.out_features for lin in linears], first.in_features, first.bias is not None,
                          device=first.weight.device, dtype=first.weight.dtype)
    packed.weight.copy_(torch.cat([lin.weight for lin in linears]))
    if packed.bias is not None:
        packed.bias.copy_(torch.cat([lin.bias for lin in linears]))
    packed.train(first.training)
    _replace(owner, {parts[0]: (name, packed)}, drop=parts[1:])
    owner.__dict__.pop(name, None)  # the owner's `name = None` placeholder, now a module
    owner._fused_hooks = (owner.register_state_dict_post_hook(_split_state),
                          owner.register_load_state_dict_pre_hook(_merge_state))


@torch.no_grad()
def _unfuse(owner, name, parts):
    packed = getattr(owner, name)
    weights = packed.weight.split(packed.sizes)
    biases = packed.bias.split(packed.sizes) if packed.bias is not None else [None] * len(parts)
    linears = {}
    for part, w, b in zip(parts, weights, biases):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
        linears[part] = lin.train(packed.training)
    _replace(owner, {name: None}, insert=linears)
    for hook in owner.__dict__.pop("_fused_hooks"):
        hook.remove()
    object.__setattr__(owner, name, None)


def _replace(owner, swap, drop=(), insert=None):
    """Rebuild owner._modules in order: a key in `swap` becomes (new name, module), or `insert`'s modules; `drop` goes."""
    modules = {}
    for key, module in owner._modules.items():
        if key in drop:
            continue
        if key in swap and swap[key] is not None:
            modules[swap[key][0]] = swap[key][1]
        elif key in swap:
            modules.update(insert)
        else:
            modules[key] = module
    owner._modules.clear()
    owner._modules.update(modules)


def _split_state(owner, state, prefix, local_metadata):
    """state_dict hook: the packed tensors leave as their parts, under the parts' names and in their place."""
    name, parts = PACKS[type(owner).__name__]
    packed = getattr(owner, name)
    items, mine = list(state.items()), prefix + name + "."
    packed_items = {key[len(mine):]: value for key, value in items if key.startswith(mine)}  # weight (and bias)
    pieces = {tensor_name: value.split(packed.sizes) for tensor_name, value in packed_items.items()}
    state.clear()
    for key, value in items:
        if not key.startswith(mine):
            state[key] = value
        elif key == mine + "weight":  # all parts here, each with its weight then bias, as nn.Linear orders them
            for n, part in enumerate(parts):
                for tensor_name in packed_items:
                    state[f"{prefix}{part}.{tensor_name}"] = pieces[tensor_name][n]


def _merge_state(owner, state, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """load_state_dict pre-hook: parts given under their names are stacked into the packed tensor's key."""
    name, parts = PACKS[type(owner).__name__]
    for tensor_name in ("weight", "bias"):
        keys = [f"{prefix}{part}.{tensor_name}" for part in parts]
        if all(key in state for key in keys):
            state[f"{prefix}{name}.{tensor_name}"] = torch.cat([state.pop(key) for key in keys])


def part_forward_hook(owner, part, hook):
    """register_forward_hook for one part (e.g. "k_proj") whether or not it is packed: the hook sees its output."""
    packed = getattr(owner, PACKS[type(owner).__name__][0], None)
    if packed is None:
        return getattr(owner, part).register_forward_hook(hook)
    index = packed.parts.index(part)

    def sliced(module, args, output):
        return hook(module, args, output.split(packed.sizes, dim=-1)[index])

    return packed.register_forward_hook(sliced)


# --- optimizer state: saved as if unpacked ----------------------------------------------


def _packed_modules(model):
    """{id(parameter): its PackedLinear} for every packed weight and bias in the model."""
    return {id(p): m for m in model.modules() if isinstance(m, PackedLinear) for p in (m.weight, m.bias)
            if p is not None}


def _unfused_order(params, owners):
    """[(parameter, part n or None)] of one optimizer group, in the order the unfused model's parameters would
    have: a packed weight and bias that share the group become w0, b0, w1, b1, ... (nn.Linear by nn.Linear)."""
    out, done = [], set()
    for p in params:
        m = owners.get(id(p))
        if m is None:
            out.append((p, None))
        elif id(p) not in done:
            together = [t for t in (m.weight, m.bias) if t is not None and any(t is q for q in params)]
            out += [(t, n) for n in range(len(m.sizes)) for t in together]
            done.update(id(t) for t in together)
    return out


def unpacked_optimizer_state(model, optimizer, state):
    """optimizer.state_dict() `state` as the unfused model's optimizer would hold it: each packed entry split.

    Checkpoints keep this layout, so a run resumes with or without packing
    (and from checkpoints made before it). Exact: the parts are copies.
    """
    owners = _packed_modules(model)
    if not owners:
        return state
    old_index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    new_state, groups, index = {}, [], 0
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        params = []
        for p, n in _unfused_order(group["params"], owners):
            entry = state["state"].get(old_index[id(p)])
            if entry is not None:
                sizes = owners[id(p)].sizes if n is not None else None
                new_state[index] = {key: _piece(value, p, sizes, n) for key, value in entry.items()}
            params.append(index)
            index += 1
        groups.append({**saved, "params": params})
    return {"state": new_state, "param_groups": groups}


def packed_optimizer_state(model, optimizer, state):
    """The inverse of unpacked_optimizer_state, for loading into the optimizer of a packed model.

    A state whose groups do not have the unfused lengths (already packed, or
    foreign) is returned as it is, for the optimizer to judge.
    """
    owners = _packed_modules(model)
    orders = [_unfused_order(g["params"], owners) for g in optimizer.param_groups]
    if not owners or [len(g["params"]) for g in state["param_groups"]] != [len(o) for o in orders]:
        return state
    new_state, groups, index = {}, [], 0
    for group, saved, order in zip(optimizer.param_groups, state["param_groups"], orders):
        params = []
        for p in group["params"]:
            ids = [i for i, (q, _) in zip(saved["params"], order) if q is p]  # its parts, in order
            entries = [state["state"].get(i, state["state"].get(str(i))) for i in ids]
            if all(e is not None for e in entries):
                new_state[index] = {key: _merge([e[key] for e in entries], p) for key in entries[0]}
            params.append(index)
            index += 1
        groups.append({**saved, "params": params})
    return {"state": new_state, "param_groups": groups}


def _piece(value, param, sizes, n):
    """Part n of a per-element state tensor of a packed parameter (anything else, e.g. `step`, copied)."""
    if sizes is None:
        return value
    if torch.is_tensor(value) and value.shape == param.shape:
        return value.split(sizes)[n].clone()
    return value.clone() if torch.is_tensor(value) else value


def _merge(values, param):
    if torch.is_tensor(values[0]) and values[0].dim() == param.dim() and values[0].dim() > 0 and len(values) > 1:
        return torch.cat(values)
    return values[0]
