"""Scoring: test gradients at the current model against stored data value embeddings."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

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
from .store import Store

LossClosure = Callable[[], torch.Tensor]


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
        summed = np.zeros((self.scores.shape[0], len(ids)), dtype=np.float64)
        np.add.at(summed.T, inverse, self.scores.T)
        return ids, summed

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
    capture = GhostCapture(model, modules, store.layers)
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


def influence(
    path: str | os.PathLike,
    model: nn.Module,
    loss_fn: LossClosure,
    *,
    checkpoint: int | None = None,
    checkpoints: Checkpoints = None,
    blocking: Blocking | None = None,
    chunk_rows: int = 65536,
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
    n_segments = len(boundaries) - 1
    last = n_segments - 1 if checkpoint is None else _checkpoint_index(checkpoint, boundaries)
    grads, n_test = query_gradients(store, model, loss_fn)
    dtype = torch.float64 if info["precision"] == "float64" else torch.float32
    tests = [g.detach().to(device="cpu", dtype=dtype) for g in grads]
    starts = store.step_starts
    n_rows = int(starts[boundaries[last + 1]])
    scores = np.zeros((n_test, n_rows), dtype=np.float64 if dtype == torch.float64 else np.float32)
    if last == n_segments - 1:  # relative to T: the composed embeddings
        _score_rows(scores, tests, [a.read(store.n_records) for a in final_arrays(store, info["precision"])],
                    0, n_rows, chunk_rows, show_progress)
    else:  # relative to checkpoint `last`: carry the test gradients back through the propagators
        blocks = info["blocks"]
        local = [a.read(store.n_records) for a in segment_arrays(store, info["precision"])]
        stacks = [a.read(n_segments) for a in propagator_arrays(store, info["precision"], blocks)]
        for j in range(last, -1, -1):
            _score_rows(scores, tests, local, int(starts[boundaries[j]]), int(starts[boundaries[j + 1]]),
                        chunk_rows, show_progress)
            if j > 0:
                tests = _propagate(tests, blocks, [k[j] for k in stacks], dtype)
    records = store.records[:n_rows]
    return Influence(scores, np.asarray(records["step"]).copy(), np.asarray(records["sample_id"]).copy())


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


def _score_rows(scores: np.ndarray, tests: list[torch.Tensor], embeddings: list[np.ndarray], r_start: int,
                r_stop: int, chunk_rows: int, show_progress: bool) -> None:
    """scores[:, rows] += sum over layers of test @ embedding^T, in chunks of rows."""
    for r0 in ProgressBar(range(r_start, r_stop, chunk_rows), desc="scoring", disable=not show_progress):
        r1 = min(r0 + chunk_rows, r_stop)
        acc = torch.from_numpy(scores[:, r0:r1])
        for test, emb in zip(tests, embeddings):
            acc.addmm_(test, torch.from_numpy(np.array(emb[r0:r1])).t())
