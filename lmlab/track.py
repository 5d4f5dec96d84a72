"""The run's record: metrics.jsonl (one JSON object per event) and summary.json.

metrics.jsonl is appended line by line and flushed, so it survives a crash and
can be tailed while training. Every event carries `step`, `tokens` and
`elapsed_s` (training time, without evaluation, sampling or saving) so that
curves can be drawn against steps, tokens or time.
"""

import json
import math
from pathlib import Path

from lmlab import atomic


def _clean(value):
    """JSON has no NaN/inf: write them as strings a reader can still parse."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    def __init__(self, path):
        self.path = Path(path)
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)

    def write(self, **event):
        self._file.write(json.dumps({k: _clean(v) for k, v in event.items()}) + "\n")

    def close(self):
        self._file.close()


def read_metrics(path):
    """All events of a metrics.jsonl file, as dicts."""
    events = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                events.append(json.loads(line))
    return events


def write_summary(run_dir, summary):
    summary = {k: _clean(v) for k, v in summary.items()}
    atomic.write_text(Path(run_dir) / "summary.json", json.dumps(summary, indent=2) + "\n")
