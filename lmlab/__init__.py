"""lmlab: pretrain small language models from scratch and run disciplined experiments.

Python entry points mirror the CLI verbs:

    from lmlab import train, load_run, generate
    run_dir = train(load_config("cpu-quickstart", ["train.max_steps=50"]))
    run = load_run(run_dir)
    print(generate(run.model, run.tokenizer, "Once upon a time"))
"""

__version__ = "0.1.0"


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
    if name == "generate":
        from lmlab.model.sampling import generate
        return generate
    raise AttributeError(name)
