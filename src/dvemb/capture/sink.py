"""Where a Recorder's steps go: one process's store, or each rank's shard of a distributed store."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..store import (MANIFEST, BackgroundWriter, DistributedIndex, StepRecord, StoreConfig, StoreWriter, read_json,
                     shard_path)
from .distributed import DistributedContext


class LocalSink:
    """A single process: steps are written by a background thread, committed in groups."""

    rank, world_size = 0, 1

    def __init__(self, path: str | os.PathLike, fsync: bool) -> None:
        self.path, self.fsync = Path(path), fsync
        self._writer: BackgroundWriter | None = None

    def open(self, config: StoreConfig) -> None:
        """Create the store, or resume it after its last commit (at most 4 steps in flight)."""
        self._writer = BackgroundWriter(StoreWriter(self.path, config, fsync=self.fsync))

    def committed_steps(self) -> int:
        """Steps of the store before this recorder's (0 before it was opened)."""
        return 0 if self._writer is None else self._writer.submitted

    def set_layers(self, layers) -> None:
        """Store fitted bases before the first step."""
        assert self._writer is not None
        self._writer.set_layers(layers)

    def check(self, bad: bool, n: int) -> tuple[bool, int]:
        """(any rank's step non-finite, the step's records over all ranks)."""
        return bad, n

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum over ranks (nothing to do)."""

    def agree(self, value: int) -> int:
        """The largest value any rank proposes."""
        return value

    def append(self, step: StepRecord, n_total: int) -> None:
        """Hand a step to the writer."""
        assert self._writer is not None
        self._writer.append_step(step)

    def flush(self) -> None:
        """Wait until every step is committed."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Commit and close the store."""
        if self._writer is not None:
            self._writer.close()


class DistributedSink:
    """torch.distributed: each rank writes its own shard; rank 0 keeps the global commit (two numbers per step)."""

    def __init__(self, path: str | os.PathLike, fsync: bool, context: DistributedContext) -> None:
        self.path, self.fsync, self.context = Path(path), fsync, context
        self.rank, self.world_size = context.rank, context.world_size
        self._index: DistributedIndex | None = None
        self._writer: StoreWriter | None = None

    def open(self, config: StoreConfig) -> None:
        """Rank 0 creates or resumes the top manifest; every rank its shard, rolled back to the global commit."""
        if self.rank == 0:
            self._index = DistributedIndex(self.path, config, self.world_size, fsync=self.fsync)
        self.context.barrier()
        committed = read_json(self.path / MANIFEST)["committed_steps"]
        self._writer = StoreWriter(shard_path(self.path, self.rank), config, fsync=self.fsync,
                                   rollback_to_steps=committed)

    def committed_steps(self) -> int:
        """Steps of the store before this recorder's."""
        return 0 if self._writer is None else self._writer.n_steps

    def set_layers(self, layers) -> None:
        """Store fitted bases before the first step: rank 0 in the top manifest, every rank in its shard."""
        assert self._writer is not None
        if self._index is not None:
            self._index.set_layers(layers)
        self._writer.set_layers(layers)
        self.context.barrier()

    def check(self, bad: bool, n: int) -> tuple[bool, int]:
        """(any rank's step non-finite, the step's records over all ranks): one all-reduce of two numbers."""
        n_bad, n_total = self.context.sum(bad, n)
        return bool(n_bad), int(n_total)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum a tensor over ranks, in place."""
        import torch.distributed as dist

        moved = tensor.to(self.context.device)
        dist.all_reduce(moved)
        tensor.copy_(moved.to(tensor.device))

    def agree(self, value: int) -> int:
        """The largest value any rank proposes (every rank gets it)."""
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=self.context.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def append(self, step: StepRecord, n_total: int) -> None:
        """Write the shard's part of the step, then (once every shard holds it) commit it globally."""
        assert self._writer is not None
        self._writer.append_step(step)
        self.context.barrier()
        if self._index is not None:
            self._index.commit(self._writer.n_steps, self._index.n_records + n_total)

    def flush(self) -> None:
        """Steps are committed as they come."""

    def close(self) -> None:
        """Close the shard."""
        if self._writer is not None:
            self._writer.close()


def sink_for(path: str | os.PathLike, fsync: bool) -> LocalSink | DistributedSink:
    """The sink of this process: distributed under an initialised process group of 2+ ranks."""
    context = DistributedContext.detect()
    return LocalSink(path, fsync) if context is None else DistributedSink(path, fsync, context)
