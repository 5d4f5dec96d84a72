"""Data-parallel training under torchrun: DDP or FSDP2, on PyTorch's own engine.

`lmlab train` is the same command with one process or many:

    torchrun --standalone --nproc_per_node=4 -m lmlab train --config configs/X.toml

Design choices:
- One `Parallel` object holds everything that depends on the world size, so
  the training loop reads the same with 1 process or 64. With one process
  every method is the plain single-device operation (no process group).
- `train.grad_accum` is the accumulation of the *global* batch on one process
  (as in nanoGPT): with N ranks each rank runs grad_accum / N micro-batches, so
  the same config trains on the same tokens per step whatever N is. A
  grad_accum that N does not divide is an error, not a silent change.
- Rank r's micro-batch m of a step is global micro-batch r * (grad_accum / N) + m,
  drawn exactly as a single process draws it (data.Batches.get): 2 ranks see
  the very batches 1 process sees with twice the accumulation, which is what
  makes their losses and weights agree (tests/test_distributed.py).
- DDP averages gradients across ranks; FSDP2 (`fully_shard` per block, then the
  root) shards parameters, gradients and AdamW state. Gradient sync is
  skipped on all but the last micro-batch (no_sync / set_requires_gradient_sync).
- Checkpoints stay one format: rank 0 gathers the full weights and optimizer
  state (for FSDP with torch.distributed.checkpoint's full state dict, offloaded
  to CPU) and writes the usual safetensors files; every rank's RNG states are
  kept. So a checkpoint resumes under any world size that divides grad_accum
  (see docs/distributed.md).
- Host-side decisions (time budget, stop signals) are agreed every step over a
  CPU (gloo) group, so every rank stops at the same step and none waits forever
  in a collective; `train.collective_timeout` bounds any collective, and torchrun ends
  the others when one rank exits with an error (a rank that timed out ends the
  hung ones itself: hung.py).
- A worker process that started a process group ends with os._exit once the
  command is done (`end_worker`): see its docstring for the abort it avoids.
"""

import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist

from lmlab.errors import LmlabError
from lmlab.model.fused import packed_optimizer_state, unpacked_optimizer_state
from lmlab.training import hung

_group_started = False  # this process started a process group (a torchrun worker); see end_worker


def launched():
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) for a plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def worker_started():
    """Whether this process started a process group, i.e. is a torchrun worker that got going."""
    return _group_started


def end_worker(code):
    """Exit a torchrun worker that is done, without Python's interpreter finalization (no-op elsewhere).

    Why: once DDP has wrapped a model, the gloo process group outlives
    destroy_process_group() (torch keeps a reference), and so do its worker
    threads. A worker that drops the last reference to a finished collective's
    tensor needs the GIL; if Python is finalizing by then, the thread is ended
    inside a C++ destructor and the process aborts ("terminate called without
    an active exception", exit code -6) although training succeeded: about one
    2-process run in seven on this 2-core machine. Everything lmlab writes is
    closed and renamed into place before this point; only stdout and stderr
    are still buffered.
    """
    if not _group_started:
        return code
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say
            pass
    os._exit(code)


def resolve_mode(parallel, world_size):
    """train.parallel: auto -> ddp under torchrun with 2+ processes, else none."""
    if parallel == "auto":
        return "ddp" if world_size > 1 else "none"
    if parallel in ("ddp", "fsdp") and world_size == 1 and "WORLD_SIZE" not in os.environ:
        raise LmlabError(f"train.parallel={parallel} needs a launch by torchrun, e.g. "
                         f"`torchrun --nproc_per_node=2 -m lmlab train ...` (or train.parallel=auto)")
    if parallel == "none" and world_size > 1:
        raise LmlabError(f"train.parallel=none but torchrun started {world_size} processes; "
                         "use train.parallel=ddp, fsdp or auto")
    return parallel


class Parallel:
    """The world this process trains in: rank, device, gradient sync, agreed decisions, full state."""

    def __init__(self, mode="none", rank=0, local_rank=0, world_size=1, timeout_s=600.0):
        self.mode, self.rank, self.local_rank, self.world_size = mode, rank, local_rank, world_size
        self.timeout_s = timeout_s
        self.is_main = rank == 0
        self.control = None  # gloo group for host-side agreement (CPU tensors work whatever the backend)
        self.pids = []  # every rank's pid: a rank that times out in a collective ends the hung ones (hung.py)

    @classmethod
    def from_launch(cls, config):
        rank, local_rank, world = launched()
        return cls(resolve_mode(config.train.parallel, world), rank, local_rank, world, config.train.collective_timeout)

    @property
    def active(self):
        return self.world_size > 1

    # ------------------------------------------------------------ set-up and teardown

    def device(self, device):
        """One device per rank: cuda -> cuda:LOCAL_RANK; the process group starts here (NCCL on GPUs, gloo on CPU)."""
        if not self.active:
            return device
        if device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise LmlabError(f"local rank {self.local_rank} has no GPU: this machine has "
                                 f"{torch.cuda.device_count()}; use --nproc_per_node={torch.cuda.device_count()}")
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        elif device.type != "cpu":
            raise LmlabError(f"train.parallel={self.mode} runs on cuda or cpu, not {device.type}")
        if not dist.is_initialized():
            global _group_started
            _group_started = True
            backend = "nccl" if device.type == "cuda" else "gloo"
            timeout = datetime.timedelta(seconds=self.timeout_s)
            dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
            self.control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
            self.pids = hung.gather_pids(self.control)
        return device

    def local_accum(self, grad_accum):
        """Micro-batches per rank per step; the global batch stays batch_size x grad_accum."""
        if grad_accum % self.world_size:
            raise LmlabError(f"train.grad_accum={grad_accum} cannot be split over {self.world_size} processes: the "
                             f"global batch must stay the same; use a multiple of {self.world_size} "
                             f"(e.g. train.grad_accum={self.world_size * -(-grad_accum // self.world_size)}, "
                             "with train.batch_size adjusted to keep the tokens per step)")
        return grad_accum // self.world_size

    def global_micro(self, micro, local_accum):
        return self.rank * local_accum + micro

    def wrap(self, model):
        """The module the forward pass goes through: the model itself, DDP around it, or the model sharded in place."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [model.embed_tokens.weight.device] if model.embed_tokens.weight.is_cuda else None
            return DistributedDataParallel(model, device_ids=device_ids)
        if self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in model.layers:
                fully_shard(block)
            fully_shard(model)  # the embeddings, final norm and head; a tied matrix stays one parameter
        return model

    @contextlib.contextmanager
    def gradient_sync(self, forward_model, last):
        """Sync gradients only on the last micro-batch of a step."""
        if self.mode == "ddp" and not last:
            with forward_model.no_sync():
                yield
            return
        if self.mode == "fsdp":
            forward_model.set_requires_gradient_sync(last)
        yield

    def close(self):
        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------ agreement across ranks

    def mean(self, tensor):
        """The mean over ranks of a scalar tensor (the step's loss)."""
        if self.active:
            tensor = tensor.detach().clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor

    def sum(self, values):
        """Elementwise sums over ranks of a list of floats (validation loss totals and counts)."""
        return self._host_reduce(values, dist.ReduceOp.SUM)

    def max(self, values):
        """Elementwise maxima over ranks of a list of floats (clocks, stop flags, memory)."""
        return self._host_reduce(values, dist.ReduceOp.MAX)

    def _host_reduce(self, values, op):
        """All-reduce of host floats over the CPU (gloo) group: no GPU sync."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=op, group=self.control)
        return t.tolist()

    def broadcast(self, obj):
        """Rank 0's value of a picklable object (the run directory) on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def gather(self, obj):
        """[every rank's obj] on rank 0, None elsewhere (RNG states for checkpoints)."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.control)
        return out

    def barrier(self):
        if self.active:
            dist.barrier(group=self.control)

    @contextlib.contextmanager
    def local_main_first(self):
        """Local rank 0 builds the cache (tokenizer, shards) while the others wait, then they read it."""
        if self.active and self.local_rank != 0:
            self.barrier()
        yield
        if self.active and self.local_rank == 0:
            self.barrier()

    # ------------------------------------------------------------ full state for checkpoints and the final weights

    def full_weights(self, model):
        """{name: CPU tensor} of the whole model on rank 0 ({} elsewhere); collective under FSDP."""
        if self.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return {}
        return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}

    def full_optimizer_state(self, model, optimizer):
        """optimizer.state_dict() of the unsharded optimizer (parameters by index) on rank 0; {} elsewhere."""
        if self.mode != "fsdp":  # packed projections are saved as the separate ones (lmlab.model.fused)
            return unpacked_optimizer_state(model, optimizer, optimizer.state_dict()) if self.is_main else {}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        by_name = get_optimizer_state_dict(model, optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return {}
        names = _param_names(model, optimizer)
        index = {name: i for i, name in enumerate(names)}
        groups = []
        for group in by_name["param_groups"]:
            groups.append({**group, "params": [index[n] for n in group["params"]]})
        state = {index[name]: value for name, value in by_name["state"].items()}
        return {"state": state, "param_groups": groups}

    def load_full_state(self, model, optimizer, weights, optimizer_state):
        """Put full (unsharded) weights and optimizer state in place on this rank."""
        if self.mode != "fsdp":
            model.load_state_dict(weights, strict=True)
            optimizer.load_state_dict(packed_optimizer_state(model, optimizer, optimizer_state))
            return
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, weights, options=options)
        names = _param_names(model, optimizer)
        by_name = {"state": {names[int(i)]: value for i, value in optimizer_state["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                    for g in optimizer_state["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, by_name, options=options)


def _param_names(model, optimizer):
    """Parameter names in the optimizer's index order (the order optimizer.state_dict() numbers them)."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
