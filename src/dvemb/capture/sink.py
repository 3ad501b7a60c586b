"""Where a Recorder's steps go: one process's store, or each rank's shard of a distributed store."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..store import (MANIFEST, BackgroundWriter, DistributedIndex, StepRecord, StoreConfig, StoreError, StoreWriter,
                     read_json, shard_path)
from ..store.writer import InitialMoments, Mode
from .distributed import DistributedContext


class LocalSink:
    """A single process: steps are written by a background thread, committed in groups."""

    rank, world_size = 0, 1

    def __init__(self, path: str | os.PathLike, fsync: bool) -> None:
        self.path, self.fsync = Path(path), fsync
        self._writer: BackgroundWriter | None = None

    def open(self, config: StoreConfig, mode: Mode = "new", initial_moments: InitialMoments | None = None) -> None:
        """Create the store (with Adam's ``initial_moments``, see StoreWriter), or resume it after its last commit
        (at most 4 steps in flight)."""
        self._writer = BackgroundWriter(StoreWriter(self.path, config, fsync=self.fsync, mode=mode,
                                                    initial_moments=initial_moments))

    def committed_steps(self) -> int:
        """Steps of the store before this recorder's (0 before it was opened)."""
        return 0 if self._writer is None else self._writer.submitted

    def set_layers(self, layers) -> None:
        """Store fitted bases before the first step."""
        assert self._writer is not None
        self._writer.set_layers(layers)

    @property
    def stopped(self) -> bool:
        """Whether writing failed (and said so): the store keeps its committed steps and takes no more."""
        return self._writer is not None and self._writer.stopped

    def set_metadata(self, key: str, value: object) -> None:
        """Record a value in the store's manifest (once every step is written)."""
        if self._writer is not None:
            self._writer.flush()
            self._writer.writer.set_metadata(key, value)

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

    def open(self, config: StoreConfig, mode: Mode = "new", initial_moments: InitialMoments | None = None) -> None:
        """Rank 0 creates or resumes the top manifest; every rank its shard (with Adam's ``initial_moments``), rolled
        back to the global commit.

        A rank that cannot open makes every rank fail (no rank waits for the others forever)."""
        error = None
        if self.rank == 0:
            error = self._together(lambda: setattr(self, "_index", DistributedIndex(
                self.path, config, self.world_size, fsync=self.fsync, mode=mode)), None)
        self._raise_together(error, "rank 0 could not open the store")
        committed = read_json(self.path / MANIFEST)["committed_steps"]
        shard_mode = "resume" if committed or mode == "resume" else "overwrite"  # rank 0 decided for the store
        if initial_moments is not None and not committed:  # read here, by every rank together (FSDP gathers them)
            moments = initial_moments()
            initial_moments = lambda: moments  # noqa: E731
        error = self._together(lambda: setattr(self, "_writer", StoreWriter(
            shard_path(self.path, self.rank), config, fsync=self.fsync, rollback_to_steps=committed,
            mode=shard_mode, initial_moments=initial_moments if not committed else None)), None)
        self._raise_together(error, "another rank could not open its shard")

    @staticmethod
    def _together(call, error: BaseException | None) -> BaseException | None:
        """Run ``call``, returning its error instead of raising it (to be raised on every rank together)."""
        try:
            call()
        except BaseException as exc:  # re-raised by _raise_together after the ranks agree
            return exc
        return error

    def _raise_together(self, error: BaseException | None, others: str) -> None:
        """Raise on every rank when any rank failed: its own error, or a StoreError saying another failed."""
        failed, _ = self.context.sum(error is not None, 0)
        if error is not None:
            raise error
        if failed:
            raise StoreError(f"{self.path}: {others}")

    stopped = False  # writes are synchronous: their errors reach the caller at once

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

    def set_metadata(self, key: str, value: object) -> None:
        """Record a value in every shard's manifest and rank 0's top manifest."""
        if self._writer is not None:
            self._writer.set_metadata(key, value)
        if self._index is not None:
            self._index.manifest[key] = value
            self._index.commit(self._index.n_steps, self._index.n_records)

    def close(self) -> None:
        """Close the shard (and rank 0's top manifest)."""
        if self._writer is not None:
            self._writer.close()
        if self._index is not None:
            self._index.close()


def sink_for(path: str | os.PathLike, fsync: bool) -> LocalSink | DistributedSink:
    """The sink of this process: distributed under an initialised process group of 2+ ranks."""
    context = DistributedContext.detect()
    return LocalSink(path, fsync) if context is None else DistributedSink(path, fsync, context)
