"""Helpers for the checkpoint, resume and bad-input tests (not a test module)."""

import contextlib
import os
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

from lmlab.config import validate, load_config
from lmlab.errors import LmlabError
from lmlab.rundir.metrics import read_metrics


def quiet(*args, **kwargs):
    pass


def series(run_dir, key="loss"):
    """[(step, value)] of one metric, in file order (duplicated or missing steps would show)."""
    return [(e["step"], e[key]) for e in read_metrics(Path(run_dir) / "metrics.jsonl") if key in e]


def events(run_dir, kind):
    return [e for e in read_metrics(Path(run_dir) / "metrics.jsonl") if e.get("kind") == kind]


def same_weights(a, b):
    wa, wb = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def snapshot(directory):
    """{relative path: bytes} of every file under directory: to show that nothing changed."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(directory):
    """Temporary or half-deleted files that a write left behind."""
    return [p for p in Path(directory).rglob("*") if p.name.startswith(".") and (".tmp" in p.name or ".old-" in p.name)]


def schedules_available(candidates=("cosine", "wsd", "plateau")):
    """The LR schedules this lmlab accepts, of those the exactness tests cover."""
    found = []
    for name in candidates:
        try:
            validate(load_config(None, [f"optim.schedule={name}"]))
            found.append(name)
        except LmlabError:
            pass
    return found


@contextlib.contextmanager
def read_only(path):
    """Make a directory unwritable for this process: a read-only bind mount as root, else chmod."""
    path = Path(path)
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    mounted = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode == 0
    if mounted and subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True).returncode:
        subprocess.run(["umount", str(path)], capture_output=True)
        mounted = False
    if not mounted:
        import pytest

        pytest.skip("running as root and cannot make a read-only bind mount here")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)
