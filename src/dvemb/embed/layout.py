"""Where a store keeps its embeddings.

    embeddings/manifest.json         steps covered, segment boundaries, precision
    embeddings/<layer>.npy           DVEmb relative to the final step T  [n_records, dim]
    embeddings/segments/<layer>.npy  DVEmb relative to the end of each record's segment (K > 1;
                                     rows of the last segment unused: they are final)
    embeddings/segments/<layer>.<buffer>.npy   optimizers with buffers (momentum_buffer, exp_avg,
                                     exp_avg_sq): each record's effect on the buffer at the end
                                     of its segment
    embeddings/segments/block-<b>.propagators.npy   K_j = prod_{t in segment j} (I - eta_t H_t)
                                     of block b (its layers' dims together)  [K, dim_b, dim_b];
                                     with buffers the map of (theta, buffers)  [K, parts dim_b, parts dim_b]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..store import MANIFEST, AppendableArray, Store, read_json
from .coefficients import linearised_rule

EMBEDDINGS_DIR = "embeddings"
SEGMENTS_DIR = "segments"


def _float(precision: str) -> np.dtype:
    return np.dtype("<f8" if precision == "float64" else "<f4")


def embeddings_dir(store: Store) -> Path:
    """The store's embeddings directory."""
    return store.path / EMBEDDINGS_DIR


def final_arrays(store: Store, precision: str) -> list[AppendableArray]:
    """Per-layer embeddings relative to the last step."""
    return [AppendableArray(embeddings_dir(store) / f"{s.name}.npy", _float(precision), (s.dim,)) for s in store.layers]


def state_parts(store: Store) -> int:
    """Parts of a record's local embedding: its effect on theta, and on each buffer of the update rule."""
    return linearised_rule(store).parts


def state_blocks(store: Store, blocks: list[list[int]]) -> list[list[int]]:
    """Per block, indices into :func:`segment_arrays`: its layers' theta parts, then their buffer parts."""
    n = len(store.layers)
    return [[i + part * n for part in range(state_parts(store)) for i in block] for block in blocks]


def segment_arrays(store: Store, precision: str) -> list[AppendableArray]:
    """Per-layer embeddings relative to the end of their segment, then each buffer's part for every layer."""
    suffixes = [""] + [f".{name}" for name in linearised_rule(store).buffers]
    return [AppendableArray(embeddings_dir(store) / SEGMENTS_DIR / f"{s.name}{suffix}.npy", _float(precision),
                            (s.dim,)) for suffix in suffixes for s in store.layers]


def propagator_arrays(store: Store, precision: str, blocks: list[list[int]]) -> list[AppendableArray]:
    """Per-block stacks of segment propagators [K, dim_b, dim_b] ([K, parts dim_b, parts dim_b] with buffers)."""
    dims = [state_parts(store) * sum(store.layers[i].dim for i in block) for block in blocks]
    return [AppendableArray(embeddings_dir(store) / SEGMENTS_DIR / f"block-{b}.propagators.npy", _float(precision),
                            (d, d)) for b, d in enumerate(dims)]


def embedding_info(store: Store) -> dict | None:
    """The embeddings manifest, or None when none were computed."""
    path = embeddings_dir(store) / MANIFEST
    return read_json(path) if path.exists() else None


LAYOUT_VERSION = 2  # 2: buffer parts named after the update rule's buffers


def embeddings_are_current(store: Store) -> bool:
    """Whether embeddings exist in this layout and cover every committed step."""
    info = embedding_info(store)
    return (info is not None and info["committed_steps"] == store.n_steps
            and info.get("layout_version", 1) == LAYOUT_VERSION)
