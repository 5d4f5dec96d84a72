#!/usr/bin/env bash
# Induction: the cheapest setting found where a small model learns to copy (issue 14).
# The issue's own setting: a 2-layer Llama-style model (d_model 128, 4 heads, context 128) on the
# synthetic copy corpus (data.corpus=copy: random letters, |, the same letters), vocabulary 300,
# constant learning rate 3e-3, batch 32 (4,096 tokens a step), 2,500 steps (10.2M tokens).
# Copying forms in a phase change near step 1,500 (6M tokens); batch 8 at 6,000 steps never left
# the unigram plateau (experiments/induction/RESULT.md). The copy probe and the history gain run
# every 250 steps (train.evals), then on the final model: random tokens seen in training (the
# default) with the separator the model was trained with.
# Usage: experiments/induction/run.sh RUNS_DIR    (leaves RUNS_DIR/induction, evals in its evals/)
set -euo pipefail
RUNS=${1:?usage: run.sh RUNS_DIR}

lmlab train data.corpus=copy data.tokenizer_vocab_size=300 \
    model.n_layers=2 model.d_model=128 model.n_heads=4 model.context_length=128 \
    optim.schedule=constant optim.lr=3e-3 optim.warmup_steps=50 \
    train.batch_size=32 train.max_steps=2500 \
    train.eval_every=250 train.eval_batches=10 train.evals=copy,history train.evals_separator="|" \
    train.sample_prompts="abcdefghij|" train.sample_tokens=12 train.checkpoint_minutes=0 \
    train.runs_dir="$RUNS" train.run_name=induction
lmlab eval "$RUNS/induction" --probe copy history --separator "|"
for metric in copy_acc_random copy_acc_meaningful val_loss; do
    lmlab compare "$RUNS/induction" --x tokens --metric "$metric" --out "$RUNS/induction/$metric.png"
done
times  # CPU time of this shell and of the lmlab commands it ran (user, system)
