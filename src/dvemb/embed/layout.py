"""Where a store keeps its embeddings (see plan.py for parts and blocks).

    embeddings/manifest.json              steps and records covered, the store's fingerprint (which recording
                                          they come from), segment boundaries, precision, the plan
    embeddings/<layer>.npy                DVEmb relative to the final step T  [n_records, dim]
    embeddings/parts/<part>.npy           hierarchical plans: each part's DVEmb relative to T (a layer's
                                          embedding is the signed sum of its parts')
    embeddings/segments/<part>.npy        DVEmb relative to the end of each record's segment (K > 1;
                                          rows of the last segment unused: they are final)
    embeddings/segments/<part>.<buffer>.npy   optimizers with buffers (momentum_buffer, exp_avg,
                                          exp_avg_sq): each record's effect on the buffer at the end
                                          of its segment
    embeddings/segments/block-<b>.propagators.npy   K_j = prod_{t in segment j} (I - eta_t H_t) of block b
                                          (its parts' coordinates together)  [K, dim_b, dim_b]; with
                                          buffers the map of (theta, buffers)  [K, parts dim_b, parts dim_b]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..store import MANIFEST, AppendableArray, Store, StoreError, read_json
from ..store.arrays import check_array
from ..store.schema import (EMBEDDINGS_DIR, EMBEDDINGS_LAYOUT, MAX_PART_NAME, check_embeddings_manifest,
                            check_name)
from .coefficients import block_rule, linearised_rule
from .plan import Plan

SEGMENTS_DIR = "segments"
PARTS_DIR = "parts"
LAYOUT_VERSION = EMBEDDINGS_LAYOUT  # 3: plans of parts and blocks


def _float(precision: str) -> np.dtype:
    return np.dtype("<f8" if precision == "float64" else "<f4")


def embeddings_dir(store: Store) -> Path:
    """The store's embeddings directory."""
    return store.path / EMBEDDINGS_DIR


def final_arrays(store: Store, precision: str) -> list[AppendableArray]:
    """Per-layer embeddings relative to the last step."""
    return [AppendableArray(embeddings_dir(store) / f"{s.name}.npy", _float(precision), (s.dim,)) for s in store.layers]


def part_final_arrays(store: Store, plan: Plan, precision: str) -> list[AppendableArray]:
    """Per-part embeddings relative to the last step: the layers' own arrays for a trivial plan."""
    if plan.trivial:
        by_layer = final_arrays(store, precision)
        return [by_layer[p.layer] for p in plan.parts]
    return [AppendableArray(embeddings_dir(store) / PARTS_DIR / f"{p.name}.npy", _float(precision),
                            (p.width(store),)) for p in plan.parts]


def state_parts(store: Store, plan: Plan) -> list[int]:
    """Per block, the parts of a record's local embedding: its effect on theta, and on each buffer of the block's
    update rule (:func:`~dvemb.embed.coefficients.block_rule`)."""
    return [block_rule(store, plan, block).parts for block in plan.blocks]


def state_blocks(store: Store, plan: Plan) -> list[list[int]]:
    """Per block, indices into :func:`segment_arrays`: its parts' theta parts, then their buffer parts (a block whose
    rule keeps fewer buffers than the store's leaves the others' files unused)."""
    n = len(plan.parts)
    return [[i + k * n for k in range(parts) for i in block]
            for block, parts in zip(plan.blocks, state_parts(store, plan))]


def segment_arrays(store: Store, plan: Plan, precision: str) -> list[AppendableArray]:
    """Per-part embeddings relative to the end of their segment, then each buffer's part for every part."""
    suffixes = [""] + [f".{name}" for name in linearised_rule(store, plan.second_moment).buffers]
    return [AppendableArray(embeddings_dir(store) / SEGMENTS_DIR / f"{p.name}{suffix}.npy", _float(precision),
                            (p.width(store),)) for suffix in suffixes for p in plan.parts]


def propagator_arrays(store: Store, plan: Plan, precision: str) -> list[AppendableArray]:
    """Per-block stacks of segment propagators [K, dim_b, dim_b] ([K, parts dim_b, parts dim_b] with buffers)."""
    dims = [parts * sum(plan.parts[i].width(store) for i in block)
            for block, parts in zip(plan.blocks, state_parts(store, plan))]
    return [AppendableArray(embeddings_dir(store) / SEGMENTS_DIR / f"block-{b}.propagators.npy", _float(precision),
                            (d, d)) for b, d in enumerate(dims)]


def embedding_info(store: Store) -> dict | None:
    """The embeddings manifest, checked (types, ranges, part names: a StoreError names the problem), or None
    when none were computed."""
    path = embeddings_dir(store) / MANIFEST
    if not path.exists():
        return None
    return check_embeddings_manifest(read_json(path), path, LAYOUT_VERSION)


def embedding_plan(info: dict) -> Plan:
    """The plan the embeddings were computed with (its part names checked: they become file names)."""
    try:
        plan = Plan.from_dict(info["plan"])
    except (KeyError, TypeError, ValueError) as exc:  # a manifest not checked by embedding_info
        raise StoreError(f"{EMBEDDINGS_DIR}/{MANIFEST}: invalid plan ({exc!r})") from None
    for part in plan.parts:
        check_name(part.name, f"{EMBEDDINGS_DIR}/{MANIFEST} (plan)", MAX_PART_NAME)
    return plan


def embeddings_are_current(store: Store) -> bool:
    """Whether embeddings exist in this layout, were computed from this store as it is now (its fingerprint)
    and cover every committed step."""
    info = embedding_info(store)
    return info is not None and store.embeddings_staleness(info) is None


def check_embeddings(store: Store, info: dict) -> None:
    """That current embeddings fit the store and their files are whole (headers and sizes; nothing is read):
    the plan's parts name the store's layers, and each file a query reads holds its rows. A StoreError names
    the file and the problem (``dvemb embed STORE`` recomputes them)."""
    source = embeddings_dir(store) / MANIFEST
    plan = embedding_plan(info)
    for i, part in enumerate(plan.parts):
        if part.layer >= len(store.layers) or (part.sketch is not None and part.sketch > store.layers[part.layer].dim):
            raise StoreError(f"{source} is invalid: plan part {i} ({part.name}) does not fit the store's layers")
    n_segments = len(info["boundaries"]) - 1
    try:
        arrays = [(a, store.n_records) for a in final_arrays(store, info["precision"])]
        if n_segments > 1:
            arrays += [(a, store.n_records) for a in segment_arrays(store, plan, info["precision"])]
            arrays += [(a, n_segments) for a in propagator_arrays(store, plan, info["precision"])]
        for array, rows in arrays:
            check_array(array, rows)
    except StoreError as exc:
        raise StoreError(f"{exc} (the embeddings are damaged: dvemb embed {store.path} recomputes them)") from None
