"""Products of test gradients with rows of embeddings: ``tests @ rows.T``, the inner loop of scoring.

On x86 CPUs torch sends float32 matrix products to MKL, whose kernels for skinny products
(few test points against many records) and on AMD CPUs (no AVX-512 path) leave much of the
machine unused. oneDNN, which torch ships, runs the same float32 product (same rounding:
float32 inputs, float32 accumulation) 1.4x faster for one test point and 2x for 100 on
this project's AMD EPYC benchmark machine (benchmarks/scoring_efficiency.py). It is used
through torch's own op for oneDNN linear layers when that op exists and the product is big
enough to repay its fixed cost of about 10 us; anything else (float64, other devices,
builds without oneDNN) uses ``torch.mm``.
"""

from __future__ import annotations

import torch

ONEDNN_MIN_ELEMENTS = 1 << 16  # rows x dims below which torch.mm wins (oneDNN's ~10 us per call measured)


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


def rows_product(tests: torch.Tensor, rows: torch.Tensor, onednn: bool = True) -> torch.Tensor:
    """``tests @ rows.T`` as a new [n_test, n_rows] tensor (``rows`` contiguous, [n_rows, dim])."""
    if (onednn and _LINEAR is not None and tests.dtype == torch.float32 and rows.dtype == torch.float32
            and tests.device.type == "cpu" and rows.device.type == "cpu" and rows.numel() >= ONEDNN_MIN_ELEMENTS
            and rows.is_contiguous()):
        return _LINEAR(tests.contiguous(), rows, None, "none", [], "")
    return tests @ rows.t()


def scores(tests: list[torch.Tensor], rows: list[torch.Tensor], onednn: bool = True) -> torch.Tensor:
    """Summed over layers: ``sum_l tests[l] @ rows[l].T``, [n_test, n_rows]."""
    acc = rows_product(tests[0], rows[0], onednn)
    for test, layer_rows in zip(tests[1:], rows[1:]):
        acc += rows_product(test, layer_rows, onednn)
    return acc
