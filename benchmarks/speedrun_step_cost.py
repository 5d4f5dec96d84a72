"""Cost of one training step of each speedrun recipe, measured in turns on one thread.

Time to a target is tokens to the target times the cost of a token, and the
cost of a token depends on the batch size and the recipe (Muon's
orthogonalisation, the FFN, the head). This times one step of each recipe on
the same data, the recipes called in turns (A B C, A B C, ...) so a shared
machine's load falls on all alike, and prints each one's step time and its
cost per token relative to the quick start's.

    python benchmarks/speedrun_step_cost.py [RECIPES] [STEPS_PER_TURN] [REPEATS]
    python benchmarks/speedrun_step_cost.py qs32,sr16,sr8,nanogpt32,sr16-cap 5 7
"""

import sys

import torch

from lmlab.bench.common import time_side_by_side
from lmlab.bench.data import _training_step
from lmlab.bench.speedrun import NANOGPT
from lmlab.config import load_config
from lmlab.data.batches import Batches
from lmlab.data.corpora import ensure_data

RECIPES = {"qs32": ("cpu-quickstart", []), "nanogpt32": ("cpu-quickstart", NANOGPT),
           "sr16": ("cpu-speedrun", []), "sr8": ("cpu-speedrun", ["train.batch_size=8"]),
           "sr32": ("cpu-speedrun", ["train.batch_size=32"]),
           "sr16-relu2": ("cpu-speedrun", ["model.ffn=relu2"]), "sr16-cap": ("cpu-speedrun", ["model.logit_softcap=15"]),
           "sr16-ns3": ("cpu-speedrun", ["optim.muon_ns_steps=3"]),
           "sr16-qk": ("cpu-speedrun", ["model.qk_norm=true"]),
           # the first stage of train.context_schedule=64:0.3,128:1: half the window, twice the rows
           "sr16-ctx64": ("cpu-speedrun", ["model.context_length=64", "train.batch_size=32"])}


def main(argv):
    names = argv[0].split(",") if argv else list(RECIPES)
    steps = int(argv[1]) if len(argv) > 1 else 5
    repeats = int(argv[2]) if len(argv) > 2 else 5
    torch.set_num_threads(1)
    calls, batch, tokens = {}, {}, {}
    for name in names:
        preset, extra = RECIPES[name]
        config = load_config(preset, [*extra, "train.threads=1"])
        tokenizer, shards = ensure_data(config.data, log=lambda *a: None)
        first = Batches(shards, "train", config.train.batch_size, config.model.context_length, seed=1).get(0)
        step, _ = _training_step(config, tokenizer, torch.device("cpu"), "fp32", first)
        calls[name] = lambda step=step: [step() for _ in range(steps)]
        batch[name] = config.train.batch_size
        tokens[name] = config.train.batch_size * config.model.context_length
    seconds = time_side_by_side(calls, repeats=repeats, warmup=1)
    unit = seconds[names[0]] / tokens[names[0]]
    for name, s in seconds.items():
        print(f"{name}: {1000 * s / steps:.0f} ms/step, batch {batch[name]}, "
              f"cost per token {s / tokens[name] / unit:.3f}x {names[0]}'s")


if __name__ == "__main__":
    main(sys.argv[1:])
