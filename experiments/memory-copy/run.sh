#!/usr/bin/env bash
# Memory across the segment boundary, checked on documents that repeat themselves (issue 16).
# Each document is 16 random letters repeated 6 times; at vocabulary 258 (bytes only) every letter is
# one token, so with 16-token segments segment k+1 is segment k again. A model with memory 16 can copy
# the previous segment; one without memory cannot do better than chance (log 26 = 3.26 nats).
# Then stream_order.py: the same model in a plain PyTorch loop, with fresh or stream-ordered batches.
# Usage: experiments/memory-copy/run.sh RUNS_DIR
set -euo pipefail
RUNS=${1:?usage: run.sh RUNS_DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$RUNS/memory-copy-data"
python - "$RUNS/memory-copy-data" <<'PY'
import sys
import numpy as np
for name, n, seed in (("train", 2000, 0), ("valid", 50, 1)):
    rng = np.random.default_rng(seed)
    docs = ("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 16)) * 6 for _ in range(n))
    open(f"{sys.argv[1]}/{name}.txt", "w").write("".join(d + "\n<|endoftext|>\n" for d in docs))
PY
for M in 16 0; do
  lmlab train data.corpus= data.train_files="$RUNS/memory-copy-data/train.txt" \
    data.val_files="$RUNS/memory-copy-data/valid.txt" data.tokenizer_vocab_size=258 data.packing=stream \
    model.context_length=16 model.d_model=32 model.n_layers=2 model.n_heads=2 model.memory=$M \
    train.batch_size=16 train.max_steps=1000 train.eval_every=0 train.log_every=100 optim.warmup_steps=10 \
    optim.lr=3e-3 train.sample_tokens=0 train.runs_dir="$RUNS" train.run_name=repeat-memory$M
  lmlab eval "$RUNS/repeat-memory$M" --text "$RUNS/memory-copy-data/valid.txt" --segments
done
for order in fresh stream recomputed; do python "$HERE/stream_order.py" $order; done
times
