"""Scoring: test gradients at the current model against stored data value embeddings."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from .progress import ProgressBar

from .capture.ghost import GhostCapture
from .capture.selection import match_specs
from .embed.checkpointing import Checkpoints, segment_boundaries
from .embed.compute import compute_embeddings
from .embed.layout import embedding_info, embeddings_are_current, final_arrays, propagator_arrays, segment_arrays
from .embed.recursion import Blocking
from .store import PrefetchedRows, Store

LossClosure = Callable[[], torch.Tensor]

CHUNK_BYTES = 6 << 20  # embeddings per scoring chunk; two stay in cache (best of 512 KiB..16 MiB measured)


@dataclass(frozen=True)
class Ranking:
    """Per test point, k records ordered by score: record index, step, sample id, score ([n_test, k])."""

    index: np.ndarray
    step: np.ndarray
    sample_id: np.ndarray
    score: np.ndarray


@dataclass(frozen=True)
class TopK:
    """The most helpful (highest score) and most harmful (lowest score) records per test point."""

    helpful: Ranking
    harmful: Ranking


@dataclass(frozen=True)
class Influence:
    """Estimated TSLOO of every record on every test loss; positive means the record helped."""

    scores: np.ndarray      # [n_test, n_records]
    steps: np.ndarray       # [n_records]
    sample_ids: np.ndarray  # [n_records]

    def by_sample(self) -> tuple[np.ndarray, np.ndarray]:
        """All-epoch removal: (unique sample ids [n_ids], scores summed over each id's records [n_test, n_ids])."""
        ids, inverse = np.unique(self.sample_ids, return_inverse=True)
        summed = torch.zeros(self.scores.shape[0], len(ids), dtype=torch.float64)  # (np.add.at is ~50x slower)
        summed.index_add_(1, torch.from_numpy(inverse.astype(np.int64)), torch.from_numpy(self.scores).double())
        return ids, summed.numpy()

    def top_k(self, k: int) -> TopK:
        """The k most helpful and k most harmful records for each test point."""
        k = min(k, self.scores.shape[1])
        order = np.argsort(-self.scores, axis=1, kind="stable")
        return TopK(self._ranking(order[:, :k]), self._ranking(order[:, ::-1][:, :k]))

    def _ranking(self, index: np.ndarray) -> Ranking:
        return Ranking(index, self.steps[index], self.sample_ids[index], np.take_along_axis(self.scores, index, 1))


def query_gradients(store: Store, model: nn.Module, loss_fn: LossClosure) -> tuple[list[torch.Tensor], int]:
    """Projected per-example gradients of the closure's losses at the model's current parameters."""
    modules = match_specs(model, store.layers)
    capture = GhostCapture(model, modules, store.layers, overlap=False)  # one backward: nothing to overlap
    capture.attach()
    try:
        capture.begin()
        with torch.enable_grad():
            losses = loss_fn()
            if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
                raise ValueError("the loss closure must return a 1-D tensor of per-example losses "
                                 "(use reduction='none')")
            # autograd.grad leaves the parameters' .grad untouched
            torch.autograd.grad(losses.sum(), [m.weight for m in modules], allow_unused=True)
        grads, _ = capture.collect(n_rows=losses.shape[0])
    finally:
        capture.detach()
    return grads, losses.shape[0]


def checkpoint_steps(path: str | os.PathLike) -> list[int]:
    """Steps t_l of the checkpoints available to ``influence(..., checkpoint=l)``; the last is T."""
    info = embedding_info(Store(path))
    if info is None:
        raise ValueError(f"{path}: embeddings not computed; run compute_embeddings(path, checkpoints=K)")
    return info["boundaries"][1:]


@dataclass(frozen=True)
class _Query:
    """A resolved query: the store, its embeddings, the checkpoint and the test gradients."""

    store: Store
    info: dict
    last: int          # index of the checkpoint segment scored against
    n_rows: int        # records before that checkpoint
    tests: list[torch.Tensor]


def _prepare(path: str | os.PathLike, model: nn.Module, loss_fn: LossClosure, checkpoint: int | None,
             checkpoints: Checkpoints, blocking: Blocking | None, show_progress: bool) -> _Query:
    """Make sure fitting embeddings exist, then take the test gradients at the model."""
    store = Store(path)
    info = embedding_info(store)
    wanted = None if checkpoints is None else segment_boundaries(store.n_steps, checkpoints)
    if (not embeddings_are_current(store) or (wanted is not None and wanted != info["boundaries"])
            or (blocking is not None and blocking != info["blocking"])):
        compute_embeddings(store.path, checkpoints=checkpoints, blocking=blocking or "layer",
                           show_progress=show_progress)
        info = embedding_info(store)
    assert info is not None
    boundaries = info["boundaries"]
    last = len(boundaries) - 2 if checkpoint is None else _checkpoint_index(checkpoint, boundaries)
    grads, _ = query_gradients(store, model, loss_fn)
    dtype = torch.float64 if info["precision"] == "float64" else torch.float32
    tests = [g.detach().to(device="cpu", dtype=dtype) for g in grads]
    return _Query(store, info, last, int(store.step_starts[boundaries[last + 1]]), tests)


def _score_chunks(q: _Query, chunk_rows: int | None, show_progress: bool) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (row_begin, row_end, scores [n_test, rows]) over the records before the checkpoint.

    Memory: two chunks of embeddings (``chunk_rows`` x sum of dims; by default about
    CHUNK_BYTES each, read into reused buffers, the next while this one is scored) and the
    scores of one (n_test x chunk_rows), whatever the number of records.
    """
    store, info = q.store, q.info
    if chunk_rows is None:
        row_bytes = sum(s.dim for s in store.layers) * q.tests[0].element_size()
        chunk_rows = max(1, CHUNK_BYTES // row_bytes)
    boundaries, n_segments = info["boundaries"], len(info["boundaries"]) - 1
    starts = store.step_starts
    bar = ProgressBar(total=q.n_rows, desc="scoring", unit="record", disable=not show_progress)
    if q.last == n_segments - 1:  # relative to T: the composed embeddings
        arrays, plan = final_arrays(store, info["precision"]), [(0, q.n_rows, q.tests)]
    else:  # relative to checkpoint `last`: carry the test gradients back through the propagators
        arrays = segment_arrays(store, info["precision"])
        stacks = [a.read(n_segments) for a in propagator_arrays(store, info["precision"], info["blocks"])]
        plan, tests = [], q.tests
        for j in range(q.last, -1, -1):
            plan.append((int(starts[boundaries[j]]), int(starts[boundaries[j + 1]]), tests))
            if j > 0:
                tests = _propagate(tests, info["blocks"], [k[j] for k in stacks], tests[0].dtype)
    chunks = [(r0, min(r0 + chunk_rows, r_stop), tests)
              for r_start, r_stop, tests in plan for r0 in range(r_start, r_stop, chunk_rows)]
    rows = PrefetchedRows(arrays, [(r0, r1) for r0, r1, _ in chunks], max((r1 - r0 for r0, r1, _ in chunks), default=1))
    try:
        for (r0, r1, tests), embeddings in zip(chunks, rows):
            acc = tests[0] @ torch.from_numpy(embeddings[0]).t()
            for test, emb in zip(tests[1:], embeddings[1:]):
                acc.addmm_(test, torch.from_numpy(emb).t())
            bar.update(r1 - r0)
            yield r0, r1, acc
    finally:
        rows.close()
        bar.close()


def influence(
    path: str | os.PathLike,
    model: nn.Module,
    loss_fn: LossClosure,
    *,
    checkpoint: int | None = None,
    checkpoints: Checkpoints = None,
    blocking: Blocking | None = None,
    chunk_rows: int | None = None,
    show_progress: bool = False,
) -> Influence:
    """Score stored records against the closure's per-example test losses.

    The closure is evaluated at ``model`` as it is now and must return a 1-D tensor of
    per-example losses. Without ``checkpoint`` the model is the final one and every
    record is scored. With ``checkpoint=l`` the model must hold theta at step
    ``checkpoint_steps(path)[l]`` and the records before that step are scored by their
    influence on that checkpoint. Embeddings are computed first if missing or stale, or
    when ``checkpoints`` or ``blocking`` ask for other ones than those stored.
    """
    q = _prepare(path, model, loss_fn, checkpoint, checkpoints, blocking, show_progress)
    scores = np.empty((q.tests[0].shape[0], q.n_rows), dtype=q.tests[0].numpy().dtype)
    for r0, r1, chunk in _score_chunks(q, chunk_rows, show_progress):
        scores[:, r0:r1] = chunk.numpy()
    records = q.store.records[:q.n_rows]
    return Influence(scores, np.asarray(records["step"]).copy(), np.asarray(records["sample_id"]).copy())


def top_k(
    path: str | os.PathLike,
    model: nn.Module,
    loss_fn: LossClosure,
    k: int,
    *,
    checkpoint: int | None = None,
    checkpoints: Checkpoints = None,
    blocking: Blocking | None = None,
    chunk_rows: int | None = None,
    show_progress: bool = False,
) -> TopK:
    """The k most helpful and most harmful records per test point, without the full score matrix.

    Same arguments as :func:`influence`; memory is O(n_test x (k + chunk_rows)) plus
    two chunks of embeddings (6 MiB each by default), so stores far larger than RAM can be searched.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = _prepare(path, model, loss_fn, checkpoint, checkpoints, blocking, show_progress)
    best = {sign: (None, None) for sign in (1.0, -1.0)}  # sign -> (scores [n_test, <=k], record index)
    for r0, _, chunk in _score_chunks(q, chunk_rows, show_progress):
        index = torch.arange(r0, r0 + chunk.shape[1]).expand_as(chunk)
        for sign, (scores, idx) in best.items():
            cand = chunk * sign if scores is None else torch.cat([scores, chunk * sign], 1)
            cand_idx = index if idx is None else torch.cat([idx, index], 1)
            top = cand.topk(min(k, cand.shape[1]), dim=1)
            best[sign] = (top.values, cand_idx.gather(1, top.indices))
    records = q.store.records[:q.n_rows]
    steps, ids = np.asarray(records["step"]), np.asarray(records["sample_id"])

    def ranking(sign: float) -> Ranking:
        scores, idx = best[sign]
        idx = idx.numpy()
        return Ranking(idx, steps[idx], ids[idx], (scores * sign).numpy())

    return TopK(ranking(1.0), ranking(-1.0))


def _propagate(tests: list[torch.Tensor], blocks: list[list[int]], propagators: list[np.ndarray],
               dtype: torch.dtype) -> list[torch.Tensor]:
    """Per-layer test gradients times each block's propagator (V_j = V_{j+1} K_{j+1})."""
    out = list(tests)
    for block, k in zip(blocks, propagators):
        moved = torch.cat([tests[i] for i in block], 1) @ torch.from_numpy(np.array(k)).to(dtype)
        for i, part in zip(block, moved.split([tests[i].shape[1] for i in block], dim=1)):
            out[i] = part
    return out


def _checkpoint_index(checkpoint: int, boundaries: list[int]) -> int:
    n = len(boundaries) - 1
    if not -n <= checkpoint < n:
        raise ValueError(f"checkpoint={checkpoint} out of range: the embeddings have {n} checkpoints at steps "
                         f"{boundaries[1:]} (compute_embeddings(..., checkpoints=K) sets them)")
    return checkpoint % n
