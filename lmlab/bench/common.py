"""What every benchmark shares: the machine, side-by-side timing, peak memory and Markdown tables.

Design choices:
- Side by side means in turns: candidates run A, B, A, B, ... and each gets the
  median of its own turns, so a slow spell of a shared machine (other jobs,
  clock changes) falls on all of them alike; the ratio is what is trusted.
- Peak memory on CUDA is torch's own peak of allocated bytes. On CPU it is the
  rise of the process's peak resident set (VmHWM, reset through
  /proc/self/clear_refs) over the resident set before the measured code, with
  glibc told to return freed blocks of 64 KiB and more to the system at once
  (mallopt M_MMAP_THRESHOLD): without that, memory freed by one candidate
  would be counted for the next, or hidden from it.
"""

import contextlib
import ctypes
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time

import torch

from lmlab.errors import LmlabError

DEFAULT_VOCAB = 2048  # vocabulary of a benchmark shape that leaves it unset (the quick start's tokenizer)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 64 << 10


def machine(device=None):
    """{what: value} of the machine and software a benchmark ran on, for the results file."""
    from lmlab.version import __version__
    from lmlab.rundir.env import cpu_name, git_state

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(), "cores": os.cpu_count(), "torch threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "lmlab": __version__,
    }
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    git = git_state(os.path.dirname(os.path.abspath(__file__)))
    if git:
        info["commit"] = git["commit"][:10] + (" (dirty)" if git["dirty"] else "")
    return info


def model_config(shape, defaults=None):
    """The ModelConfig of a benchmark shape: a ModelConfig, or a dict of its fields over `defaults`.

    Vocabulary (0 follows a tokenizer; there is none here) and d_ff are
    resolved, init_from dropped (weights are random); unknown fields are an LmlabError.
    """
    from lmlab.config import ModelConfig

    if isinstance(shape, ModelConfig):
        config = dataclasses.replace(shape, init_from="")
    else:
        fields = {**(defaults or {}), **(shape or {})}
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(ModelConfig)})
        if unknown:
            raise LmlabError(f"unknown model field(s) in benchmark shape: {', '.join(unknown)}; "
                             "use ModelConfig field names (lmlab config --keys)")
        config = ModelConfig(**fields)
    return config.resolved(vocab_size=DEFAULT_VOCAB)


def transformers_model(model_config, hf_weights, device):
    """The reference: transformers' class for `model_config` (Llama; Qwen3 with qk_norm) holding lmlab's weights.

    hf_weights come from lmlab.model.hf.hf_state_dict, so both sides hold the same
    numbers; no bos / eos ids (nothing for generate's min_new_tokens to suppress);
    SDPA attention, as lmlab's.
    """
    import transformers

    from lmlab.model.hf import hf_architecture, hf_config

    config = transformers.AutoConfig.for_model(**hf_config(model_config, None, None, None),
                                               attn_implementation="sdpa")
    model = getattr(transformers, hf_architecture(model_config))(config)
    missing, unexpected = model.load_state_dict(hf_weights, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if model_config.tie_embeddings else set()):
        raise LmlabError(f"exported weights do not fit {type(model).__name__} (missing {missing}, unexpected "
                         f"{unexpected}); lmlab.model.hf and transformers {transformers.__version__} disagree")
    if model_config.tie_embeddings:
        model.tie_weights()  # a tied head is left out of the export on purpose
    return model.to(device)


def sync(device):
    """Wait for queued GPU work, so a clock reading means the work is done."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_side_by_side(candidates, repeats=5, warmup=1, device="cpu"):
    """{name: median seconds per call} for {name: zero-argument callable}, called in turns.

    Each candidate is first called `warmup` times (compilation, allocator growth,
    caches), then all are called in turn `repeats` times.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
        sync(device)
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def return_freed_memory():
    """Have glibc hand blocks of MMAP_THRESHOLD bytes and more straight back to the system when freed."""
    if sys.platform != "linux":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


@contextlib.contextmanager
def peak_memory(device="cpu"):
    """Measure the peak memory of the code in the block: `with peak_memory(dev) as peak: ...; peak.mib`.

    CUDA: torch's peak allocated bytes above those allocated at entry.
    CPU (Linux): the peak resident set above the resident set at entry.
    Elsewhere `peak.mib` stays None (no honest number to give).
    """
    device = torch.device(device)
    box = _Peak()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield box
        sync(device)
        box.mib = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        return
    if device.type != "cpu" or not return_freed_memory() or not os.path.exists("/proc/self/clear_refs"):
        yield box
        return
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    start = _status_kib("VmRSS")
    yield box
    box.mib = (_status_kib("VmHWM") - start) / 1024


class _Peak:
    mib = None


@dataclasses.dataclass
class Section:
    """One benchmark's result: a titled table (rows of dicts, [(key, heading)] columns) and notes.

    `markdown()` is what goes into benchmarks/RESULTS.md and what `lmlab bench`
    prints; `rows` are also written as JSON for later comparison.
    """

    title: str
    rows: list
    columns: list
    notes: list = dataclasses.field(default_factory=list)

    def markdown(self):
        parts = [f"### {self.title}", "", markdown_table(self.rows, self.columns)]
        if self.notes:
            parts += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(parts) + "\n"


def markdown_table(rows, columns):
    """A Markdown table of `rows` (dicts) with `columns` [(key, heading)], numbers formatted briefly."""
    lines = ["| " + " | ".join(heading for _, heading in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def _cell(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def machine_lines(info):
    """The machine dict as a Markdown bullet list."""
    return "\n".join(f"- {key}: {value}" for key, value in info.items())
