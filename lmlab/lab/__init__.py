"""The lab: what reads and shows many runs; it reads run directories, never the loop.

    table.py         `lmlab runs`: one row per run, the config keys in which they differ; notes
    compare.py       `lmlab compare`: curves of several runs on any clock
    evaluate.py      `lmlab eval`: a run, a checkpoint or an HF folder loaded once; evals into RUN/evals/
    report.py        `lmlab report`: one HTML (and Markdown) page of runs, figures and configs
    sweep.py         `lmlab sweep`: many trains over a grid or at random, resumable
    sweep_report.py  the sweep's table, best config and figures
"""
