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

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from ..progress import ProgressBar

from ..store import AppendableArray, MANIFEST, Store, read_json, to_torch, write_json_atomic

Precision = Literal["float32", "float64"]
_TORCH = {"float32": torch.float32, "float64": torch.float64}

EMBEDDINGS_DIR = "embeddings"


@dataclass(frozen=True)
class EmbeddingInfo:
    """Where and how a store's embeddings were computed."""

    path: Path
    committed_steps: int
    committed_records: int
    precision: str
    seconds: float


def default_precision(store: Store) -> Precision:
    """float64 for float64 stores, else float32 (shown accurate to ~1e-5 by the tests)."""
    return "float64" if store.dtype == "float64" else "float32"


def embedding_arrays(store: Store, precision: str) -> list[AppendableArray]:
    """The per-layer embedding files of a store."""
    dtype = np.dtype("<f8" if precision == "float64" else "<f4")
    return [AppendableArray(store.path / EMBEDDINGS_DIR / f"{s.name}.npy", dtype, (s.dim,)) for s in store.layers]


def embedding_info(store: Store) -> dict | None:
    """The embeddings manifest, or None when none were computed."""
    path = store.path / EMBEDDINGS_DIR / MANIFEST
    return read_json(path) if path.exists() else None


def embeddings_are_current(store: Store) -> bool:
    """Whether embeddings exist and cover every committed step."""
    info = embedding_info(store)
    return info is not None and info["committed_steps"] == store.n_steps


def compute_embeddings(
    path: str | os.PathLike,
    *,
    precision: Precision | None = None,
    chunk_rows: int = 8192,
    show_progress: bool = True,
) -> EmbeddingInfo:
    """Run Algorithm 1 over the store at ``path`` and write its embeddings into it."""
    store = Store(path)
    if store.n_steps == 0:
        raise ValueError(f"{store.path} has no committed steps")
    precision = precision or default_precision(store)
    if precision not in _TORCH:
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    dtype = _TORCH[precision]
    out_dir = store.path / EMBEDDINGS_DIR
    out_dir.mkdir(exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # invalidate before overwriting

    start = time.perf_counter()
    outputs = embedding_arrays(store, precision)
    sinks = [arr.allocate(store.n_records) for arr in outputs]
    records = store.records
    lrs = np.asarray(records["lr"])
    weights = np.asarray(records["weight"])
    grads = [store.grads(i) for i in range(len(store.layers))]
    ms = [torch.zeros(s.dim, s.dim, dtype=dtype) for s in store.layers]

    bar = ProgressBar(total=store.n_steps, desc="embeddings", unit="step", disable=not show_progress)
    for t, r0, r1, rows in store.iter_steps_backward(grads, chunk_rows):
        scale = torch.from_numpy(lrs[r0:r1] * weights[r0:r1]).to(dtype).unsqueeze(1)
        for m, sink, block in zip(ms, sinks, rows):
            g = to_torch(block, store.dtype).to(dtype)
            e = scale * (g - g @ m.t())
            m.addmm_(e.t(), g)
            sink[r0:r1] = e.numpy()
        bar.update(1)
    bar.close()
    for sink in sinks:
        sink.flush()
    seconds = time.perf_counter() - start
    write_json_atomic(out_dir / MANIFEST, {
        "committed_steps": store.n_steps, "committed_records": store.n_records, "precision": precision,
        "curvature": store.manifest["curvature"], "seconds": seconds,
    })
    return EmbeddingInfo(out_dir, store.n_steps, store.n_records, precision, seconds)

