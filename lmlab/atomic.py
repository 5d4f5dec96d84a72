"""Atomic file writes: a reader sees the old file or the new one, never half.

Write to a temporary name in the same directory, fsync, then rename over the
target (rename is atomic on POSIX within one filesystem). `read_json` is the
one reader of the small JSON files lmlab and Hugging Face folders hold.
"""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def current_umask():
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_dir(parent, prefix):
    """mkdtemp in `parent`; a refusal (read-only, no permission, full) names `parent`, the folder the user gave.

    mkdtemp's own OSError names the random temporary path it tried
    (`ro/.shards.tmp-0819_wtl`), which tells the user nothing they can act on.
    """
    try:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(parent)) from None


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path; on success it is fsynced and renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # name the folder, not the temporary file that could not be made (see temp_dir)
        raise OSError(e.errno, e.strerror, str(path.parent)) from None
    os.close(fd)
    try:
        yield Path(tmp)
        umask = current_umask()
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files owner-only; give the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(target):
    """Yield an empty temporary directory that becomes `target` when the block succeeds.

    An existing non-empty `target` is an LmlabError (nothing is overwritten).
    """
    from lmlab.errors import LmlabError

    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise LmlabError(f"{target} already exists; give a new directory (nothing was overwritten)")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as e:  # name the folder, not the temporary one (see temp_dir)
        raise OSError(e.errno, e.strerror, str(target.parent)) from None
    try:
        yield tmp
        # mkdtemp, mkstemp and safetensors make private (0600 / 0700) files; a
        # folder meant for sharing gets the user's usual permissions instead.
        umask = current_umask()
        for path in tmp.rglob("*"):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        if target.exists():
            target.rmdir()  # an empty directory the user made for us
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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


def read_json(path, tolerant=False):
    """The JSON value in `path`.

    A missing, damaged or half-read file is None when `tolerant` (a reader of a run
    that may be being written right now), else an LmlabError naming the file.
    """
    from lmlab.errors import LmlabError

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if tolerant:
            return None
        raise LmlabError(f"{path} does not exist") from None
    except OSError as e:
        if tolerant:
            return None
        raise LmlabError(f"{path} cannot be read: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        if tolerant:
            return None
        raise LmlabError(f"{path} is not valid JSON: {e}") from None
