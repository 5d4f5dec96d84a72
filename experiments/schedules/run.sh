#!/usr/bin/env bash
# Experiment 4: learning-rate schedules at a fixed budget. WSD with stable ratio 0.5 / 0.7 / 0.9
# (decay over the last 50 / 30 / 10 % of the run) against cosine, reduce-on-plateau and constant,
# on a small Llama-style model (4 layers, d_model 64, context 64, 0.47M parameters), 300 steps of
# 16 x 64 tokens of the bundled TinyStories, peak lr 3e-3, floor 3e-4. Cosine again with a second
# seed for the seed spread.
# Usage: experiments/schedules/run.sh RUNS_DIR
set -euo pipefail
RUNS=${1:?usage: run.sh RUNS_DIR}
OUT="$RUNS/schedules"
SMALL="model.d_model=64 model.n_layers=4 model.n_heads=4 model.context_length=64
       train.batch_size=16 train.max_steps=300 optim.warmup_steps=30 optim.lr=3e-3 optim.min_lr=3e-4
       train.eval_every=20 train.eval_batches=8 train.sample_tokens=0 train.threads=1"

lmlab sweep --out "$OUT/basic" --grid optim.schedule=cosine,constant,plateau $SMALL
lmlab sweep --out "$OUT/wsd" --grid optim.wsd_decay_fraction=0.5,0.3,0.1 $SMALL optim.schedule=wsd
lmlab sweep --out "$OUT/cosine-seed" --grid train.seed=1 $SMALL optim.schedule=cosine

lmlab runs --format markdown "$OUT"/*/runs > "$OUT/runs.md"
lmlab compare "$OUT"/{basic,wsd}/runs --x step --metric val_loss --out "$OUT/val-loss.png"
lmlab compare "$OUT"/{basic,wsd}/runs --x step --metric lr --out "$OUT/lr.png"
