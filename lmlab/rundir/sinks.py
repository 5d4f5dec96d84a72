"""Where events go besides metrics.jsonl: TensorBoard, wandb, and a status line for plain logs.

Design choices:
- metrics.jsonl is always written (track.MetricsLog); a sink only gets a copy
  of each event, so a run never depends on a dashboard being up.
- TensorBoard and wandb are optional extras (`pip install 'lmlab[tensorboard]'`,
  `'lmlab[wandb]'`), imported only when `train.tensorboard` / `train.wandb` is on,
  and checked before the run directory is made.
- Both sinks write inside the run directory (tensorboard/, wandb/), so one
  directory holds the whole run. wandb honours its own environment variables:
  WANDB_MODE=offline works with no account and no network (`wandb sync` later).
- Scalars keep their metrics.jsonl names; nested values (the per-layer norms)
  become tags like `norms/grad_l2/layers.0.mlp`.
- Without a terminal (CI, SLURM, `> log.txt`) there is no progress bar, so a
  compact line is printed every `train.print_every` steps instead.
"""

import importlib.util
import math
from pathlib import Path

from lmlab.errors import LmlabError

CLOCKS = ("step", "tokens", "elapsed_s", "wall_s")


def check_sinks(config):
    """Fail before anything is written when a switched-on sink's library is missing."""
    t = config.train
    if t.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise LmlabError("train.tensorboard=true needs the tensorboard package: pip install 'lmlab[tensorboard]'")
    if t.wandb and importlib.util.find_spec("wandb") is None:
        raise LmlabError("train.wandb=true needs the wandb package: pip install 'lmlab[wandb]'")


def scalars(event):
    """(tag, float) pairs of an event's measured values: clocks and labels left out, nested dicts flattened."""
    prefix = f"{event['kind']}/" if "kind" in event else ""
    out = []
    for key, value in event.items():
        if key in CLOCKS or key == "kind":
            continue
        if isinstance(value, dict):
            out += [(f"{prefix}{key}/{k}", float(v)) for k, v in value.items() if isinstance(v, (int, float))]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((f"{prefix}{key}", float(value)))
    return out


class TensorBoardSink:
    """Scalars to runs/NAME/tensorboard/ (read with `tensorboard --logdir runs`)."""

    def __init__(self, log_dir):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, event):
        for tag, value in scalars(event):
            self.writer.add_scalar(tag, value, global_step=event["step"])

    def close(self):
        self.writer.close()


class WandbSink:
    """A wandb run named after the run directory, with the resolved config attached."""

    def __init__(self, config, run_dir):
        import wandb

        from lmlab.config import to_dict

        try:
            self.run = wandb.init(project=config.train.wandb_project, name=Path(run_dir).name, dir=str(run_dir),
                                  config=to_dict(config))
        except Exception as e:  # no API key, no network, ...
            raise LmlabError(f"wandb could not start ({e}); log in with `wandb login`, or set WANDB_MODE=offline "
                             "to write the run locally and `wandb sync` it later") from None

    def write(self, event):
        self.run.log(dict(scalars(event)), step=event["step"])

    def close(self):
        self.run.finish()


def open_sinks(config, run_dir):
    """The sinks the config switches on (train.tensorboard, train.wandb)."""
    sinks = []
    if config.train.tensorboard:
        sinks.append(TensorBoardSink(Path(run_dir) / "tensorboard"))
    if config.train.wandb:
        sinks.append(WandbSink(config, run_dir))
    return sinks


def _duration(seconds):
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def status_line(event, total_steps):
    """'step 200/1200 (17%) | loss 3.2104 | lr 2.9e-03 | 41.2k tok/s | mfu 3.1% | 1m23s train, 1m40s wall | eta 7m'."""
    step = event["step"]
    where = f"step {step}/{total_steps} ({100 * step / total_steps:.0f}%)" if total_steps else f"step {step}"
    parts = [where, f"loss {event['loss']:.4f}"]
    if "lr" in event:
        parts.append(f"lr {event['lr']:.2e}")
    if event.get("tokens_per_s"):
        parts.append(f"{event['tokens_per_s'] / 1e3:.1f}k tok/s")
    if event.get("mfu") is not None and math.isfinite(event["mfu"]):
        parts.append(f"mfu {100 * event['mfu']:.1f}%")
    elapsed = event.get("elapsed_s", 0.0)
    parts.append(f"{_duration(elapsed)} train, {_duration(event.get('wall_s', elapsed))} wall")
    if total_steps and 0 < step < total_steps and elapsed > 0:
        parts.append(f"eta {_duration(elapsed / step * (total_steps - step))}")
    return " | ".join(parts)


class StatusLine:
    """For logs without a terminal: one status line per `every` steps (0 = 20 lines per run).

    total_steps is None for a run bounded by time only: no percentage, no eta, a line per 100 steps.
    """

    def __init__(self, log, total_steps, every=0):
        self.log, self.total = log, total_steps
        self.every = every or (max(1, total_steps // 20) if total_steps else 100)
        self.next = self.every

    def write(self, event):
        if "loss" not in event or event["step"] < self.next:
            return
        self.next = (event["step"] // self.every + 1) * self.every
        self.log(status_line(event, self.total))

    def close(self):
        pass
