#!/usr/bin/env bash
# Induction: the cheapest setting found where a small model learns to copy (issue 14).
# A 2-layer Llama-style model on the synthetic copy corpus (data.corpus=copy: random letters, |,
# the same letters), vocabulary 300, constant learning rate 1e-2, batch 8, 6,000 steps.
# Then the copy probe on random tokens seen in training (--random-tokens seen, the default) with
# the separator the model was trained with, and the history gain.
# Usage: experiments/induction/run.sh RUNS_DIR    (leaves RUNS_DIR/induction, evals in its evals/)
set -euo pipefail
RUNS=${1:?usage: run.sh RUNS_DIR}

lmlab train data.corpus=copy data.tokenizer_vocab_size=300 \
    model.n_layers=2 model.d_model=64 model.n_heads=4 model.context_length=128 \
    optim.schedule=constant optim.lr=1e-2 optim.warmup_steps=50 \
    train.batch_size=8 train.max_steps=6000 \
    train.eval_every=250 train.eval_batches=10 train.evals=copy train.evals_separator="|" \
    train.sample_prompts="abcdefghij|" train.sample_tokens=12 train.checkpoint_minutes=0 \
    train.runs_dir="$RUNS" train.run_name=induction
lmlab eval "$RUNS/induction" --probe copy history --separator "|"
lmlab compare "$RUNS/induction" --x tokens --metric copy_acc_random --out "$RUNS/induction/copy-vs-tokens.png"
times  # CPU time of this shell and of the lmlab commands it ran (user, system)
