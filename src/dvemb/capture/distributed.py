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


def sharded_modules(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 (``fully_shard``) modules of ``model``; refuses the sharding the capture cannot record.

    Under FSDP2 on a 1-D mesh every rank runs the whole model on its own micro-batch, with each module's
    parameters all-gathered for its forward and backward: the hooks on a layer see the rank's local
    inputs and output gradients exactly as under DDP, and the reduce-scatter averages the ranks'
    gradients as DDP's all-reduce does (tests/test_fsdp.py). Parameters outside forward and backward are
    DTensor shards, gathered (``full_tensor``, a collective every rank joins) where the Recorder needs
    them whole: checkpoints, the parameter digest and Adam's second moments.

    Refused: FSDP1 (``FullyShardedDataParallel``: flat parameters, not tested), and DTensor parameters on
    a mesh of 2+ dimensions or outside FSDP2 (tensor parallelism splits a layer's computation across
    ranks, so no rank sees a sample's whole layer input and output gradient).
    """
    # an FSDP module or a DTensor can only exist once its module was imported: importing them
    # here ourselves would cost ~0.5 s (DTensor pulls in sympy) for every user
    fsdp = sys.modules.get("torch.distributed.fsdp")
    tensor = sys.modules.get("torch.distributed.tensor")
    fsdp1 = getattr(fsdp, "FullyShardedDataParallel", None)
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules()):
        raise ValueError("FSDP-sharded models are not supported with FSDP1 (FullyShardedDataParallel, whose flat "
                         "parameters dvemb does not read): shard the model with FSDP2 "
                         "(torch.distributed.fsdp.fully_shard), or record with DDP or the unsharded model")
    fsdp2 = getattr(fsdp, "FSDPModule", None)
    found = [m for m in model.modules() if fsdp2 is not None and isinstance(m, fsdp2)]
    dtensor = getattr(tensor, "DTensor", None)
    if dtensor is None:
        return found
    owners = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    for name, p in model.named_parameters():
        if not isinstance(p, dtensor):
            continue
        if not found or p.device_mesh.ndim != 1 or not _under(owners[id(p)], found):
            raise ValueError(f"parameter {name!r} is a DTensor outside FSDP2 on a 1-D mesh (tensor parallelism, or "
                             "HSDP): the capture needs every rank to compute whole layers on its own samples; "
                             "record with FSDP2 (fully_shard) on a 1-D mesh, DDP or the unsharded model")
    return found


def _under(module: nn.Module, sharded: list[nn.Module]) -> bool:
    """Whether ``module`` is one of the ``sharded`` modules or inside one."""
    return any(module is s or any(module is m for m in s.modules()) for s in sharded)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole on every rank (a collective: every rank must call it), else the tensor."""
    gather = getattr(tensor, "full_tensor", None)
    return tensor if gather is None else gather()
