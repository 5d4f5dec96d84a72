"""Evaluation: perplexity and bits per byte, working-memory probes, multiple-choice benchmarks.

    scoring.py      teacher-forced log-probabilities and greedy hits, sliding windows
    perplexity.py   loss / perplexity / bits per byte on text, JSONL or prepared shards
    probes.py       copy and reverse probes, history gain
    choice.py       MMLU / CMMLU / C-Eval / ARC / HellaSwag by log-likelihood
    output.py       printed tables, RUN/evals/<name>.json, plots
    runner.py       `lmlab eval`: load a run, checkpoint or HF folder once, run what was asked
    training.py     train.evals: a few of these numbers in metrics.jsonl during training
    data/           small real subsets of MMLU and CMMLU (sources and licenses in data/SOURCES.md)

From Python: `from lmlab.evals.runner import run_evals` (what the CLI calls), or
the functions of each module on a model and tokenizer you already hold. This
file imports nothing, so `import lmlab.config` stays free of torch.
"""
