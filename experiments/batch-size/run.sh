#!/usr/bin/env bash
# Experiment 2: batch size at a fixed token budget, learning rate re-tuned per size.
# Small Llama-style model (4 layers, d_model 64, context 64), 196,608 tokens of the bundled
# TinyStories per trial: batch 4 (768 steps), 16 (192 steps), 64 (48 steps), each at lr
# 1e-3, 3e-3 and 1e-2. Loss against steps, tokens and training time.
# Usage: experiments/batch-size/run.sh RUNS_DIR
set -euo pipefail
RUNS=${1:?usage: run.sh RUNS_DIR}
OUT="$RUNS/batch-size"

lmlab sweep --out "$OUT" --grid train.batch_size=4,16,64 --grid optim.lr=1e-3,3e-3,1e-2 \
    model.d_model=64 model.n_layers=4 model.n_heads=4 model.context_length=64 \
    train.max_tokens=196608 optim.warmup_steps=10 train.eval_every=16 train.eval_batches=8 \
    train.sample_tokens=0 train.threads=1

lmlab runs --format markdown "$OUT/runs" > "$OUT/runs.md"
lmlab compare "$OUT/runs" --x tokens --metric val_loss --out "$OUT/val-loss-tokens.png"
lmlab compare "$OUT/runs" --x time --metric val_loss --out "$OUT/val-loss-time.png"
