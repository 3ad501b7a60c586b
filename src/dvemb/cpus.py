"""Whether a helper thread (projection worker, read-ahead) has a CPU of its own."""

from __future__ import annotations

import os

import torch


def spare_cpu() -> bool:
    """Whether this process may use more CPUs than torch's intra-op threads already do.

    Measured on 2 CPUs: with 1 torch thread, a capture worker took the capture overhead from
    1.41 to 1.22 (2026-11-28; it now takes only large projections, see ghost.OVERLAP_MIN_FLOPS)
    and a scoring read-ahead thread makes streamed scoring 1.3x faster; with 2
    torch threads each competes with torch's own threads (training 0.33 -> 0.41 s end to end;
    streamed scoring of 1 test point 1.6x slower than mapping the files).
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return cpus > torch.get_num_threads()
