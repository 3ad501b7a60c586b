"""The Recorder: captures projected per-sample gradients during training into a store."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn

from ..store import (MANIFEST, BackgroundWriter, DistributedIndex, StoreConfig, StoreWriter, all_finite, dtype_name,
                     read_json, shard_path, to_numpy)
from .checkpoints import save_checkpoint
from .curvature import CURVATURES, Curvature
from .distributed import DistributedContext, refuse_fsdp
from .ghost import GhostCapture
from .projection import ProjectionKind
from ..sgd import AdamSettings, SGDSettings, settings_of
from .selection import ModuleSelection, layer_spec, select_modules

Reduction = Literal["mean", "sum"]


class NonFiniteGradientError(FloatingPointError):
    """A step produced NaN or infinite per-sample gradients; nothing was committed."""


def as_ids(ids: object) -> np.ndarray:
    """Sample ids (list, array or tensor) as a 1-D int64 array."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise TypeError(f"ids must be a 1-D sequence of integers, got {arr.dtype} with shape {arr.shape}")
    return arr.astype(np.int64)


class Recorder:
    """Records each SGD step's per-sample projected gradients of the tracked layers.

    Use ``with rec.step(ids, lr=lr): loss.backward()`` around each optimizer step's
    forward and backward passes (several passes for gradient accumulation; their
    samples follow ``ids`` in order). Steps are written in a background thread as the
    blocks exit and committed together at least every 50 ms; ``flush`` and ``close`` commit
    at once, and a crash loses only uncommitted steps, never part of one.
    ``save_checkpoints`` (every N steps, or a list of steps) saves theta_t before those
    steps, and theta_T on close, as safetensors files for checkpoint queries.
    """

    def __init__(
        self,
        model: nn.Module,
        path: str | os.PathLike,
        projection_dim: int | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        *,
        modules: ModuleSelection = None,
        reduction: Reduction = "mean",
        optimizer: torch.optim.Optimizer | None = None,
        projection: ProjectionKind = "gaussian",
        save_checkpoints: int | Sequence[int] | None = None,
        curvature: Curvature = "gradient_outer",
        curvature_samples: int | None = None,
        fsync: bool = False,
    ) -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if projection not in ("gaussian", "rademacher", "orthogonal"):
            raise ValueError(f"projection must be 'gaussian', 'rademacher' or 'orthogonal', got {projection!r}")
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        if curvature_samples is not None and curvature_samples < 1:
            raise ValueError(f"curvature_samples must be >= 1, got {curvature_samples}")
        if projection_dim is not None and projection_dim < 1:
            raise ValueError(f"projection_dim must be a positive int or None, got {projection_dim}")
        self.model = model
        self.reduction: Reduction = reduction
        self.optimizer = optimizer
        refuse_fsdp(model)
        _warn_if_batch_norm(model)
        chosen = select_modules(model, modules)
        specs = [layer_spec(name, m, projection_dim, seed, projection) for name, m in chosen]
        exact = all(s.proj_in.is_identity and s.proj_out.is_identity for s in specs)
        rule = settings_of(optimizer, [m for _, m in chosen], exact)
        adam = rule if isinstance(rule, AdamSettings) else None
        config = StoreConfig(tuple(specs), dtype_name(dtype), reduction, curvature, projection, seed,
                             SGDSettings() if adam else rule, adam)
        self._config = config
        self._dist = DistributedContext.detect()
        self._index: DistributedIndex | None = None
        self._writer: StoreWriter | BackgroundWriter
        if self._dist is None:  # commits overlap training: in order, at most 4 steps in flight
            self._writer = BackgroundWriter(StoreWriter(path, config, fsync=fsync))
        else:  # each rank writes its own shard; rank 0 keeps the global commit
            if self._dist.rank == 0:
                self._index = DistributedIndex(path, config, self._dist.world_size, fsync=fsync)
            self._dist.barrier()
            committed = read_json(Path(path) / MANIFEST)["committed_steps"]
            self._writer = StoreWriter(shard_path(path, self._dist.rank), config, fsync=fsync,
                                       rollback_to_steps=committed)
        self._path = Path(path)
        self._modules = [m for _, m in chosen]
        self._capture = GhostCapture(model, self._modules, specs, curvature=curvature,
                                     curvature_samples=curvature_samples, reduction=reduction, seed=seed)
        self._capture.attach()
        self._in_step = False
        self._closed = False
        self._save_every = save_checkpoints if isinstance(save_checkpoints, int) else None
        self._save_at = set() if save_checkpoints is None or self._save_every else {int(s) for s in save_checkpoints}
        if self._save_every is not None and self._save_every < 1:
            raise ValueError(f"save_checkpoints must be a positive interval or a list of steps, got {save_checkpoints}")

    @property
    def path(self) -> Path:
        """Directory of the store being written."""
        return self._path

    @property
    def layers(self) -> list[str]:
        """Names of the tracked layers."""
        return [s.name for s in self._config.layers]

    @property
    def steps(self) -> int:
        """Number of recorded steps (the last one or two may still be being written: see flush)."""
        return self._writer.submitted

    def flush(self) -> None:
        """Wait until every recorded step is committed to disk."""
        self._writer.flush()

    @contextlib.contextmanager
    def step(self, ids: Sequence[int] | np.ndarray | torch.Tensor, lr: float | None = None,
             weights: Sequence[float] | np.ndarray | torch.Tensor | None = None) -> Iterator[None]:
        """Capture one optimizer step over the samples ``ids`` and commit it on exit.

        ``weights`` gives each sample's weight w_i in this step's loss sum_i w_i loss_i when it is not
        the ``reduction``'s 1/B or 1: e.g. n_i / N for a token-mean loss over padded sequences (n_i
        label tokens of sample i, N in the batch), so that the stored g_i is the gradient of the
        sample's own mean token loss. A sample of weight 0 is stored with a zero gradient.
        """
        if self._closed:
            raise RuntimeError("Recorder is closed")
        if self._in_step:
            raise RuntimeError("Recorder.step blocks cannot be nested")
        sample_ids = as_ids(ids)
        if len(sample_ids) == 0:
            raise ValueError("a step needs at least one sample id")
        if self._wants_checkpoint(self.steps):
            save_checkpoint(self.path, self.model, self.steps)  # theta_t, before this step's update
        self._in_step = True
        # hooks see this rank's loss gradient w_local * g: scaling by 1/w_local stores the sample's own g
        local = _local_weights(len(sample_ids), self.reduction, weights)
        self._capture.begin(scale=1.0 / local if isinstance(local, float) else 1.0)
        try:
            yield
            grads, curvature = self._capture.collect(n_rows=len(sample_ids))
        except BaseException:
            self._capture.abort()
            raise
        finally:
            self._in_step = False
        step_lr = self._resolve_lr(lr)
        dtype = self._config.dtype
        if not isinstance(local, float):  # per-sample weights: divide each row by its own weight
            inverse = torch.from_numpy(np.divide(1.0, local, out=np.zeros_like(local), where=local != 0))
            grads = [g * inverse.to(g.dtype)[:, None] for g in grads]
        rows = [to_numpy(g, dtype) for g in grads]
        curv_rows = None if curvature is None else [to_numpy(c, dtype) for c in curvature]
        bad = next((name for name, r in zip(self.layers * 2, rows + (curv_rows or [])) if not all_finite(r, dtype)),
                   None)
        world, rank = (1, 0) if self._dist is None else (self._dist.world_size, self._dist.rank)
        n_bad, n_total = (bad is not None, len(sample_ids)) if self._dist is None else \
            self._dist.sum(bad is not None, len(sample_ids))
        if n_bad:
            where = f"layer {bad!r}" if bad else "another rank"
            raise NonFiniteGradientError(
                f"non-finite per-sample gradient in {where} at step {self.steps}; the step was not recorded")
        # the record's weight in the step's update: DDP averages the ranks' gradients, w = w_local / world
        self._writer.append_step(sample_ids, np.broadcast_to(local / world, len(sample_ids)), step_lr, rows,
                                 curv_rows, rank)
        if self._dist is not None:
            self._dist.barrier()  # every shard holds the step: commit it globally
            if self._index is not None:
                self._index.commit(self._writer.n_steps, self._index.n_records + int(n_total))

    def _resolve_lr(self, lr: float | None) -> float:
        if lr is not None:
            return float(lr)
        if self.optimizer is None:
            raise ValueError("give lr= to Recorder.step, or pass optimizer= to the Recorder")
        lrs = set()
        for module in self._modules:
            for group in self.optimizer.param_groups:
                if any(p is module.weight for p in group["params"]):
                    lrs.add(float(group["lr"]))
        if len(lrs) != 1:
            raise ValueError(f"tracked layers are in optimizer groups with learning rates {sorted(lrs)}; "
                             "dvemb needs one lr per step (or pass lr= explicitly)")
        return lrs.pop()

    @property
    def _saves_checkpoints(self) -> bool:
        """Whether this process writes model checkpoints (one copy: rank 0 under torch.distributed)."""
        return (self._save_every is not None or bool(self._save_at)) and (self._dist is None or self._dist.rank == 0)

    def _wants_checkpoint(self, step: int) -> bool:
        return self._saves_checkpoints and (
            step in self._save_at or (self._save_every is not None and step % self._save_every == 0))

    def close(self) -> None:
        """Remove all hooks and close the store (saving theta_T if checkpoints are saved)."""
        if not self._closed:
            if self._saves_checkpoints and self.steps > 0:
                save_checkpoint(self.path, self.model, self.steps)
            self._capture.detach()
            self._writer.close()
            self._closed = True

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _local_weights(n: int, reduction: Reduction, weights: object) -> float | np.ndarray:
    """Each sample's weight in this rank's loss: one number for the reduction, or an array given per sample."""
    if weights is None:
        return 1.0 / n if reduction == "mean" else 1.0
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().numpy()
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"weights must be {n} finite non-negative numbers (one per id), got shape {w.shape}")
    return w


def _warn_if_batch_norm(model: nn.Module) -> None:
    """Batch norm in training mode mixes a batch's samples: no sample has a gradient of its own."""
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if norms:
        warnings.warn(f"{norms[0]!r} ({len(norms)} batch-norm layer(s) in training mode) normalises with batch "
                      "statistics, so each sample's loss depends on the others in its batch: the captured "
                      "per-sample gradients are each sample's share of the batch gradient and scores are "
                      "approximate (GroupNorm / LayerNorm, or batch norm in eval mode, keep them exact)",
                      stacklevel=3)
