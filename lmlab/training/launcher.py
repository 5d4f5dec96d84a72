"""torchrun's shutdown grace as a worker can see it, and a warning when a checkpoint would not fit in it.

Why: on SIGTERM (a preemption: SLURM's `--signal=TERM@120`) torchrun passes
the signal on to its workers and SIGKILLs them `--shutdown-timeout` seconds
later, 30 by default (measured with torch 2.13, docs/distributed.md). lmlab
uses that time to finish the step and write a checkpoint; one that takes
longer is cut off (the previous checkpoint stays: writes are atomic), and the
preempted job loses the steps since. Nothing says so until it happens, so
lmlab warns after a checkpoint that took more than half the grace.

Design choices:
- The grace as torchrun resolves it: its command-line flag (`--shutdown-timeout N`,
  `--shutdown_timeout=N`, read from the parent's /proc/PID/cmdline: the
  workers are torchrun's children), else PET_SHUTDOWN_TIMEOUT, else
  TORCH_ELASTIC_SHUTDOWN_TIMEOUT (both inherited by the workers), else 30.
  Without /proc (not Linux) the flag cannot be seen; the variables still can.
- Half the grace: the step under way must finish too, and a checkpoint's time
  varies with the disk's other load. Once per run, on the rank that logs.
- Under torchrun means TORCHELASTIC_RUN_ID is set (one process too: SIGTERM
  to torchrun reaches it the same way).
"""

import math
import os
from pathlib import Path

DEFAULT_S = 30  # torchrun's own default (torch/distributed/launcher/api.py)
FLAGS = ("--shutdown-timeout", "--shutdown_timeout")
_warned = set()  # run directories already warned about (a sweep trains several runs in one process)


def under_torchrun(environ=os.environ):
    return "TORCHELASTIC_RUN_ID" in environ


def shutdown_timeout(environ=os.environ, parent_args=None):
    """(seconds, what set it) of torchrun's grace between SIGTERM and SIGKILL."""
    args = _parent_args() if parent_args is None else parent_args
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in FLAGS:
            value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
            if value.strip().isdigit():
                return int(value), f"--shutdown-timeout {int(value)}"
    for name in ("PET_SHUTDOWN_TIMEOUT", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        if environ.get(name, "").strip().isdigit():
            return int(environ[name]), f"{name}={int(environ[name])}"
    return DEFAULT_S, "torchrun's default --shutdown-timeout"


def _parent_args():
    """The command line of this process's parent (torchrun for a worker); [] where /proc cannot tell."""
    try:
        return Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def checkpoint_grace_warning(run_dir, name, seconds, environ=os.environ):
    """The warning line when writing checkpoint `name` took more than half torchrun's grace; '' otherwise (or again)."""
    if not under_torchrun(environ) or str(run_dir) in _warned:
        return ""
    grace, source = shutdown_timeout(environ)
    if seconds <= grace / 2:
        return ""
    _warned.add(str(run_dir))
    advice = 10 * math.ceil(max(2 * seconds + 10, grace + 10) / 10)
    return (f"warning: writing checkpoint {name} took {seconds:.1f} s; on SIGTERM (a preemption) torchrun leaves "
            f"lmlab {grace} s ({source}) to finish the step and write one before it kills the processes: start "
            f"torchrun with --shutdown-timeout {advice} or more")
