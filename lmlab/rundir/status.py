"""Why a run ended: the `status` that summary.json holds, written once for every verb.

A run directory without summary.json has no status of its own; `lmlab runs`
shows it as RUNNING (metrics.jsonl changed in the last minutes) or UNFINISHED
(crashed or killed), or IMPORTED when it holds weights but was never trained
here (`lmlab import`: no metrics.jsonl at all).
"""

COMPLETED = "completed"  # the step, token or time budget ran out as planned
TARGET_REACHED = "target_reached"  # train.target_val_loss was reached
TIME_BUDGET = "time_budget"  # train.max_time ran out before the step budget
DIVERGED = "diverged"  # NaN/inf, or the loss stayed above train.diverge_factor x its best
INTERRUPTED = "interrupted"  # SIGINT / SIGTERM: a checkpoint was written, --resume continues
FAILED = "failed"  # an error ended the run

RUNNING, UNFINISHED = "running", "unfinished"  # no summary.json yet: alive, or crashed or killed
IMPORTED = "imported"  # made by lmlab import: weights, no training of its own (no metrics.jsonl)

STATUSES = (COMPLETED, TARGET_REACHED, TIME_BUDGET, DIVERGED, INTERRUPTED, FAILED)
FINAL = (COMPLETED, DIVERGED, TARGET_REACHED, TIME_BUDGET)  # a sweep does not re-run these trials
GOOD = (COMPLETED, TARGET_REACHED, TIME_BUDGET)  # ended as planned: the weights and samples are usable
