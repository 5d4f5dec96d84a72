"""Sequence-length curriculum: the context grows in stages while tokens per step stay fixed.

    train.context_schedule = "64:0.3,128:0.6,256:1"

trains on 64-token windows until the run's progress reaches 0.3, then 128 until
0.6, then 256 to the end.

Design choices:
- A curriculum is a schedule: its stages are measured in the same progress as
  the learning rate (optim.progress: steps, tokens or time), so a time-budget
  run moves through its stages inside the budget.
- Tokens per optimizer step stay fixed: a stage with context c uses
  batch_size * context_length / c sequences per micro-batch, so the tokens
  (and the LR / batch-size relation) do not change between stages. That is
  why every stage's context must divide batch_size * context_length.
- model.context_length is the longest context: the model (RoPE or learned
  positions) is built for it, and validation always uses it, so curves compare
  with runs without a curriculum.
- One `Batches` per stage, built once; each draws its windows from
  (seed, step, micro) like the plain loader, so the run stays deterministic
  (on the clock, with optim.progress=time, stage changes follow the clock).
"""

from lmlab.errors import LmlabError


def parse_context_schedule(text, context_length, batch_size):
    """[(context, until_progress), ...] from "64:0.3,128:0.6,256:1"; [] when text is empty."""
    if not text.strip():
        return []
    stages = []
    for part in text.split(","):
        context, sep, until = part.strip().partition(":")
        try:
            stage = (int(context), float(until))
        except ValueError:
            stage = None
        if not sep or stage is None:
            raise LmlabError(f"train.context_schedule: '{part.strip()}' is not CONTEXT:UNTIL "
                             "(e.g. \"64:0.3,128:0.6,256:1\")")
        stages.append(stage)
    tokens = batch_size * context_length
    previous = 0.0
    for context, until in stages:
        if not 0 < context <= context_length:
            raise LmlabError(f"train.context_schedule: context {context} must lie in 1..model.context_length={context_length}")
        if tokens % context:
            raise LmlabError(f"train.context_schedule: context {context} must divide train.batch_size x "
                             f"model.context_length = {tokens} so that tokens per step stay fixed")
        if not previous < until <= 1:
            raise LmlabError(f"train.context_schedule: stage ends must increase within (0, 1], got {until} after {previous}")
        previous = until
    if previous != 1:
        raise LmlabError(f"train.context_schedule: the last stage must end at 1 (the end of the run), got {previous}")
    return stages


class Curriculum:
    """The training batches for a given progress: the plain loader, or the current stage's."""

    def __init__(self, config, shards_dir, full_batches):
        from lmlab.data.batches import Batches

        t, m = config.train, config.model
        self.full = full_batches
        self.stages = []
        for context, until in parse_context_schedule(t.context_schedule, m.context_length, t.batch_size):
            batch_size = t.batch_size * m.context_length // context
            batches = full_batches if context == m.context_length else Batches(
                shards_dir, "train", batch_size, context, packing=config.data.packing, seed=t.seed,
                pin_memory=getattr(full_batches, "pin_memory", False))
            self.stages.append((until, batches))

    def at(self, progress):
        """Batches for the step at `progress` in [0, 1]."""
        for until, batches in self.stages:
            if progress < until:
                return batches
        return self.stages[-1][1] if self.stages else self.full
