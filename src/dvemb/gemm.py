"""Float32 products of scoring and of the recursion: ``tests @ rows.T`` and the rank-B update ``M += E^T G``.

On x86 CPUs torch sends float32 matrix products to MKL, whose kernels for skinny products
(few test points against many records) and on AMD CPUs (no AVX-512 path) leave much of the
machine unused. oneDNN, which torch ships, runs the same float32 product (same rounding:
float32 inputs, float32 accumulation) 1.1-1.7x faster for one test point and 2.2-2.4x for
100 on this project's AMD EPYC benchmark machine (benchmarks/scoring_efficiency.py). It is used
through torch's own op for oneDNN linear layers when that op exists and the product is big
enough to repay its fixed cost of about 10 us; anything else (float64, other devices,
builds without oneDNN) uses ``torch.mm``. The recursion's G M^T runs 2.2x faster, and its
rank-B update 1.7x when M stays in the last-level cache (the op has no in-place form, so
the update costs an extra pass over M: beyond the cache, MKL's in-place ``addmm_`` wins).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

ONEDNN_MIN_ELEMENTS = 1 << 16  # rows x dims below which torch.mm wins (oneDNN's ~10 us per call measured)
DEFAULT_CACHE_BYTES = 8 << 20  # last-level cache assumed where the OS does not say


def _onednn_linear() -> object | None:
    """torch's oneDNN linear op (``x @ w.T`` on dense float32 tensors), or None without oneDNN."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        op = torch.ops.mkldnn._linear_pointwise.default
        probe = op(torch.ones(1, 2), torch.ones(3, 2), None, "none", [], "")
        return op if probe.shape == (1, 3) and bool((probe == 2).all()) else None
    except (AttributeError, RuntimeError):
        return None


_LINEAR = _onednn_linear()


def onednn_available() -> bool:
    """Whether float32 products on the CPU go through oneDNN."""
    return _LINEAR is not None


@functools.cache
def last_level_cache_bytes() -> int:
    """Size of the CPU's last-level cache (Linux sysfs), or DEFAULT_CACHE_BYTES where unknown."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
            sizes.append(int(text[:-1]) << {"K": 10, "M": 20}[text[-1]] if text[-1] in "KM" else int(text))
        except (OSError, ValueError):
            continue
    return max(sizes, default=DEFAULT_CACHE_BYTES)


def _onednn_fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether oneDNN takes the float32 CPU product of ``a`` with a large ``b``."""
    return (_LINEAR is not None and a.dtype == torch.float32 and b.dtype == torch.float32
            and a.device.type == "cpu" and b.device.type == "cpu" and b.numel() >= ONEDNN_MIN_ELEMENTS)


def rows_product(tests: torch.Tensor, rows: torch.Tensor, onednn: bool = True) -> torch.Tensor:
    """``tests @ rows.T`` as a new [n_test, n_rows] tensor (``rows`` contiguous, [n_rows, dim])."""
    if onednn and _onednn_fits(tests, rows) and rows.is_contiguous():
        return _LINEAR(tests.contiguous(), rows, None, "none", [], "")
    return tests @ rows.t()


def add_outer(m: torch.Tensor, e: torch.Tensor, g: torch.Tensor, onednn: bool = True) -> None:
    """``m += e.T @ g`` in place ([p, q] += [B, p]^T [B, q])."""
    if onednn and _onednn_fits(e, m) and 2 * m.numel() * m.element_size() <= last_level_cache_bytes():
        m.add_(_LINEAR(e.t().contiguous(), g.t().contiguous(), None, "none", [], ""))
    else:
        m.addmm_(e.t(), g)


def scores(tests: list[torch.Tensor], rows: list[torch.Tensor], onednn: bool = True) -> torch.Tensor:
    """Summed over layers: ``sum_l tests[l] @ rows[l].T``, [n_test, n_rows]."""
    acc = rows_product(tests[0], rows[0], onednn)
    for test, layer_rows in zip(tests[1:], rows[1:]):
        acc += rows_product(test, layer_rows, onednn)
    return acc
