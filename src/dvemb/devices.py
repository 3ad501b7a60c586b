"""Where the recursion and the queries run: device names, and copies between the host and a device.

On the CPU every copy is a plain conversion. On a CUDA device rows read from the store go
through pinned (page-locked) host memory with non-blocking copies, so reading the next rows
overlaps the device's work, and results come back the same way: :class:`HostCopies` queues a
copy into pinned memory with a CUDA event and writes it out once the event has completed,
without stopping the host at every step.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Callable, Iterator

import numpy as np
import torch

Device = str | torch.device | None
PENDING_COPIES = 16
"""Device-to-host copies in flight before :class:`HostCopies` waits for the oldest."""


def resolve_device(device: Device) -> torch.device:
    """``device`` as a torch.device (None: the CPU); a clear error for a device this process cannot use."""
    if device is None:
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available to this process (torch "
                             f"{torch.__version__}, CUDA build: {torch.version.cuda is not None})")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: this process sees {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type != "cpu":
        raise ValueError(f"device={device!r}: dvemb runs on 'cpu' or 'cuda' devices")
    return resolved


def worker_devices(device: torch.device, workers: int) -> list[torch.device]:
    """The device of each of ``workers`` processes: every visible GPU in turn for an unnumbered 'cuda'."""
    if device.type == "cuda" and device.index is None:
        count = torch.cuda.device_count()
        return [torch.device("cuda", w % count) for w in range(workers)]
    return [device] * workers


def device_memory(device: torch.device) -> int | None:
    """Total memory of a CUDA device in bytes; None for the CPU (whose bound is the physical memory)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def to_device(rows: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows on ``device`` in ``dtype`` (None: theirs); to a CUDA device through pinned memory, without waiting
    for the copy. On the CPU, rows already in ``dtype`` are not copied."""
    tensor = torch.from_numpy(np.ascontiguousarray(rows)) if isinstance(rows, np.ndarray) else rows
    dtype = tensor.dtype if dtype is None else dtype
    if device.type == "cpu" or tensor.device == device:
        return tensor.to(device=device, dtype=dtype)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device=device, non_blocking=True).to(dtype=dtype)


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """Start copying ``tensor`` into a pinned host buffer without waiting (the copy is complete once the
    device's stream passes this point: record an event to know when); a CPU tensor is returned as is."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


class HostCopies:
    """Device results written to host sinks in order, without a synchronisation per result.

    ``put(write, tensor)`` copies ``tensor`` into pinned host memory (non-blocking) and calls
    ``write(array)`` once the copy has completed; on the CPU it writes at once. ``finish``
    waits for every copy still in flight.
    """

    def __init__(self, device: torch.device, pending: int = PENDING_COPIES) -> None:
        self._device = device
        self._limit = pending
        self._queue: deque[tuple[object, torch.Tensor, Callable[[np.ndarray], None]]] = deque()

    def put(self, write: Callable[[np.ndarray], None], tensor: torch.Tensor) -> None:
        """Write ``tensor`` (on this object's device) through ``write`` once it is on the host."""
        if tensor.device.type == "cpu":
            write(tensor.numpy())
            return
        host = host_copy(tensor)
        event = torch.cuda.Event()
        event.record()
        self._queue.append((event, host, write))
        self._drain(block=len(self._queue) > self._limit)

    def finish(self) -> None:
        """Wait for every copy in flight and write it."""
        while self._queue:
            self._drain(block=True)

    def _drain(self, block: bool) -> None:
        """Write the completed copies at the head of the queue (with ``block``, at least the oldest)."""
        while self._queue:
            event, host, write = self._queue[0]
            if not event.query():
                if not block:
                    return
                event.synchronize()
            self._queue.popleft()
            write(host.numpy())
            block = False


@contextlib.contextmanager
def tf32(allowed: bool) -> Iterator[None]:
    """Let float32 matrix products on CUDA use TF32 (10-bit mantissa inputs) inside the block, or forbid it."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
