#!/usr/bin/env bash
# Experiment 8: Chinese, greedy against sampled decoding, with repetition measured rather than eyeballed.
# The zh-quickstart recipe (bundled four classical novels, vocab 6000) at a size for a shared 2-core
# machine: 4 layers, d_model 64, context 64, 500 steps of 16 x 64 tokens. Then lmlab eval --repetition:
# 32 prompts of 16 tokens from the validation text, 128 new tokens each, greedy / t=0.8 top-k 50 / t=1,
# and the real text after the same prompts as the reference.
# Usage: experiments/zh-repetition/run.sh RUNS_DIR
set -euo pipefail
RUNS=${1:?usage: run.sh RUNS_DIR}
OUT="$RUNS/zh-repetition"

lmlab train --config zh-quickstart train.runs_dir="$OUT" train.run_name=zh-small \
    model.d_model=64 model.n_layers=4 model.n_heads=4 model.context_length=64 \
    train.batch_size=16 train.max_steps=500 optim.warmup_steps=30 \
    train.eval_every=50 train.eval_batches=8 train.threads=1
lmlab eval "$OUT/zh-small" --val --repetition --samples 32 --new-tokens 128 --seed 0
lmlab generate "$OUT/zh-small" --prompt "却说" --max-new-tokens 120 --greedy > "$OUT/greedy.txt"
lmlab generate "$OUT/zh-small" --prompt "却说" --max-new-tokens 120 --seed 0 > "$OUT/sampled.txt"
