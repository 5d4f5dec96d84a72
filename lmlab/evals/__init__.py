"""Evaluation: perplexity and bits per byte, working-memory probes, multiple-choice benchmarks.

    bpb.py          bytes per token, so losses compare across tokenizers (also used by training)
    scoring.py      teacher-forced log-probabilities and greedy hits, sliding windows
    perplexity.py   loss / perplexity / bits per byte on text, JSONL or prepared shards
    probes.py       copy and reverse probes, history gain
    choice.py       MMLU / CMMLU / C-Eval / ARC / HellaSwag by log-likelihood
    output.py       printed tables, RUN/evals/<name>.json, plots
    options.py      EvalOptions: every option of `lmlab eval` once (default, help), its flags made from it
    training.py     train.evals: a few of these numbers in metrics.jsonl during training
    data/           small real subsets of MMLU and CMMLU (sources and licenses in data/SOURCES.md)

`lmlab eval` itself (load a run, a checkpoint or an HF folder once, run what was
asked) lives in lmlab/lab/evaluate.py: it reads run directories, so it sits above
training. From Python: `from lmlab.lab.evaluate import run_evals` (what the CLI calls;
`run_evals("runs/x", text=["valid.txt"])` takes the EvalOptions fields as keywords), or
the functions of each module on a model and tokenizer you already hold. This
file imports nothing, so `import lmlab.config` stays free of torch.
"""
