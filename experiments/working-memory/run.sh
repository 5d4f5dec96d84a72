#!/usr/bin/env bash
# Experiment 7: working memory. Where does copying form, and how does it look next to the quick
# start, which does not copy? Is the phase change specific to lmlab?
#  1. copy: the induction setting (experiments/induction: 2 layers, d_model 128, vocabulary 300, the
#     synthetic copy corpus, constant lr 3e-3, batch 32, 2,500 steps), with the copy probe and the
#     history gain logged every 250 steps (train.evals): copy accuracy against training tokens, the
#     phase change (near step 1,500).
#  2. copy-reference: the same run again with transformers' LlamaForCausalLM in a plain PyTorch loop
#     (lmlab bench reference: the same batches in the same order, the same initial weights and
#     learning rates, torch AdamW; docs/evals.md), the independent check of the phase change.
#  3. quickstart: the CPU quick start (lmlab train, TinyStories) with the same evals every 200 steps.
#  4. lmlab eval on all three: copy accuracy against length, inside and beyond the 128-token window,
#     on random tokens seen in training and on meaningful text (each run's validation split), and the
#     history gain. Then the curves side by side and the report.
# Usage: experiments/working-memory/run.sh RUNS_DIR
set -euo pipefail
RUNS=${1:?usage: run.sh RUNS_DIR}
OUT="$RUNS/working-memory"
COPY="data.corpus=copy data.tokenizer_vocab_size=300
    model.n_layers=2 model.d_model=128 model.n_heads=4 model.context_length=128
    optim.schedule=constant optim.lr=3e-3 optim.warmup_steps=50
    train.batch_size=32 train.max_steps=2500
    train.eval_every=250 train.eval_batches=10 train.evals=copy,history
    train.checkpoint_minutes=0 train.run_name=copy"  # word-split on purpose: keep paths out of it

lmlab train $COPY train.runs_dir="$OUT" train.evals_separator="|" train.sample_prompts="abcdefghij|" train.sample_tokens=12
lmlab bench reference $COPY train.runs_dir="$OUT" train.evals_separator="|"  # -> $OUT/copy-reference
lmlab train train.eval_every=200 train.evals=copy,history train.runs_dir="$OUT" train.run_name=quickstart

lmlab eval "$OUT/copy" --probe copy history --separator "|"
lmlab eval "$OUT/copy-reference" --probe copy history --separator "|"
lmlab eval "$OUT/quickstart" --probe copy history
for metric in copy_acc_random copy_acc_meaningful history_loss_gain val_loss; do
    lmlab compare "$OUT/copy" "$OUT/copy-reference" "$OUT/quickstart" --x tokens --metric "$metric" \
        --out "$OUT/$metric.png"
done
lmlab report "$OUT"
times  # CPU time of this shell and of the lmlab commands it ran (user, system)
