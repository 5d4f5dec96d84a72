#!/usr/bin/env bash
# Experiment 6: optimizer and shape. AdamW betas (0.9, 0.95) against (0.9, 0.999); deep-thin
# (8 layers x d_model 64) against wide-shallow (2 layers x d_model 128) at equal non-embedding
# parameters (425K); 8-bit AdamW is tried and recorded as failed where bitsandbytes is missing.
# 300 steps of 16 x 64 tokens of the bundled TinyStories at lr 3e-3.
# Usage: experiments/optimizer-shape/run.sh RUNS_DIR
set -euo pipefail
RUNS=${1:?usage: run.sh RUNS_DIR}
OUT="$RUNS/optimizer-shape"
BASE="model.n_heads=4 model.context_length=64 train.batch_size=16 train.max_steps=300
      optim.warmup_steps=30 optim.lr=3e-3 optim.min_lr=3e-4 train.eval_every=25 train.eval_batches=8
      train.sample_tokens=0 train.threads=1"

lmlab sweep --out "$OUT/betas" --grid optim.beta2=0.95,0.999 $BASE model.d_model=64 model.n_layers=4 model.d_ff=192
lmlab sweep --out "$OUT/deep-thin" --grid model.n_layers=8 $BASE model.d_model=64 model.d_ff=192
lmlab sweep --out "$OUT/wide-shallow" --grid model.n_layers=2 $BASE model.d_model=128 model.d_ff=384
lmlab sweep --out "$OUT/adamw8bit" --grid optim.name=adamw8bit $BASE model.d_model=64 model.n_layers=4 \
    model.d_ff=192 train.max_steps=20

lmlab runs --format markdown "$OUT"/*/runs > "$OUT/runs.md"
lmlab compare "$OUT/betas/runs" --x step --metric val_loss --out "$OUT/betas-val.png"
lmlab compare "$OUT/deep-thin/runs" "$OUT/wide-shallow/runs" --x step --metric val_loss \
    --out "$OUT/shape-val.png"
