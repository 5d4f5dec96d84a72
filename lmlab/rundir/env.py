"""env.json: what a run ran on and from: versions, device, threads, the git
commit of the user's working directory, the command line."""

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from lmlab import atomic
from lmlab.rundir.metrics import jsonable


def _git(args, cwd):
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(cwd=None):
    """{'commit', 'dirty', 'root'} of the git repository holding cwd, or None outside one."""
    cwd = cwd or os.getcwd()
    commit = _git(["rev-parse", "HEAD"], cwd)
    if not commit:
        return None
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    return {"commit": commit, "dirty": bool(status), "root": _git(["rev-parse", "--show-toplevel"], cwd)}


def cpu_name():
    """The CPU model as /proc/cpuinfo names it (the platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device=None, precision=None, **extra):
    """What the run ran on and from, as a dict for env.json."""
    import numpy
    import tokenizers
    import torch

    from lmlab.version import __version__

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "lmlab": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "numpy": numpy.__version__, "tokenizers": tokenizers.__version__,
        "platform": platform.platform(), "hostname": platform.node(), "cpu": cpu_name(),
        "cpu_count": os.cpu_count(), "gpus": gpus, "device": str(device) if device is not None else None,
        "precision": precision, "threads": torch.get_num_threads(), **extra,
        "git": git_state(), "cwd": os.getcwd(), "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_env(run_dir, **info):
    """env.json in the run directory (see `environment` for the fields)."""
    atomic.write_text(Path(run_dir) / "env.json", json.dumps(jsonable(environment(**info)), indent=2) + "\n")
