#!/usr/bin/env bash
# Experiment 5: KeyNorm (keys normalised to length 1, a learned logit scale per head) against the usual
# q.k/sqrt(head_dim), with the key norms |k| of every layer logged every 25 steps (key_l2 in the
# norms events). Small Llama-style model (4 layers, d_model 64, context 64), 300 steps of 16 x 64
# tokens of the bundled TinyStories at lr 3e-3, two seeds each.
# Usage: experiments/keynorm/run.sh RUNS_DIR
set -euo pipefail
RUNS=${1:?usage: run.sh RUNS_DIR}
OUT="$RUNS/keynorm"
SMALL="model.d_model=64 model.n_layers=4 model.n_heads=4 model.context_length=64
       train.batch_size=16 train.max_steps=300 optim.warmup_steps=30 optim.lr=3e-3 optim.min_lr=3e-4
       train.eval_every=25 train.eval_batches=8 train.sample_tokens=0 train.threads=1 train.norms_every=25"

lmlab sweep --out "$OUT" --grid model.key_norm=false,true --grid train.seed=1,2 $SMALL

lmlab runs --format markdown "$OUT/runs" > "$OUT/runs.md"
lmlab compare "$OUT/runs" --x step --metric val_loss --out "$OUT/val-loss.png"
lmlab compare "$OUT/runs" --x step --metric key_l2.layers.0 --out "$OUT/key-norm-layer0.png"
lmlab compare "$OUT/runs" --x step --metric key_l2.layers.3 --out "$OUT/key-norm-layer3.png"
