"""The Transformer-XL memories of a run (model.memory): one per micro-batch of this rank, saved in checkpoints.

Design choices:
- Micro-batch m of a step always holds the same rows (data/stream.py), so it
  gets its own Memory, carried from step to step; 1 process with grad_accum 2
  and 2 processes with 1 keep the same memories for the same rows.
- A checkpoint holds every rank's memories (gathered to rank 0, like the RNG
  states), and on resume each rank takes those of its global micro-batches,
  so a resumed run continues bit for bit, also with another number of
  processes (the global batch, train.grad_accum, must stay the same).
"""

from lmlab.errors import LmlabError


class Memories:
    """This rank's memories, one per local micro-batch; checkpointed as a `stateful` object."""

    def __init__(self, model, batch_size, local_accum, parallel, device=None):
        self.parallel = parallel
        self.slots = [model.new_memory(batch_size, device=device) for _ in range(local_accum)]

    def for_batch(self, micro, batch):
        """The memory of local micro-batch `micro`, emptied on the rows of `batch` that start a document."""
        memory = self.slots[micro]
        memory.reset(batch.new_doc)
        return memory

    def state_dict(self):
        """Every rank's memories on rank 0 (collective: every rank calls it)."""
        return {"ranks": self.parallel.gather([m.state_dict() for m in self.slots])}

    def load_state_dict(self, state):
        """This rank's memories: the saved ones in global micro-batch order, dealt as this run's ranks read them."""
        flat = [memory for rank in state["ranks"] for memory in rank]  # rank r's micro m = global r * local + m
        local = len(self.slots)
        if len(flat) != local * self.parallel.world_size:
            raise LmlabError(f"the checkpoint holds model.memory state for {len(flat)} micro-batches per step, this "
                             f"run has {local * self.parallel.world_size}; resume with the same train.grad_accum")
        for memory, saved in zip(self.slots, flat[self.parallel.rank * local:(self.parallel.rank + 1) * local]):
            memory.load_state_dict(saved)
