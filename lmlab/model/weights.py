"""Weights in and out of a module: the one place that knows about the tied LM head.

Design choices:
- A tied head (`lm_head.weight` is the same tensor as `embed_tokens.weight`)
  is stored once, under the embedding's name, as Hugging Face stores it;
  loading puts it back. Every file lmlab writes (model.safetensors, a
  checkpoint's model.safetensors, an export) goes through `to_save`, and every
  load through `to_load`, so the rule is written once.
- Any module works: the tie is read from `module.config.tie_embeddings` when
  there is one, else seen in the module itself (the two parameters are one).
- A state that does not fit is a `WeightsMismatch` naming what is missing,
  unexpected or of the wrong shape; callers turn it into their own error
  (a damaged checkpoint, a foreign Hugging Face folder).
"""

from pathlib import Path

HEAD, EMBEDDING = "lm_head.weight", "embed_tokens.weight"


class WeightsMismatch(ValueError):
    """A state dict that does not fit the module; the message lists the first few names."""


def tied_head(module):
    """True when the module's LM head shares the input embedding's matrix."""
    config = getattr(module, "config", None)
    if hasattr(config, "tie_embeddings"):
        return bool(config.tie_embeddings)
    head, embed = getattr(module, "lm_head", None), getattr(module, "embed_tokens", None)
    return head is not None and embed is not None and head.weight is embed.weight


def to_save(module, state=None):
    """The state as files hold it: CPU tensors, contiguous, a tied head left out.

    `state` is a full state dict gathered elsewhere (FSDP's rank 0); by default the module's own.
    """
    if state is None:
        state = module.state_dict()
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    if tied_head(module):
        state.pop(HEAD, None)
    return state


def to_load(module, state):
    """The state as `module.load_state_dict` wants it: a tied head is the embedding, whatever the file held.

    Raises WeightsMismatch when names or shapes do not fit the module.
    """
    state = dict(state)
    if tied_head(module):
        state.pop(HEAD, None)  # some files store the tied head anyway; it is the embedding
        if EMBEDDING in state:
            state[HEAD] = state[EMBEDDING]
    check_fits(module, state)
    return state


def check_fits(module, state):
    """WeightsMismatch unless `state` has exactly the module's names, each with the module's shape."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(name for name in set(state) & set(expected)
                         if tuple(state[name].shape) != tuple(expected[name].shape))
    problems = [f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                for label, names in (("missing", missing), ("unexpected", unexpected),
                                     ("wrong shape", wrong_shape)) if names]
    if problems:
        raise WeightsMismatch("; ".join(problems))


def load(module, state):
    """Put `state` into `module` (tied head restored, names and shapes checked)."""
    module.load_state_dict(to_load(module, state))
    return module


def save_file(module, path, state=None):
    """Write the module's weights (or `state`) to a safetensors file, atomically."""
    from safetensors.torch import save_file as write

    from lmlab import atomic

    with atomic.atomic_path(Path(path)) as tmp:
        atomic.write_tensors(write, to_save(module, state), tmp)  # a full disk is an OSError


def load_file(module, path, device="cpu"):
    """Read a safetensors file into `module`; WeightsMismatch when it does not fit."""
    from safetensors.torch import load_file as read

    return load(module, read(str(path), device=str(device)))
