#!/usr/bin/env bash
# Experiment 1: learning rate to the edge of stability.
# A learning-rate sweep of the quick-start model (pre-norm, 1.4M parameters) at batch 16,
# up to rates that diverge, each trial stopped early at a target validation loss.
# Usage: experiments/lr-edge/run.sh RUNS_DIR
set -euo pipefail
RUNS=${1:?usage: run.sh RUNS_DIR}

lmlab sweep --config cpu-quickstart --out "$RUNS/lr-edge" --workers 1 \
    --grid optim.lr=1e-3,3e-3,1e-2,3e-2,1e-1,3e-1 --metric steps_to_target \
    train.batch_size=16 train.max_steps=300 optim.warmup_steps=30 \
    train.eval_every=25 train.eval_batches=4 train.target_val_loss=3.5 \
    train.diverge_patience=20 train.sample_tokens=0 train.threads=1
lmlab compare "$RUNS"/lr-edge/runs/* --x step --metric val_loss --out "$RUNS/lr-edge/val-loss.png"
lmlab compare "$RUNS"/lr-edge/runs/* --x step --metric loss --logy --out "$RUNS/lr-edge/train-loss.png"
