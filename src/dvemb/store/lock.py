"""One writer per store: an exclusive advisory lock on a lock file, released when the writer closes or dies.

Two processes recording into one path used to interleave their steps without error. A writer now
takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<dir>/.lock`` (each rank on its own shard under
torch.distributed; ``compute_embeddings`` on ``embeddings/.lock``, so embeddings can be computed
from a store that is still being recorded). A second writer gets a StoreError naming the store
and the process that holds it. The kernel drops the lock when the holder exits, even after kill -9.
"""

from __future__ import annotations

import os
from pathlib import Path

from .schema import StoreError

LOCK_FILE = ".lock"

try:
    import fcntl
except ImportError:  # not POSIX: no locking (documented)
    fcntl = None


class StoreLock:
    """An exclusive lock on a directory, held until :meth:`release` (or the process's end)."""

    def __init__(self, directory: str | os.PathLike, what: str = "written") -> None:
        self.path = Path(directory) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            self._fd = None
            raise StoreError(f"{Path(directory)} is being {what} by {holder}: one writer at a time (wait for it "
                             "to close, or use another path)") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"process {os.getpid()}".encode(), 0)

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
