"""SIGINT and SIGTERM: finish the step, save a checkpoint, end the run as `interrupted`.

SIGTERM is what SLURM, Kubernetes and spot / pre-emptible instances send
before they kill a job; SIGINT is Ctrl-C.

Design choices:
- The handler only sets a flag; the loop checks it after each optimizer
  step, so what is saved is a step boundary: the run resumes from exactly there.
- A second SIGINT (Ctrl-C twice) exits at once (KeyboardInterrupt): no new
  checkpoint, the previous ones intact (checkpoint writes are atomic). A second
  SIGTERM is ignored: schedulers may send it more than once, and a SIGKILL
  follows their grace period anyway.
- Handlers are installed only from the main thread (Python allows no other)
  and the previous ones are put back when the loop ends.
- `lmlab train` exits with 128 + the signal number after such a stop (130
  for SIGINT, 143 for SIGTERM), as a shell reports a job ended by a signal;
  summary.json says status "interrupted" and "signal".
"""

import json
import signal
import threading
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    def __init__(self, log=print):
        self.log = log
        self.received = None  # name of the first signal, e.g. "SIGTERM"
        self._previous = {}

    def install(self):
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            self.log(f"{name}: finishing this step, then saving a checkpoint"
                     + (" (Ctrl-C again to quit at once)" if signum == signal.SIGINT else ""))
        elif signum == signal.SIGINT:
            self.restore()
            raise KeyboardInterrupt

    @property
    def requested(self):
        return self.received is not None


def exit_code(run_dir):
    """0, or 128 + the signal number when a signal stopped the run (read from its summary.json)."""
    try:
        name = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8")).get("signal")
    except (OSError, ValueError):
        return 0
    return 128 + signal.Signals[name] if name in signal.Signals.__members__ else 0
