"""Speed and memory of a run: model FLOPs utilisation (MFU) against the device's peak, and peak memory.

Design choices:
- MFU = tokens/s x training FLOPs per token / peak FLOP/s (PaLM, appendix B).
  FLOPs per token come from `Transformer.flops_per_token` (6N + 12 L d T).
- A GPU's peak comes from a table of common data-center and desktop GPUs:
  dense (no 2:4 sparsity) tensor-core FLOP/s for bf16 / fp16 with fp32
  accumulation, and plain fp32 FLOP/s for fp32 (PyTorch leaves TF32 off for
  matmuls unless asked, so fp32 training does not reach the TF32 peak).
- A CPU (or a GPU not in the table) has no data-sheet number worth trusting:
  its peak is measured, once per process, as the best rate of square
  matmuls in the training dtype over about 0.3 s. On a machine shared with
  other work that number is low and MFU high (even > 1): set
  `train.peak_tflops` to compare runs against one fixed peak. It overrides
  the table too. The number used and where it came from go to env.json.
- Peak memory: what torch allocated on CUDA; on CPU the process's peak
  resident set (everything the Python process holds, not only tensors).
"""

import functools
import re
import resource
import sys
import time

import torch

# (name pattern, bf16/fp16 dense tensor TFLOP/s, fp32 TFLOP/s) from the vendors' data sheets.
# Checked in order against torch.cuda.get_device_name(): more specific names first.
GPU_PEAK_TFLOPS = [
    (r"H100.*PCIe", 756.0, 51.2),
    (r"H100|H200|H800|GH200", 989.4, 66.9),  # SXM
    (r"\bH20\b", 148.0, 44.0),
    (r"A100|A800", 312.0, 19.5),
    (r"\bA10\b", 125.0, 31.2),
    (r"L40S", 362.1, 91.6),
    (r"\bL40\b", 181.0, 90.5),
    (r"\bL20\b", 119.5, 59.8),
    (r"\bL4\b", 121.0, 30.3),
    (r"RTX A6000", 154.8, 38.7),
    (r"4090", 165.2, 82.6),
    (r"3090 Ti", 80.0, 40.0),
    (r"3090", 71.0, 35.6),
    (r"V100", 125.0, 15.7),  # fp16 only: V100 has no bf16
    (r"\bT4\b", 65.0, 8.1),  # fp16 only
]
MEASURE_SECONDS = 0.3
# Square matmul sides tried. On CPU the best rate comes from matrices that fit the caches (on the
# 2-core test machine 512 reaches ~210 GFLOP/s, 1024 only ~70); 4096 keeps a GPU busy.
MEASURE_SIZES = {"cpu": (256, 512, 1024)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def table_peak(device_name, precision):
    """Peak FLOP/s of a GPU by name from the table, or None when it is not listed."""
    for pattern, half, single in GPU_PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return (single if precision == "fp32" else half) * 1e12
    return None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@functools.cache
def measured_peak(device, precision, threads):
    """Best FLOP/s of square matmuls in the training dtype on `device` over ~0.3 s (cached per process)."""
    sizes = MEASURE_SIZES.get(device.type, (4096,))
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(DTYPES[precision])
        b = torch.randn(n, n, device=device).to(DTYPES[precision])
        spent = 0.0
        for i in range(1000):
            start = time.perf_counter()
            a @ b
            _sync(device)
            took = time.perf_counter() - start
            if i > 0:  # the first call pays for allocation and thread start-up
                best = max(best, 2 * n**3 / took)
            spent += took
            if spent > MEASURE_SECONDS / len(sizes) and i > 1:
                break
    return best


def peak_flops(device, precision, override_tflops=0.0):
    """(FLOP/s, where the number came from) for MFU: the config, the GPU table, or a measurement."""
    if override_tflops > 0:
        return override_tflops * 1e12, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = table_peak(name, precision)
        if peak:
            return peak, f"table: {name} {precision}"
    peak = measured_peak(device, precision, torch.get_num_threads())
    sides = "/".join(map(str, MEASURE_SIZES.get(device.type, (4096,))))
    return peak, f"measured: best {precision} square matmul ({sides}) on {device.type}, {torch.get_num_threads()} threads"


def mfu(tokens_per_s, flops_per_token, peak):
    """Model FLOPs utilisation: the share of the peak that the model's useful FLOPs reach."""
    if not peak or not tokens_per_s:
        return None
    return float(f"{tokens_per_s * flops_per_token / peak:.4g}")  # 4 digits: MFU of a tiny CPU model is ~1e-3


def peak_memory_mb(device):
    """Peak memory so far in MiB: torch's allocations on CUDA, the process's resident set elsewhere."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if device.type == "mps":
        return round(torch.mps.driver_allocated_memory() / 2**20, 1)  # current, MPS keeps no peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)
