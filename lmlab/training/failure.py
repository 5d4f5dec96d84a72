"""A run that an error ends once it has started: summary.json says `failed`, why and where; one line says what next.

    lmlab: error: run runs/X failed after step 12: <reason>; its newest checkpoint is step_000010:
                  continue with `lmlab train --resume runs/X`

Design choices:
- Every error between the first step and the end (the loop, the last
  checkpoint, the final evaluation and weights) passes through `fail`, so a
  run ended by an error says so in summary.json (status failed, reason, the
  last step completed, the newest checkpoint) instead of looking UNFINISHED.
  Errors before the first step are refused by setup before the run directory
  is written, as before.
- Expected faults become one line (RunFailed, an LmlabError): a damaged shard,
  a checkpoint or final weights the disk refused, another process of a
  torchrun job that died or stopped answering. Anything else is a bug: its
  summary is written too, and its traceback is kept.
- Under torchrun every rank that meets the error writes the summary (the run
  directory may not be shared between machines; writes are atomic). A rank that
  only saw a peer disappear leaves alone a failure summary that the rank with
  the real error wrote during this attempt: the real reason stays.
- The summary is written while the stop-signal handlers are still installed:
  torchrun sends SIGTERM to the survivors when a worker dies, and that must
  not kill the process half-way through (it only sets a flag by then).
- A rank that timed out waiting for a peer ends this machine's unanswering
  peers with SIGKILL once the summary is written (hung.py: torchrun would
  do it only 30 s later), and its line names the processes it ended.
- The newest checkpoint is named from the directory listing: a step_* directory
  is complete by construction (checkpoint.py renames it into place), and
  `--resume` verifies its sha256 before using it.
"""

import errno
import json
import re
import time
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.rundir.metrics import write_summary
from lmlab.rundir.status import FAILED
from lmlab.training.checkpoint import list_checkpoints
from lmlab.training.hung import end_local_peers

DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused")
TIMEOUT_SIGNS = ("Timed out", "timed out", "Timeout", "timeout")


class RunFailed(LmlabError):
    """An expected fault ended a started run; its summary.json says failed."""


def fail(run, state, error):
    """Record that `error` ended the run at `state`, then raise: RunFailed for expected faults, else `error` itself."""
    expected, peer, reason = describe(error, run.config.train)
    checkpoints = list_checkpoints(run.run_dir) if run.run_dir else []
    newest = checkpoints[-1][1].name if checkpoints else None
    unwritten = _write(run, state, reason, newest, peer and not isinstance(error, RunFailed))
    if not expected:
        raise error
    if peer and _timed_out(error):  # torchrun would SIGKILL the hung ranks only 30 s later (hung.py)
        ended = end_local_peers(run.parallel.pids)
        reason += f"; ended process {', '.join(map(str, ended))} on this machine" if ended else ""
    who = f"rank {run.parallel.rank}: " if run.parallel.active else ""
    where = f"run {run.run_dir} failed after step {state.step}: {reason}; "
    if getattr(error, "next_step", None):  # the fault says itself how to go on (final weights)
        what_next = error.next_step
    elif newest:
        what_next = (f"its newest checkpoint is {newest}: continue with `lmlab train --resume {run.run_dir}`"
                     + (" under the same torchrun command" if run.parallel.active else ""))
    else:
        what_next = f"no checkpoint was written: `lmlab train --resume {run.run_dir}` starts it again from step 0"
    raise RunFailed(who + where + what_next + unwritten) from None


def describe(error, train_config):
    """(expected, a peer's failure, reason) of an error that ended a run."""
    if isinstance(error, LmlabError):
        return True, False, str(error)
    if isinstance(error, OSError) and error.errno in DISK_ERRORS:
        return True, False, f"{error.strerror} ({_target(error.filename) or 'while writing'})"
    text = str(error)
    if _distributed(error):
        if _timed_out(error):
            return True, True, (f"another process of the job did not answer within train.collective_timeout="
                                f"{train_config.collective_timeout:g}s (hung or stopped)")
        cause = next((sign for sign in PEER_SIGNS if sign in text), text.strip().splitlines()[-1][:200])
        return True, True, f"another process of the job stopped ({cause})"
    return False, False, f"{type(error).__name__}: {text}"


def _timed_out(error):
    return any(sign in str(error) for sign in TIMEOUT_SIGNS)


def _target(filename):
    """The file a write was for: atomic.py's temporary `.NAME.XXXXXXXX.tmp` named as NAME, in the same folder."""
    if not filename:
        return None
    path = Path(str(filename))
    match = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", path.name)
    return str(path.with_name(match.group(1))) if match else str(path)


def _distributed(error):
    """Whether `error` came out of a collective (gloo / NCCL): a peer died, hung, or closed its connection."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(s in text for s in ("gloo", "Gloo", "NCCL", "ProcessGroup",
                                                                      *PEER_SIGNS))


def _write(run, state, reason, newest, peer):
    """summary.json with status failed; '' when written, else a note for the message saying why not."""
    if run.run_dir is None or not Path(run.run_dir).is_dir():
        return ""
    path = Path(run.run_dir) / "summary.json"
    if peer and _failed_this_attempt(path, run):
        return ""  # the rank that met the real error has written it
    summary = {"status": FAILED, "reason": reason, "steps": state.step, "tokens": state.tokens,
               "elapsed_s": round(state.elapsed_s, 3), "final_train_loss": state.loss,
               "final_val_loss": state.val_loss, "best_val_loss": state.best_val if state.best_val < float("inf") else None,
               "checkpoint": newest, "parallel": run.parallel.mode, "world_size": run.parallel.world_size,
               "rank": run.parallel.rank}
    try:
        write_summary(run.run_dir, summary)
    except OSError as e:
        return f" (summary.json could not be written either: {e.strerror})"
    return ""


def _failed_this_attempt(path, run):
    """Whether summary.json already says failed and was written after this process set the run up."""
    started = time.time() - (time.perf_counter() - run.wall_start)
    try:
        return path.stat().st_mtime >= started and json.loads(path.read_text(encoding="utf-8"))["status"] == FAILED
    except (OSError, ValueError, KeyError):
        return False
