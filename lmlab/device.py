"""Device and precision: pick what the machine has, refuse what it has not.

Precision is explicit: parameters and optimizer state stay fp32; bf16 / fp16
run the forward pass under autocast (fp16 adds a grad scaler); the loss is
computed in fp32 either way (see `model.lm_loss`).
"""

import contextlib

import torch

from lmlab.errors import LmlabError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name):
    """'auto' -> cuda, mps or cpu; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LmlabError(f"train.device='{name}' is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LmlabError(
                f"train.device={name} but CUDA is not available on this machine "
                f"(torch {torch.__version__}); use train.device=cpu or train.device=auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LmlabError(f"train.device={name} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LmlabError(f"train.device={name} but MPS is not available; use train.device=cpu or auto")
    return device


def resolve_precision(name, device):
    """'auto' -> bf16 where the GPU supports it, else fp32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LmlabError("train.precision=bf16 but this GPU does not support bfloat16; use fp16 or fp32")
    return name


def autocast(precision, device):
    """Context manager running the forward pass in the chosen precision."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(precision, device):
    """A loss scaler for fp16 (whose small gradients underflow); a no-op otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
