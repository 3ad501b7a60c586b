"""Algorithm 1: data value embeddings by a backward recursion over the recorded steps.

With H_k ~ sum_i w_ki g_ki g_ki^T, the propagator K = prod_{k>t} (I - eta_k H_k) is
kept as K = I - M, one M per layer, updated from the last step backwards::

    M = 0
    for t = T-1 .. 0:
        e_ti = eta_t w_ti (g_ti - M g_ti)        (row form: E = eta w (G - G M^T))
        M   += sum_i e_ti g_ti^T                  (M += E^T G)

so DVEmb(t, i) = e_ti = eta_t w_ti K g_ti. Memory is O(sum_l dim_l^2) plus one chunk
of records, read from the store backwards in time.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import numpy as np
import torch

from ..store import Store, to_torch

Precision = Literal["float32", "float64"]
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def default_precision(store: Store) -> Precision:
    """float64 for float64 stores, else float32 (shown accurate to ~1e-5 by the tests)."""
    return "float64" if store.dtype == "float64" else "float32"


def run_recursion(
    store: Store,
    layers: Sequence[int],
    sinks: Sequence[np.ndarray],
    start: int,
    stop: int,
    precision: Precision,
    chunk_rows: int,
    on_step: Callable[[], None] = lambda: None,
) -> list[torch.Tensor]:
    """Run the recursion over steps [start, stop) from M = 0 for the given layers.

    Writes each record's embedding relative to step ``stop`` into ``sinks`` (one
    [n_records, dim] array per layer, rows indexed like the store) and returns the
    segment's propagators K = I - M, one per layer.
    """
    dtype = TORCH_DTYPES[precision]
    records = store.records
    scale_all = np.asarray(records["lr"]) * np.asarray(records["weight"])
    grads = [store.grads(i) for i in layers]
    ms = [torch.zeros(store.layers[i].dim, store.layers[i].dim, dtype=dtype) for i in layers]
    for _, r0, r1, rows in store.iter_steps_backward(grads, chunk_rows, start, stop):
        scale = torch.from_numpy(scale_all[r0:r1]).to(dtype).unsqueeze(1)
        for m, sink, block in zip(ms, sinks, rows):
            g = to_torch(block, store.dtype).to(dtype)
            e = scale * (g - g @ m.t())
            m.addmm_(e.t(), g)
            sink[r0:r1] = e.numpy()
        on_step()
    for m in ms:  # K = I - M, in place
        m.neg_().diagonal().add_(1.0)
    return ms
