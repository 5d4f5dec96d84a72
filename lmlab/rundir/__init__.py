"""The run directory: the contract between train, runs, compare, report, sweep, eval and export.

    run.py       create a run directory, save its config and weights, load a run
    metrics.py   metrics.jsonl (one JSON object per event) and summary.json
    status.py    why a run ended: the statuses summary.json holds
    env.py       env.json: what the run ran on and from
    sinks.py     copies of every event: TensorBoard, wandb, the plain-log status line
    plots.py     the run's loss plot and the comparison figure
"""
