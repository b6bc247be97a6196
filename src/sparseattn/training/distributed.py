"""Data-parallel training under ``torchrun``: launch detection, the process group, DDP and batch sharding.

    torchrun --standalone --nproc-per-node 2 -m sparseattn.cli finetune --task sst2 --batch-size 16 ...

Used by finetune, learn, train-lm, ap collect and the prune / prune-lm methods (docs/cluster.md).

A run is data-parallel when torchrun (or any launcher that sets ``WORLD_SIZE`` > 1, ``RANK`` and
``LOCAL_RANK``) started it; otherwise nothing here changes the single-process path.

Conventions:
- ``batch_size`` is per rank: one optimizer step sees ``batch_size x world_size`` examples, and each rank's mean
  loss is weighted by its share of them (``loss_weights``), so an uneven last batch averages as one process's.
- Every rank draws the same epoch order (same seed), makes global batches of ``batch_size x world_size``
  exactly as a single process with that batch size would, and takes its own disjoint slice of each.
- Every rank evaluates the whole evaluation split with the (identical) unwrapped model, so metrics agree on
  every rank without a gather; only rank 0 prints and writes ``results.json``.
- Backend: nccl on CUDA, gloo on the CPU. The process group is destroyed at the end of the run (unless the
  caller initialized it).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Distributed", "from_env", "launched", "loss_weights", "refuse_under_launcher", "shard_batches"]


def launched() -> bool:
    """Whether this process was started by torchrun (or a launcher like it) with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def refuse_under_launcher(what: str, why: str) -> None:
    """Stop ``what`` when torchrun started several processes: it is not data-parallel, and every process would
    run it whole and write its files. ConfigError naming the world size and ``why``."""
    if launched():
        from ..errors import ConfigError

        raise ConfigError(f"{what} does not run data-parallel ({why}); torchrun started {os.environ['WORLD_SIZE']} "
                          "processes: run it as one process (without torchrun)")


@dataclass
class Distributed:
    """This process's place in a data-parallel run; ``world_size == 1`` means a plain single process."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False  # we initialized the process group and destroy it

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device=None) -> torch.device | None:
        """The device of this rank: cuda:LOCAL_RANK when CUDA is asked for (or None and available)."""
        if not self.active:
            return device if device is None else torch.device(device)
        dev = torch.device(device) if device is not None else \
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", self.local_rank)
        return dev

    def init(self, device: torch.device) -> None:
        """Join the process group (nccl on CUDA, gloo otherwise) if nobody has yet."""
        if not self.active:
            return
        import torch.distributed as dist

        if not self.is_main:  # rank 0 alone warns about the data, the plan and the run
            import logging

            logging.getLogger("sparseattn").setLevel(logging.ERROR)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if dist.is_initialized():
            self.backend = dist.get_backend()
            return
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size)
        self.owns_group = True

    @contextmanager
    def joined(self, device: torch.device):
        """The process group joined (``init``) for the block, and left after it if this process made it."""
        self.init(device)
        try:
            yield self
        finally:
            self.close()

    def close(self) -> None:
        if self.active and self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False

    def wrap(self, model):
        """``model`` wrapped in DistributedDataParallel (inputs are already on the model's device)."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=None)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` averaged over the ranks (elementwise)."""
        if not self.active:
            return t
        import torch.distributed as dist

        t = t.detach().clone().float()
        dist.all_reduce(t)
        return t / self.world_size

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` added up over the ranks (a detached copy; elementwise)."""
        if not self.active:
            return t.detach()
        import torch.distributed as dist

        t = t.detach().clone()
        dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    @contextmanager
    def main_first(self):
        """Rank 0 runs the block first, the other ranks after it: what rank 0 makes and caches there (a
        tokenizer, a checkpoint, attention averages) the others then find made."""
        if self.active and not self.is_main:
            self.barrier()
        yield
        if self.active and self.is_main:
            self.barrier()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (a decision only rank 0 can make, e.g. whether a file exists)."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def to_dict(self) -> dict:
        return {"world_size": self.world_size, "backend": self.backend}


def from_env() -> Distributed:
    """The run's Distributed from torchrun's environment (a single process when not launched)."""
    if not launched():
        return Distributed()
    return Distributed(world_size=int(os.environ["WORLD_SIZE"]), rank=int(os.environ["RANK"]),
                       local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def loss_weights(batches: list[np.ndarray], rank: int, world_size: int) -> list[float]:
    """For each global batch, the factor this rank's mean loss over its slice (``shard_batches``) is multiplied by
    so that the ranks' average, which DDP takes of the gradients (and ``Distributed.mean`` of the losses), is the
    mean over the global batch, as one process computes it: slice size x world_size / global batch size (1 for
    even slices; an epoch's last batch may be uneven), 0 for a rank that only repeats an example of a batch smaller
    than the world."""
    out = []
    for b in batches:
        n = len(np.array_split(b, world_size)[rank])
        out.append(n * world_size / len(b) if world_size > 1 else 1.0)
    return out


def shard_batches(batches: list[np.ndarray], rank: int, world_size: int) -> list[np.ndarray]:
    """This rank's slice of each global batch (contiguous, disjoint across ranks, sizes differing by at most
    one). A global batch smaller than the world (only an epoch's last can be) gives the ranks left without
    an example one of its examples again, so every rank takes every step."""
    if world_size == 1:
        return batches
    out = []
    for b in batches:
        part = np.array_split(b, world_size)[rank]
        out.append(part if len(part) else b[[rank % len(b)]])
    return out
