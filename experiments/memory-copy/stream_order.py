"""Does the order of the data decide whether a model with memory learns to copy the previous segment?

Documents are 16 random tokens (of 26) repeated; a model with model.memory = 16 sees the previous
segment, i.e. the current one again, so it can learn to copy it. Three orders of batches, 16 rows:
  fresh       every row gets a new document at every step, the memory filled from its first segment
              (tests/test_memory.py's loop)
  stream      each row keeps its document for 6 consecutive steps and carries its memory from step to
              step, reset at a new document, as data.packing = "stream" reads
  recomputed  the stream order, but the memory is recomputed from the current segment at every step
Prints the loss on rows whose memory holds the previous segment, after `steps` AdamW steps (lr 3e-3).

    python experiments/memory-copy/stream_order.py fresh|stream|recomputed [steps]
"""

import sys

import torch
import torch.nn.functional as F

from lmlab.config import ModelConfig
from lmlab.model.transformer import Transformer

T, V, ROWS, SEGMENTS = 16, 26, 16, 6


def main(order, steps):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=V + 2, context_length=T, d_model=32, n_layers=2, n_heads=2, memory=T))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0)
    g = torch.Generator().manual_seed(1)
    memory = model.new_memory(ROWS)
    segment = torch.arange(ROWS) % SEGMENTS  # rows start their documents at staggered steps
    blocks = torch.randint(0, V, (ROWS, T), generator=g)
    for _ in range(steps):
        new = segment == 0 if order != "fresh" else torch.zeros(ROWS, dtype=torch.bool)
        if order == "fresh":
            blocks = torch.randint(0, V, (ROWS, T), generator=g)
        else:
            blocks[new] = torch.randint(0, V, (int(new.sum()), T), generator=g)
        if order in ("fresh", "recomputed"):
            memory = model.new_memory(ROWS)
            with torch.no_grad():
                model(blocks, memory=memory)
        memory.reset(new)
        losses = F.cross_entropy(model(blocks, memory=memory).reshape(-1, V + 2),
                                 torch.roll(blocks, -1, 1).reshape(-1), reduction="none").view(ROWS, T)
        opt.zero_grad()
        losses.mean().backward()
        opt.step()
        segment = (segment + 1) % SEGMENTS
    print(f"{order}: loss with the previous segment in memory after {steps} steps: {losses[~new].mean().item():.3f} "
          f"(chance {torch.log(torch.tensor(float(V))).item():.2f})")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1200)
