"""torch.distributed support: which rank we are, and the few collectives a step needs.

Each rank records its own micro-batch into its own shard; per step the ranks only
exchange two numbers (a non-finite flag and their sample count), never gradients.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistributedContext:
    """Rank, world size and the device collectives run on."""

    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def detect(cls) -> "DistributedContext | None":
        """The context of an initialised process group of 2+ ranks, else None."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def sum(self, *values: float) -> list[float]:
        """All-reduce (sum) a few numbers across ranks."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        """Wait for every rank."""
        dist.barrier()


def refuse_fsdp(model: nn.Module) -> None:
    """FSDP shards parameters and gradients, which the ghost capture does not handle yet."""
    # an FSDP module or a DTensor can only exist once its module was imported: importing them
    # here ourselves would cost ~0.5 s (DTensor pulls in sympy) for every user
    fsdp = sys.modules.get("torch.distributed.fsdp")
    tensor = sys.modules.get("torch.distributed.tensor")
    sharded_modules = tuple(c for c in (getattr(fsdp, "FullyShardedDataParallel", None),) if c is not None)
    sharded_params = tuple(c for c in (getattr(tensor, "DTensor", None),) if c is not None)
    if (sharded_modules and any(isinstance(m, sharded_modules) for m in model.modules())) or (
            sharded_params and any(isinstance(p, sharded_params) for p in model.parameters())):
        raise ValueError("FSDP-sharded models are not supported yet: record with DDP (DistributedDataParallel), "
                         "or with the unsharded model")
