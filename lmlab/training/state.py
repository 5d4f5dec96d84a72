"""TrainState: the training loop's counters, in one place.

The loop advances it, checkpoints save it, resume restores it, and
summary.json reports it.

Design choices:
- One dataclass instead of a handful of local variables, so that "what does
  a checkpoint hold of the loop?" has one answer that can be read here.
- The field names are the keys of a checkpoint's state.json (step, tokens,
  elapsed_s, best_val, val_loss, loss), the same keys since checkpoint format 1.
  So checkpoints written before TrainState existed load as they are, and
  checkpoints written now load in an older lmlab.
- JSON has no inf or nan. A checkpoint stores None for them (the
  checkpoint's `_jsonable`), and `from_checkpoint` turns None back: best_val
  is inf before the first evaluation, and val_loss and loss are nan before
  they are first read.
- `status` is the one field a checkpoint leaves out. It says how this
  process's run ends ("completed" until something stops it), and a run that
  resumes has not ended: a checkpoint written on SIGTERM must not make the
  resumed run "interrupted" again.
- `tokens` is always `step` x tokens per step (the batch shape cannot change
  mid-run), and `at_step` keeps the two together.
"""

import math
from dataclasses import dataclass

from lmlab.rundir.status import COMPLETED

SAVED = ("step", "tokens", "elapsed_s", "best_val", "val_loss", "loss")  # status is not saved (see above)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done; also the position in the data (a batch is a function of the step)
    tokens: int = 0  # training tokens seen, summed over all ranks
    elapsed_s: float = 0.0  # training time; evaluation, sampling and saving are not counted
    best_val: float = math.inf  # lowest validation loss so far
    val_loss: float = math.nan  # latest validation loss
    loss: float = math.nan  # latest logged training loss (read from the device only at logging steps)
    status: str = COMPLETED  # becomes diverged / target_reached / time_budget / interrupted when one stops the run

    def at_step(self, step, tokens_per_step):
        """Set the step (after a step, or back to the last good one after a non-finite step), and the tokens with it."""
        self.step, self.tokens = step, step * tokens_per_step

    def where(self):
        """The fields every metrics.jsonl event starts with: step, tokens, elapsed_s."""
        return {"step": self.step, "tokens": self.tokens, "elapsed_s": round(self.elapsed_s, 3)}

    def to_checkpoint(self):
        """The fields a checkpoint's state.json holds, under their state.json keys."""
        return {name: getattr(self, name) for name in SAVED}

    @classmethod
    def from_checkpoint(cls, record):
        """The state a checkpoint's state.json records (the None that JSON holds for inf / nan turned back)."""
        best, val, loss = record.get("best_val"), record.get("val_loss"), record.get("loss")
        return cls(step=record["step"], tokens=record["tokens"], elapsed_s=record["elapsed_s"],
                   best_val=math.inf if best is None else best, val_loss=math.nan if val is None else val,
                   loss=math.nan if loss is None else loss)
