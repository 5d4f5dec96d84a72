"""End the processes of a torchrun job that stopped answering, once a collective has timed out.

Why: when one rank hangs (a stuck read, a wedged device; SIGSTOP in the
tests), the others fail after `train.collective_timeout` and exit. torchrun
then sends SIGTERM to the hung process, which cannot act on it, and SIGKILLs
it only 30 s later. torch 2.13's torchrun takes those 30 s from a fixed
default on this path: its `--shutdown-timeout` (TORCH_ELASTIC_SHUTDOWN_TIMEOUT)
is not used when a worker fails (measured: the gap stays 30 s with
`--shutdown-timeout 2`; torch/distributed/elastic/multiprocessing/api.py,
SubprocessContext._poll calls close() with its default; upstream
pytorch/pytorch#192815). So the job would outlive the timeout by 30 s.

Design choices:
- The rank that met the timeout sends SIGKILL itself, after writing the failed
  summary: what torchrun would do 30 s later, done at once. By then every
  other process of the job has either hung (it did not answer for
  collective_timeout seconds) or is failing the same way (it writes the same
  summary; only its duplicate line may be cut short).
- Only on a timeout: a peer that died closes its connections, and torchrun
  ends the job within a second without help.
- Only processes of this job on this machine: each rank's pid is gathered when
  the process group starts (one small collective), and a pid is signalled only
  if it is still a child of this process's parent (the torchrun agent), read
  from /proc, so a pid the system reused is never touched. Without /proc
  (not Linux) nothing is signalled and torchrun ends the job as before.
  Ranks on other machines are ended by their own machine's surviving ranks.
"""

import os
import signal
from pathlib import Path

PROC = Path("/proc")


def gather_pids(group):
    """Every rank's pid, in rank order (collective over `group`; called once, when the process group starts)."""
    import torch.distributed as dist

    pids = [None] * dist.get_world_size(group)
    dist.all_gather_object(pids, os.getpid(), group=group)
    return pids


def end_local_peers(pids):
    """SIGKILL the processes among `pids` that are this machine's other workers of the job; returns those pids."""
    ended = []
    for pid in pids or ():
        if pid != os.getpid() and _sibling(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:  # it ended meanwhile, or is not ours to signal
                continue
            ended.append(pid)
    return ended


def _sibling(pid):
    """Whether `pid` is a live (not zombie) child of this process's parent, per /proc/PID/stat."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
    return fields[0] != "Z" and int(fields[1]) == os.getppid()
