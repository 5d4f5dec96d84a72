"""Atomic file writes: a reader sees the old file or the new one, never half.

Write to a temporary name in the same directory, fsync, then rename over the
target (rename is atomic on POSIX within one filesystem).
"""

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path; on success it is fsynced and renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files owner-only; give the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path, text):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_bytes(path, data):
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_tensors(save, obj, path):
    """`save(obj, path)` for a safetensors writer (save_file, save_model); a failed write is an OSError.

    safetensors reports a full disk or a missing permission as its own error type
    ("... I/O error: No space left on device (os error 28)"); callers that handle
    a disk that says no need the OSError it is.
    """
    import re

    try:
        save(obj, str(path))
    except Exception as e:
        found = re.search(r"os error (\d+)", str(e))
        if type(e).__name__ != "SafetensorError" or not found:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None
