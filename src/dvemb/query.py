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
from .embed.recursion import compute_embeddings, embedding_arrays, embedding_info, embeddings_are_current
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
        grads = capture.collect(n_rows=losses.shape[0])
    finally:
        capture.detach()
    return grads, losses.shape[0]


def influence(
    path: str | os.PathLike,
    model: nn.Module,
    loss_fn: LossClosure,
    *,
    chunk_rows: int = 65536,
    show_progress: bool = False,
) -> Influence:
    """Score every stored record against the closure's per-example test losses.

    The closure is evaluated at ``model`` as it is now and must return a 1-D tensor of
    per-example losses. Embeddings are computed first if missing or stale.
    """
    store = Store(path)
    if not embeddings_are_current(store):
        compute_embeddings(store.path, show_progress=show_progress)
    info = embedding_info(store)
    assert info is not None
    grads, n_test = query_gradients(store, model, loss_fn)
    dtype = torch.float64 if info["precision"] == "float64" else torch.float32
    tests = [g.detach().to(device="cpu", dtype=dtype) for g in grads]
    embeddings = [arr.read(store.n_records) for arr in embedding_arrays(store, info["precision"])]
    scores = np.zeros((n_test, store.n_records), dtype=np.float64 if dtype == torch.float64 else np.float32)
    for r0 in ProgressBar(range(0, store.n_records, chunk_rows), desc="scoring", disable=not show_progress):
        r1 = min(r0 + chunk_rows, store.n_records)
        acc = torch.from_numpy(scores[:, r0:r1])
        for test, emb in zip(tests, embeddings):
            acc.addmm_(test, torch.from_numpy(np.array(emb[r0:r1])).t())
    records = store.records
    return Influence(scores, np.asarray(records["step"]).copy(), np.asarray(records["sample_id"]).copy())
