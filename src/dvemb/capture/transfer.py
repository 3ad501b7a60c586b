"""Asynchronous device-to-host copies of a step's rows: the training thread never waits for the device.

Rows captured on a CUDA device are converted to the storage dtype there, copied with ``non_blocking``
into pinned host buffers (torch's caching host allocator reuses them), and a CUDA event is recorded
after the copies. Whether every row is finite is computed on the device too and travels with the
copy as a small flag tensor. The store's writer thread calls :meth:`PendingStep.resolve`, which waits
on the event, checks the flags and returns the :class:`StepRecord`; a non-finite step raises there,
and the writer's sticky error hands it to the training thread at its next step or at close, naming
the step (the steps before it stay committed, none after it is written: no gap).

Used by a single process only: under torch.distributed the ranks agree on every step's finiteness
with a collective before writing it (``DistributedSink.check``), which needs the flag on the host at
once, so distributed recording keeps the synchronous path. On the CPU nothing is copied and the
synchronous path is used too (its host check is as cheap as the flags); ``PendingStep`` also works
with CPU tensors and no event, which is how the tests exercise this logic without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..devices import host_copy
from ..store.schema import StepRecord, storage_numpy, storage_tensor


class NonFiniteGradientError(FloatingPointError):
    """A step produced NaN or infinite per-sample gradients; nothing was committed."""


class _NoEvent:
    """Stands for a CUDA event when the rows are already on the host: nothing to wait for."""

    def synchronize(self) -> None:
        """Return at once."""


@dataclass
class PendingStep:
    """A step's records with rows still being copied from the device (see the module docstring).

    ``make_record(grads, curvature)`` builds the StepRecord from the host rows in the storage dtype.
    """

    step: int
    layers: Sequence[str]
    dtype: str
    grads: list[torch.Tensor]
    curvature: list[torch.Tensor] | None
    finite: torch.Tensor  # [layers * (1 or 2)] bool: gradient rows per layer, then curvature rows
    event: object
    make_record: Callable[[list[np.ndarray], list[np.ndarray] | None], StepRecord]

    @classmethod
    def start(cls, step: int, layers: Sequence[str], dtype: str, grads: Sequence[torch.Tensor],
              curvature: Sequence[torch.Tensor] | None,
              make_record: Callable[[list[np.ndarray], list[np.ndarray] | None], StepRecord]) -> "PendingStep":
        """Queue the conversion, the finiteness flags and the copies on the rows' device; return at once."""
        rows = [*grads, *(curvature or [])]
        device = rows[0].device
        cuda = device.type == "cuda"
        finite = torch.stack([torch.isfinite(r).all() for r in rows])
        host = [host_copy(storage_tensor(r, dtype)) for r in rows]
        flags = host_copy(finite)
        event = _NoEvent()
        if cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
        n = len(grads)
        return cls(step, list(layers), dtype, host[:n], None if curvature is None else host[n:], flags, event,
                   make_record)

    def resolve(self) -> StepRecord:
        """Wait for the copies, check the flags and return the step's record (raises for non-finite rows)."""
        self.event.synchronize()
        flags = self.finite.tolist()
        if not all(flags):
            bad = flags.index(False)
            where = "curvature rows" if bad >= len(self.layers) else "gradient"
            raise NonFiniteGradientError(f"non-finite per-sample {where} in layer {self.layers[bad % len(self.layers)]!r} "
                                     f"at step {self.step}; that step and the steps after it were not recorded")
        grads = [storage_numpy(g, self.dtype) for g in self.grads]
        curvature = None if self.curvature is None else [storage_numpy(c, self.dtype) for c in self.curvature]
        return self.make_record(grads, curvature)
