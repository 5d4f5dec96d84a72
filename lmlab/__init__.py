"""lmlab: pretrain small language models from scratch and run disciplined experiments.

Python entry points mirror the CLI verbs:

    import lmlab
    run_dir = lmlab.train(lmlab.load_config("cpu-quickstart", ["train.max_steps=50"]))
    run = lmlab.load_run(run_dir)
    print(lmlab.generate(run.model, run.tokenizer, "Once upon a time"))  # the new text only
    tok = lmlab.load_tokenizer(run_dir, special_tokens=["<|im_start|>"])  # any tokenizer lmlab reads

The house, along the path of data (arrows point down it: data and model know
nothing of training, training knows nothing of lab, no import circles):

    config.py     every knob: dataclass sections, TOML presets, KEY=VALUE overrides, validation
    cli.py        `lmlab VERB`: each verb's flags next to the function it calls
    errors.py     LmlabError: one line a user can act on
    atomic.py     files written whole or not at all; the JSON reader
    device.py     device and precision (autocast, grad scaler)
    data/         documents -> tokenizer -> shards -> batches; bundled corpora; context curriculum
    model/        the transformer and its layers; sampling; weights in and out; Hugging Face export/import
    training/     the loop and what it calls: optimizer, schedules, stop rules, faults, signals,
                  checkpoints and resume, torchrun, fast paths, perf counters, norm probes
    rundir/       the run directory, the contract every verb shares: config, metrics.jsonl,
                  summary.json and its statuses, env.json, sinks, plots
    lab/          what reads and shows many runs: `lmlab runs`, compare, report, sweep
    evals/        perplexity and bits per byte, working-memory probes, multiple choice
    bench/        `lmlab bench`: speed and memory next to a reference

`lmlab.train` is a function, so the training package is named `training`.
"""

from lmlab.version import __version__  # noqa: F401  (lmlab.__version__)


def __getattr__(name):
    # Lazy so that `import lmlab` (and `lmlab --help`) does not import torch.
    if name == "load_config":
        from lmlab.config import load_config
        return load_config
    if name == "train":
        from lmlab.training.loop import train
        return train
    if name == "load_run":
        from lmlab.rundir.run import load_run
        return load_run
    if name == "load_tokenizer":
        from lmlab.data.tokenizer import load_tokenizer
        return load_tokenizer
    if name == "generate":
        from lmlab.model.sampling import generate
        return generate
    raise AttributeError(name)
