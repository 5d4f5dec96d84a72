#!/usr/bin/env bash
# Memory across the segment boundary, checked on documents that repeat themselves (issue 16).
# data.corpus=repeat: each document is 16 random letters repeated 6 times (lmlab/data/synthetic.py);
# at vocabulary 258 (bytes only) every letter is one token, so with 16-token segments segment k+1 is
# segment k again. A model with memory 16 can copy the previous segment; one without memory cannot do
# better than chance (log 26 = 3.26 nats). Each model is then scored segment by segment on the
# corpus's held-out documents (--val-text). Three seeds: how far copying gets in 1,000 steps varies
# from run to run (even a change in float rounding moves it), so the spread is part of the answer.
# The plain-PyTorch check of the order of the data is not lmlab and is run on its own:
#   python experiments/memory-copy/stream_order.py fresh|stream|recomputed
# Usage: experiments/memory-copy/run.sh RUNS_DIR
set -euo pipefail
RUNS=${1:?usage: run.sh RUNS_DIR}
for M in 16 0; do for S in 1337 1 2; do
  lmlab train train.seed=$S data.corpus=repeat data.tokenizer_vocab_size=258 data.packing=stream \
    model.context_length=16 model.d_model=32 model.n_layers=2 model.n_heads=2 model.memory=$M \
    train.batch_size=16 train.max_steps=1000 train.eval_every=0 train.log_every=100 optim.warmup_steps=10 \
    optim.lr=3e-3 train.sample_tokens=0 train.runs_dir="$RUNS" train.run_name=repeat-memory$M-seed$S
  lmlab eval "$RUNS/repeat-memory$M-seed$S" --val-text --segments
done; done
times  # CPU time of this shell and of the lmlab commands it ran (user, system)
