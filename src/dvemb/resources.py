"""What this machine can hold: work that cannot fit in memory or on disk is refused before it starts.

A run that would fail hours in (the kernel's OOM killer, a disk filled half-way) is refused up
front with the figures: what it needs and what there is. Only certain failures are refused: the
bound compared is the whole physical memory (not what is free now) and the free disk space.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

GIB = 1 << 30


def physical_memory() -> int | None:
    """Bytes of physical memory, or None where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(need: int, what: str, advice: str, memory: int | None = None,
                 holder: str = "this machine") -> None:
    """Raise MemoryError when ``need`` bytes exceed ``memory`` (default: the physical memory) of ``holder``."""
    memory = physical_memory() if memory is None else memory
    if memory is not None and need > memory:
        raise MemoryError(f"{what} needs {need / GIB:,.1f} GiB and {holder} has {memory / GIB:,.1f} GiB: "
                          f"{advice}")


def check_disk(path: str | os.PathLike, need: int, what: str) -> None:
    """Raise OSError (no space) when ``need`` bytes exceed the free space where ``path`` lies."""
    where = Path(path)
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise OSError(28, f"{what} needs {need / GIB:,.2f} GiB on disk and {where} has {free / GIB:,.2f} GiB free")
