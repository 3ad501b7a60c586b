"""compute_embeddings: Algorithm 1, or Algorithm 2 over parallel segments and blocks."""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import gemm
from ..devices import Device, device_memory, resolve_device, tf32, to_device, worker_devices
from ..progress import ProgressBar
from ..resources import check_disk, check_memory
from ..store import MANIFEST, AppendableArray, Store, release_pages, write_json_atomic
from ..store.lock import StoreLock
from ..store.schema import store_fingerprint
from .checkpointing import Checkpoints, compose, segment_boundaries
from .coefficients import linearised_rule
from .layout import (LAYOUT_VERSION, PARTS_DIR, SEGMENTS_DIR, embeddings_dir, final_arrays, part_final_arrays,
                     propagator_arrays, segment_arrays, state_blocks, state_parts)
from .plan import DEFAULT_MEMORY, SECOND_MOMENTS, STEP_RANK, Blocking, Plan, SecondMoment, make_plan
from .recursion import CHUNK_BYTES, TORCH_DTYPES, Precision, default_precision, rows_per_chunk, run_recursion


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
class _Run:
    """How a computation runs: its arithmetic, the rows read per chunk (None: CHUNK_BYTES' worth), the device."""

    precision: str
    chunk_rows: int | None
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.precision]


@dataclass(frozen=True)
class _Task:
    """One segment of steps for a group of the plan's blocks."""

    segment: int
    start: int
    stop: int
    blocks: tuple[int, ...]


def compute_embeddings(
    path: str | os.PathLike,
    *,
    checkpoints: Checkpoints = None,
    workers: int = 1,
    precision: Precision | None = None,
    blocking: Blocking = "auto",
    memory: int = DEFAULT_MEMORY,
    step_rank: float | None = STEP_RANK,
    second_moment: SecondMoment = "followed",
    chunk_rows: int | None = None,
    show_progress: bool = True,
    device: Device = None,
    allow_tf32: bool = False,
) -> EmbeddingInfo:
    """Compute data value embeddings for the store at ``path`` and write them into it.

    ``blocking`` chooses which curvature the propagators keep (see ``embed/plan.py``):
    ``"auto"`` (default) keeps one global propagator over all layers when it fits ``memory``
    bytes beyond one per layer, and else a hierarchical plan (one per layer, plus a global one
    over each layer's leading coordinates for the cross-layer curvature); ``"layer"`` is the
    paper's one per layer; ``"global"`` and ``"hierarchical"`` force those plans. Stored curvature rows
    are cut, step by step, to their top eigenvectors, ``step_rank`` of the step's records (None: whole).
    ``second_moment`` (Adam): ``"followed"`` (default) follows a record's change of v, exactly in exact layers and
    factored in projected ones (``embed/factored.py``); ``"frozen"`` holds v fixed (two propagator matrices per
    block instead of three). Other update rules ignore it.
    ``checkpoints`` splits the run into K evenly spaced segments (an int) or at given steps (a
    sequence), run independently (Algorithm 2) and composed; their boundaries become checkpoints
    for ``influence(..., checkpoint=l)``. ``workers`` processes share the segments and, when
    there are more workers than segments, the blocks. Records are read in chunks of
    ``chunk_rows`` rows, by default as many as fit in ``recursion.CHUNK_BYTES`` (96 MiB).
    ``device`` runs the recursion there (``"cuda"``, ``"cuda:1"``; default the CPU): the propagators stay
    on the device and the records stream in through pinned memory; with ``workers`` > 1 an unnumbered
    ``"cuda"`` gives each worker a visible GPU in turn. ``allow_tf32`` lets float32 products on CUDA use
    TF32 (faster, about 1e-3 relative error per product; off by default).
    """
    store = Store(path)
    boundaries = segment_boundaries(store.n_steps, checkpoints)
    precision = _checked(store, precision, workers)
    device = resolve_device(device)
    plan = _plan(store, blocking, memory, precision, step_rank, second_moment)
    _check_resources(store, plan, precision, len(boundaries) - 1, workers, device)
    out_dir = embeddings_dir(store)
    lock = StoreLock(out_dir, "computed")  # one computation at a time; recording may go on beside it
    try:
        with tf32(allow_tf32):
            seconds = _compute(store, plan, boundaries, _Run(precision, chunk_rows, device), workers,
                               show_progress)
        write_json_atomic(out_dir / MANIFEST, {
            "committed_steps": store.n_steps, "committed_records": store.n_records, "boundaries": boundaries,
            "precision": precision, "curvature": store.manifest["curvature"], "blocking": plan.kind,
            "plan": plan.to_dict(), "memory": memory, "workers": workers, "seconds": seconds,
            "layout_version": LAYOUT_VERSION, "store_fingerprint": store_fingerprint(store.manifest),
            "store_created": store.manifest.get("created"),
        })
    finally:
        lock.release()
    return EmbeddingInfo(out_dir, store.n_steps, store.n_records, tuple(boundaries), precision, plan.kind, workers,
                         seconds)


def _plan(store: Store, blocking: Blocking, memory: int, precision: str, step_rank: float | None,
          second_moment: SecondMoment) -> Plan:
    """The plan for the options (``second_moment`` checked and recorded in it)."""
    if second_moment not in SECOND_MOMENTS:
        raise ValueError(f"second_moment must be one of {SECOND_MOMENTS}, got {second_moment!r}")
    return replace(make_plan(store, blocking, memory, linearised_rule(store, second_moment).parts,
                             TORCH_DTYPES[precision].itemsize, step_rank), second_moment=second_moment)


def _compute(store: Store, plan: Plan, boundaries: Sequence[int], run: _Run, workers: int,
             show_progress: bool) -> float:
    """Write the embeddings' files (the manifest, which makes them current, is written by the caller); seconds."""
    n_segments = len(boundaries) - 1
    (embeddings_dir(store) / MANIFEST).unlink(missing_ok=True)  # invalidate before overwriting
    start = time.perf_counter()
    _allocate(store, plan, run.precision, n_segments)
    tasks = _plan_tasks(store, plan, boundaries, workers)
    bar = ProgressBar(total=sum(t.stop - t.start for t in tasks), desc="embeddings", unit="step",
                      disable=not show_progress)
    if workers == 1:
        for task in tasks:
            _run_task(store, plan, task, run, n_segments, lambda: bar.update(1))
    else:
        _run_parallel(store, plan, tasks, run, n_segments, workers, bar)
    bar.close()
    if n_segments > 1:
        _compose_final(store, plan, boundaries, run)
    if not plan.trivial:
        _sum_parts(store, plan, run)
    return time.perf_counter() - start


def _check_resources(store: Store, plan: Plan, precision: str, n_segments: int, workers: int,
                     device: torch.device) -> None:
    """Refuse up front a computation whose propagators exceed memory or whose files exceed the free disk."""
    itemsize = TORCH_DTYPES[precision].itemsize
    widths = [sum(plan.parts[i].width(store) for i in block) for block in plan.blocks]
    held = itemsize * sum(m * w * w for m, w in zip(state_parts(store, plan), widths))
    on_device = device.type != "cpu"  # each worker holds its tasks' propagators: one GPU each, or this machine
    held_here = held * (1 if on_device else max(1, min(workers, n_segments)))
    check_memory(held_here + 2 * CHUNK_BYTES, f"compute_embeddings ({plan.kind} plan, {len(widths)} blocks, "
                 f"{precision}, {workers} worker(s))", "use blocking='layer', fewer workers, or project the "
                 "gradients (projection_dim)", device_memory(device), str(device) if on_device else "this machine")
    grow = sum(max(0, arr.row_bytes * rows - (arr.path.stat().st_size if arr.path.exists() else 0))
               for arr, rows in _files(store, plan, precision, n_segments))  # earlier files are overwritten
    check_disk(embeddings_dir(store), grow, "compute_embeddings")


def _checked(store: Store, precision: str | None, workers: int) -> str:
    """The recursion's precision (the store's default when None), once the options are checked."""
    precision = precision or default_precision(store)
    if precision not in TORCH_DTYPES:
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return precision


def _files(store: Store, plan: Plan, precision: str, n_segments: int) -> list[tuple[AppendableArray, int]]:
    """The embedding files with their rows: final (per layer, and per part), segment rows and propagators."""
    rows = final_arrays(store, precision) + ([] if plan.trivial else part_final_arrays(store, plan, precision))
    if n_segments > 1:
        rows += segment_arrays(store, plan, precision)
    files = [(arr, store.n_records) for arr in rows]
    if n_segments > 1:
        files += [(arr, n_segments) for arr in propagator_arrays(store, plan, precision)]
    return files


def _allocate(store: Store, plan: Plan, precision: str, n_segments: int) -> None:
    """Create the embedding files at their full sizes."""
    if not plan.trivial:
        (embeddings_dir(store) / PARTS_DIR).mkdir(exist_ok=True)
    if n_segments > 1:
        (embeddings_dir(store) / SEGMENTS_DIR).mkdir(exist_ok=True)
    for arr, rows in _files(store, plan, precision, n_segments):
        arr.allocate(rows)


def _plan_tasks(store: Store, plan: Plan, boundaries: Sequence[int], workers: int) -> list[_Task]:
    """Segments x groups of blocks; blocks are split only when workers outnumber segments."""
    n_segments = len(boundaries) - 1
    n_groups = min(len(plan.blocks), max(1, math.ceil(workers / n_segments)))
    groups: list[list[int]] = [[] for _ in range(n_groups)]
    loads = [0] * n_groups
    cost = [sum(plan.parts[i].width(store) for i in block) ** 2 for block in plan.blocks]
    for b in sorted(range(len(plan.blocks)), key=lambda b: -cost[b]):  # balance by dim^2
        g = loads.index(min(loads))
        groups[g].append(b)
        loads[g] += cost[b]
    return [_Task(j, boundaries[j], boundaries[j + 1], tuple(sorted(g))) for j in range(n_segments) for g in groups]


def _run_task(store: Store, plan: Plan, task: _Task, run: _Run, n_segments: int, on_step) -> None:
    """Run one task in this process, writing into the preallocated files.

    The last segment's embeddings are already relative to T: they go straight to the parts' final
    arrays (no checkpoint query reads them as segment embeddings).
    """
    last, precision = task.segment == n_segments - 1, run.precision
    finals = part_final_arrays(store, plan, precision)
    if n_segments == 1:
        arrays, indices = finals, [list(plan.blocks[b]) for b in task.blocks]
    else:  # with buffers the parts' buffer parts follow their theta parts (never final)
        local = segment_arrays(store, plan, precision)
        arrays = finals + local[len(plan.parts):] if last else local
        every = state_blocks(store, plan)
        indices = [every[b] for b in task.blocks]
    sinks = {i: arrays[i].row_file() for block in indices for i in block}
    try:
        propagators = run_recursion(store, plan, task.blocks, sinks, task.start, task.stop, precision, run.chunk_rows,
                                    on_step, buffer=n_segments > 1, device=run.device)
    finally:
        for sink in sinks.values():
            sink.close()
    if n_segments > 1:
        stacks = propagator_arrays(store, plan, precision)
        for b, k in zip(task.blocks, propagators):
            stack = stacks[b].writable(n_segments)
            stack[task.segment] = k.cpu().numpy()
            stack.flush()


_counter = None


def _init_worker(counter, threads: int) -> None:
    global _counter
    _counter = counter
    torch.set_num_threads(threads)


def _count_step() -> None:
    with _counter.get_lock():
        _counter.value += 1


def _worker(path: str, plan: dict, task: _Task, run: _Run, n_segments: int, tf32_allowed: bool) -> None:
    with tf32(tf32_allowed):
        _run_task(Store(path), Plan.from_dict(plan), task, run, n_segments, _count_step)


def _run_parallel(store: Store, plan: Plan, tasks: list[_Task], run: _Run, n_segments: int, workers: int,
                  bar: ProgressBar) -> None:
    """Run tasks in ``workers`` spawned processes, each with its share of the CPU threads (and its GPU)."""
    ctx = get_context("spawn")
    counter = ctx.Value("q", 0)
    threads = max(1, torch.get_num_threads() // workers)
    devices = worker_devices(run.device, len(tasks))
    allowed = torch.backends.cuda.matmul.allow_tf32
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(counter, threads)) as pool:
        pending = {pool.submit(_worker, str(store.path), plan.to_dict(), t, replace(run, device=d), n_segments,
                               allowed) for t, d in zip(tasks, devices)}
        while pending:
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            for fut in done:
                fut.result()  # re-raise a worker's error here
            bar.update(counter.value - bar.n)


def _compose_final(store: Store, plan: Plan, boundaries: Sequence[int], run: _Run) -> None:
    """Final embeddings of each part: each segment's local embeddings mapped to T by the later propagators.

    With buffers a local embedding is (effect on theta, effect on the buffers) at the segment's
    end, and the composed propagators' theta rows map it to theta_T.
    """
    dtype, precision, device = run.dtype, run.precision, run.device
    starts = store.step_starts
    local = [a.read(store.n_records) for a in segment_arrays(store, plan, precision)]
    finals = [a.row_file() for a in part_final_arrays(store, plan, precision)]
    stacks = propagator_arrays(store, plan, precision)
    for block, state, stack_arr in zip(plan.blocks, state_blocks(store, plan), stacks):
        stack = stack_arr.read(len(boundaries) - 1)
        maps = compose([to_device(np.array(k), device, dtype) for k in stack])
        sizes = [plan.parts[i].width(store) for i in block]
        rows = rows_per_chunk(sum(sizes) * dtype.itemsize * len(state) // len(block), run.chunk_rows)
        for j, c in enumerate(maps[:-1]):  # the last segment was written as final already
            theta_rows = c[:sum(sizes)].contiguous()
            for r0 in range(starts[boundaries[j]], starts[boundaries[j + 1]], rows):
                r1 = min(r0 + rows, starts[boundaries[j + 1]])
                mapped = gemm.rows_product(torch.cat([to_device(local[i][r0:r1], device, dtype) for i in state], 1),
                                            theta_rows).cpu()  # rows @ c[:dim].T
                for i, part in zip(block, mapped.split(sizes, dim=1)):
                    finals[i][r0:r1] = part.numpy()
                for i in state:
                    release_pages(local[i])
    for sink in finals:
        sink.close()


def _sum_parts(store: Store, plan: Plan, run: _Run) -> None:
    """Each layer's final embeddings: the signed sum of its parts' (sketched parts mapped back by S^T)."""
    parts = [a.read(store.n_records) for a in part_final_arrays(store, plan, run.precision)]
    finals = [a.row_file() for a in final_arrays(store, run.precision)]
    rows = rows_per_chunk(sum(s.dim for s in store.layers) * run.dtype.itemsize * 3, run.chunk_rows)
    for r0 in range(0, store.n_records, rows):
        r1 = min(r0 + rows, store.n_records)
        sums = [np.zeros((r1 - r0, s.dim), dtype=parts[0].dtype) for s in store.layers]
        for part, values in zip(plan.parts, parts):
            block = to_device(np.array(values[r0:r1]), run.device, run.dtype) * part.sign
            if part.sketch is not None:
                block = block @ part.matrix(store.layers[part.layer].dim, block.dtype, block.device)
            sums[part.layer] += block.cpu().numpy()
            release_pages(values)
        for sink, block in zip(finals, sums):
            sink[r0:r1] = block
    for sink in finals:
        sink.close()
