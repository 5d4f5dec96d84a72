#!/usr/bin/env bash
# Experiment 3: ablations, one switch each (the switches of the cpu-ablation-* presets), on a
# small Llama-style model (4 layers, d_model 64, context 64, 0.47M parameters) sized for a
# shared 2-core machine: 300 steps of 16 x 64 tokens of the bundled TinyStories.
# Baseline, post-norm and SiLU with two seeds (small effects), NoPE with one, and no norms
# at four learning rates. SiLU's d_ff = 288 matches SwiGLU's d_ff = 192 in weights.
# Usage: experiments/ablations/run.sh RUNS_DIR
set -euo pipefail
RUNS=${1:?usage: run.sh RUNS_DIR}
OUT="$RUNS/ablations"
SMALL="model.d_model=64 model.n_layers=4 model.n_heads=4 model.context_length=64 model.d_ff=192
       train.batch_size=16 train.max_steps=300 optim.warmup_steps=30 optim.lr=3e-3 optim.min_lr=3e-4
       train.eval_every=25 train.eval_batches=8 train.sample_tokens=0 train.threads=1"

lmlab sweep --out "$OUT/baseline" --grid train.seed=1,2 $SMALL
lmlab sweep --out "$OUT/postnorm" --grid train.seed=1,2 $SMALL model.norm_position=post
lmlab sweep --out "$OUT/silu" --grid train.seed=1,2 $SMALL model.ffn=silu model.d_ff=288
lmlab sweep --out "$OUT/nope" --grid train.seed=1 $SMALL model.position=nope
lmlab sweep --out "$OUT/nonorm" --grid optim.lr=1e-3,3e-3,1e-2,3e-2 $SMALL model.norm=none \
    train.diverge_patience=20

lmlab runs --format markdown "$OUT"/*/runs > "$OUT/runs.md"
lmlab compare "$OUT"/{baseline,postnorm,silu,nope}/runs --x step --metric val_loss \
    --out "$OUT/switches-val.png"
lmlab compare "$OUT"/nonorm/runs "$OUT"/baseline/runs/000-seed=1 --x step --metric loss --logy \
    --out "$OUT/nonorm-train.png"
