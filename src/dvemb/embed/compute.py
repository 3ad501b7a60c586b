"""compute_embeddings: Algorithm 1, or Algorithm 2 over parallel segments and layer groups."""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import gemm
from ..progress import ProgressBar
from ..store import MANIFEST, Store, release_pages, write_json_atomic
from .checkpointing import Checkpoints, compose, segment_boundaries
from .layout import LAYOUT_VERSION, SEGMENTS_DIR, embeddings_dir, final_arrays, propagator_arrays, segment_arrays, state_blocks
from .recursion import (TORCH_DTYPES, Blocking, Precision, block_layers, default_precision, rows_per_chunk,
                        run_recursion)


@dataclass(frozen=True)
class EmbeddingInfo:
    """Where and how a store's embeddings were computed."""

    path: Path
    committed_steps: int
    committed_records: int
    boundaries: tuple[int, ...]
    precision: str
    blocking: str
    workers: int
    seconds: float


@dataclass(frozen=True)
class _Task:
    """One segment of steps for a group of blocks (each block: layer indices sharing one M)."""

    segment: int
    start: int
    stop: int
    blocks: tuple[tuple[int, ...], ...]
    block_ids: tuple[int, ...]


def compute_embeddings(
    path: str | os.PathLike,
    *,
    checkpoints: Checkpoints = None,
    workers: int = 1,
    precision: Precision | None = None,
    blocking: Blocking = "layer",
    chunk_rows: int | None = None,
    show_progress: bool = True,
) -> EmbeddingInfo:
    """Compute data value embeddings for the store at ``path`` and write them into it.

    ``checkpoints`` splits the run into K evenly spaced segments (an int) or at given
    steps (a sequence), run independently (Algorithm 2) and composed; their boundaries
    become checkpoints for ``influence(..., checkpoint=l)``. ``workers`` processes share
    the segments and, when there are more workers than segments, the layers.
    ``blocking="global"`` uses one M over all layers (cross-layer curvature; memory
    (sum of dims)^2) instead of one per layer. Records are read in chunks of ``chunk_rows``
    rows, by default as many as fit in ``recursion.CHUNK_BYTES`` (96 MiB), whatever the
    number and size of the tracked layers.
    """
    store = Store(path)
    boundaries = segment_boundaries(store.n_steps, checkpoints)
    precision = precision or default_precision(store)
    if precision not in TORCH_DTYPES:
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    blocks = block_layers(store, blocking)
    n_segments = len(boundaries) - 1
    out_dir = embeddings_dir(store)
    out_dir.mkdir(exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # invalidate before overwriting
    start = time.perf_counter()

    for arr in final_arrays(store, precision):
        arr.allocate(store.n_records)
    if n_segments > 1:
        (out_dir / SEGMENTS_DIR).mkdir(exist_ok=True)
        for arr in segment_arrays(store, precision):
            arr.allocate(store.n_records)
        for arr in propagator_arrays(store, precision, blocks):
            arr.allocate(n_segments)
    tasks = _plan(store, boundaries, blocks, workers)
    bar = ProgressBar(total=sum(t.stop - t.start for t in tasks), desc="embeddings", unit="step",
                      disable=not show_progress)
    if workers == 1:
        for task in tasks:
            _run_task(store, task, precision, blocks, chunk_rows, n_segments, lambda: bar.update(1))
    else:
        _run_parallel(store, tasks, precision, blocks, chunk_rows, n_segments, workers, bar)
    bar.close()
    if n_segments > 1:
        _compose_final(store, boundaries, precision, blocks, chunk_rows)
    seconds = time.perf_counter() - start
    write_json_atomic(out_dir / MANIFEST, {
        "committed_steps": store.n_steps, "committed_records": store.n_records, "boundaries": boundaries,
        "precision": precision, "curvature": store.manifest["curvature"], "blocking": blocking, "blocks": blocks,
        "workers": workers, "seconds": seconds, "layout_version": LAYOUT_VERSION,
    })
    return EmbeddingInfo(out_dir, store.n_steps, store.n_records, tuple(boundaries), precision, blocking, workers,
                         seconds)


def _plan(store: Store, boundaries: Sequence[int], blocks: list[list[int]], workers: int) -> list[_Task]:
    """Segments x groups of blocks; blocks are split only when workers outnumber segments."""
    n_segments = len(boundaries) - 1
    n_groups = min(len(blocks), max(1, math.ceil(workers / n_segments)))
    groups: list[list[int]] = [[] for _ in range(n_groups)]
    loads = [0] * n_groups
    cost = [sum(store.layers[i].dim for i in block) ** 2 for block in blocks]
    for b in sorted(range(len(blocks)), key=lambda b: -cost[b]):  # balance by dim^2
        g = loads.index(min(loads))
        groups[g].append(b)
        loads[g] += cost[b]
    return [_Task(j, boundaries[j], boundaries[j + 1], tuple(tuple(blocks[b]) for b in sorted(g)), tuple(sorted(g)))
            for j in range(n_segments) for g in groups]


def _run_task(store: Store, task: _Task, precision: str, blocks: list[list[int]], chunk_rows: int | None,
              n_segments: int, on_step) -> None:
    """Run one task in this process, writing into the preallocated files.

    The last segment's embeddings are already relative to T: they go straight to the
    final arrays (no checkpoint query reads them as segment embeddings).
    """
    last = task.segment == n_segments - 1
    if n_segments == 1:
        arrays, indices = final_arrays(store, precision), [list(b) for b in task.blocks]
    else:  # with momentum the layers' buffer parts follow their theta parts (never final)
        local = segment_arrays(store, precision)
        arrays = final_arrays(store, precision) + local[len(store.layers):] if last else local
        indices = state_blocks(store, [list(b) for b in task.blocks])
    sinks = {i: arrays[i].row_file() for block in indices for i in block}
    try:
        propagators = run_recursion(store, task.blocks, sinks, task.start, task.stop, precision, chunk_rows, on_step,
                                    buffer=n_segments > 1)
    finally:
        for sink in sinks.values():
            sink.close()
    if n_segments > 1:
        stacks = propagator_arrays(store, precision, blocks)
        for b, k in zip(task.block_ids, propagators):
            stack = stacks[b].writable(n_segments)
            stack[task.segment] = k.numpy()
            stack.flush()


_counter = None


def _init_worker(counter, threads: int) -> None:
    global _counter
    _counter = counter
    torch.set_num_threads(threads)


def _count_step() -> None:
    with _counter.get_lock():
        _counter.value += 1


def _worker(path: str, task: _Task, precision: str, blocks: list[list[int]], chunk_rows: int | None,
            n_segments: int) -> None:
    _run_task(Store(path), task, precision, blocks, chunk_rows, n_segments, _count_step)


def _run_parallel(store: Store, tasks: list[_Task], precision: str, blocks: list[list[int]], chunk_rows: int | None,
                  n_segments: int, workers: int, bar: ProgressBar) -> None:
    """Run tasks in ``workers`` spawned processes, each with its share of the CPU threads."""
    ctx = get_context("spawn")
    counter = ctx.Value("q", 0)
    threads = max(1, torch.get_num_threads() // workers)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(counter, threads)) as pool:
        pending = {pool.submit(_worker, str(store.path), t, precision, blocks, chunk_rows, n_segments) for t in tasks}
        while pending:
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            for fut in done:
                fut.result()  # re-raise a worker's error here
            bar.update(counter.value - bar.n)


def _compose_final(store: Store, boundaries: Sequence[int], precision: str, blocks: list[list[int]],
                   chunk_rows: int | None) -> None:
    """Final embeddings: each segment's local embeddings mapped to T by the later propagators.

    With momentum a local embedding is (effect on theta, effect on the buffer) at the segment's
    end, and the composed propagators' theta rows map it to theta_T.
    """
    dtype = TORCH_DTYPES[precision]
    starts = store.step_starts
    local = [a.read(store.n_records) for a in segment_arrays(store, precision)]
    finals = [a.row_file() for a in final_arrays(store, precision)]
    stacks = propagator_arrays(store, precision, blocks)
    for block, state, stack_arr in zip(blocks, state_blocks(store, blocks), stacks):
        stack = stack_arr.read(len(boundaries) - 1)
        maps = compose([torch.from_numpy(np.array(k)).to(dtype) for k in stack])
        sizes = [store.layers[i].dim for i in block]
        rows = rows_per_chunk(sum(sizes) * dtype.itemsize * len(state) // len(block), chunk_rows)
        for j, c in enumerate(maps[:-1]):  # the last segment was written as final already
            theta_rows = c[:sum(sizes)].contiguous()
            for r0 in range(starts[boundaries[j]], starts[boundaries[j + 1]], rows):
                r1 = min(r0 + rows, starts[boundaries[j + 1]])
                mapped = gemm.rows_product(torch.cat([torch.from_numpy(np.array(local[i][r0:r1])) for i in state], 1),
                                            theta_rows)  # rows @ c[:dim].T
                for i, part in zip(block, mapped.split(sizes, dim=1)):
                    finals[i][r0:r1] = part.numpy()
                for i in state:
                    release_pages(local[i])
    for sink in finals:
        sink.close()
