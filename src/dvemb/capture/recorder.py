"""The Recorder: captures projected per-sample gradients during training into a store."""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..store import MANIFEST, StepRecord, Store, StoreConfig, all_finite, to_numpy
from ..update import Adam, rule_of
from . import whitening as whiten
from .checkpoints import save_checkpoint
from .curvature import Curvature
from .distributed import refuse_fsdp
from .fitting import BasisFit, needs_fit
from .ghost import DeferredStep, GhostCapture
from .options import DEFAULT_GGN_RANK, RecorderOptions, Reduction
from ..projection import DEFAULT_PROJECTION_DIM, ProjectionKind
from ..store import LayerSpec
from .selection import ModuleSelection, layer_spec, select_modules
from .sink import sink_for


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


@dataclass
class _Step:
    """A captured step on its way to the store: its records, and its rows or their deferred computation."""

    t: int
    ids: np.ndarray
    local: float | np.ndarray  # each sample's weight in this rank's loss
    lr: float
    rows: tuple | DeferredStep | None
    factors: list | None  # whitening factors the rows were (or will be) whitened with
    n_total: int = 0  # the step's records over all ranks


class Recorder:
    """Records each optimizer step's per-sample projected gradients of the tracked layers.

    Use ``with rec.step(ids, lr=lr): loss.backward()`` around each optimizer step's forward and
    backward passes (several passes for gradient accumulation; their samples follow ``ids`` in
    order). Steps are written in a background thread and committed together at least every 50 ms;
    ``flush`` and ``close`` commit at once, and a crash loses only uncommitted steps, never part of one.

    The defaults are the most faithful configuration that scales (docs/results.md): each layer's
    per-sample gradient projected to ``projection_dim`` values on bases fitted to its factors during
    the first steps (``projection="fitted"``; ``"gaussian"`` etc. for seeded random projections,
    ``projection_dim=None`` for exact gradients), and the Gauss-Newton curvature's leading rank-3 part
    per sample (``curvature="ggn"``; the paper's ``"gradient_outer"`` needs no extra pass). Under
    Adam / AdamW (``optimizer=``) projected rows are whitened by the optimizer's factored preconditioner.
    ``save_checkpoints`` (every N steps, or a list of steps) saves theta_t before those steps, and
    theta_T on close, as safetensors files for checkpoint queries.
    """

    def __init__(
        self,
        model: nn.Module,
        path: str | os.PathLike,
        projection_dim: int | None = DEFAULT_PROJECTION_DIM,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        *,
        modules: ModuleSelection = None,
        reduction: Reduction = "mean",
        optimizer: torch.optim.Optimizer | None = None,
        projection: ProjectionKind = "fitted",
        save_checkpoints: int | Sequence[int] | None = None,
        curvature: Curvature = "ggn",
        curvature_samples: int | None = DEFAULT_GGN_RANK,
        fit_steps: int | None = None,
        fsync: bool = False,
    ) -> None:
        self.options = RecorderOptions.of(dtype, modules, save_checkpoints, projection_dim=projection_dim, seed=seed,
                                          reduction=reduction, projection=projection, curvature=curvature,
                                          curvature_samples=curvature_samples, fit_steps=fit_steps, fsync=fsync)
        self.model, self.optimizer, self._path = model, optimizer, Path(path)
        refuse_fsdp(model)
        _warn_if_batch_norm(model)
        chosen = select_modules(model, self.options.modules)
        self._modules = [m for _, m in chosen]
        o = self.options
        specs = [layer_spec(name, m, o.projection_dim, o.seed, o.projection) for name, m in chosen]
        rule = rule_of(optimizer, self._modules)
        projected = not all(s.proj_in.is_identity and s.proj_out.is_identity for s in specs)
        self._whitening = whiten.Whitening(optimizer, self._modules, specs, rule) if (
            isinstance(rule, Adam) and projected) else None
        self._sink = sink_for(path, o.fsync)
        self._specs, self._rule = _resumed_specs(self._path, specs), rule
        self._capture = GhostCapture(model, self._modules, self._specs, curvature=o.curvature,
                                     curvature_samples=o.curvature_samples, seed=o.seed)
        self._fit = BasisFit(self._specs) if any(needs_fit(s) for s in self._specs) else None
        self._fit_steps = o.fit_steps
        self._pending: list[_Step] = []
        self._open()
        self._steps = self._sink.committed_steps()
        self._capture.attach()
        self._open: _Step | None = None
        self._open_lr: float | None = None
        self._closed = False

    @property
    def path(self) -> Path:
        """Directory of the store being written."""
        return self._path

    @property
    def layers(self) -> list[str]:
        """Names of the tracked layers."""
        return [s.name for s in self._specs]

    @property
    def steps(self) -> int:
        """Number of recorded steps (the last few may still be being written or fitted: see flush)."""
        return self._steps

    def flush(self) -> None:
        """Wait until every recorded step is committed (fitting the bases first if they still wait)."""
        self._fit_bases()
        self._sink.flush()

    @contextlib.contextmanager
    def step(self, ids: Sequence[int] | np.ndarray | torch.Tensor, lr: float | None = None,
             weights: Sequence[float] | np.ndarray | torch.Tensor | None = None) -> Iterator[None]:
        """Capture one optimizer step over the samples ``ids`` and commit it on exit.

        ``weights`` gives each sample's weight w_i in this step's loss sum_i w_i loss_i when it is not
        the ``reduction``'s 1/B or 1: e.g. n_i / N for a token-mean loss over padded sequences (n_i
        label tokens of sample i, N in the batch), so that the stored g_i is the gradient of the
        sample's own mean token loss. A sample of weight 0 is stored with a zero gradient. An error
        inside the block records nothing of the step.
        """
        self.begin_step(ids, lr, weights)
        try:
            yield
        except BaseException:
            self.abort_step()
            raise
        self.commit_step()

    def begin_step(self, ids: Sequence[int] | np.ndarray | torch.Tensor, lr: float | None = None,
                   weights: Sequence[float] | np.ndarray | torch.Tensor | None = None) -> None:
        """Start capturing a step (as :meth:`step` does on entry); end it with :meth:`commit_step` or
        :meth:`abort_step`. For training loops that cannot wrap a step in a ``with`` block."""
        if self._closed:
            raise RuntimeError("Recorder is closed")
        if self._open is not None:
            raise RuntimeError("Recorder.step blocks cannot be nested")
        sample_ids = as_ids(ids)
        if len(sample_ids) == 0:
            raise ValueError("a step needs at least one sample id")
        t = self._steps
        if self._wants_checkpoint(t):
            save_checkpoint(self.path, self.model, t)  # theta_t, before this step's update
        local = _local_weights(len(sample_ids), self.options.reduction, weights)
        defer = self._fit is not None
        factors = None if defer or self._whitening is None else self._whitening.lagged(t)
        self._capture.set_specs(self._specs, None if factors is None else whiten.scales(factors))
        # hooks see this rank's loss gradient w_local * g: scaling by 1/w_local stores the sample's own g
        self._capture.begin(scale=1.0 / local if isinstance(local, float) else 1.0, defer=defer)
        self._open = _Step(t, sample_ids, local, 0.0 if lr is None else float(lr), None, factors)
        self._open_lr = lr

    def commit_step(self) -> None:
        """End the step begun by :meth:`begin_step`: collect its rows and hand them to the store."""
        step = self._take_open()
        try:
            step.rows = self._capture.collect(n_rows=len(step.ids))
        except BaseException:
            self._capture.abort()
            raise
        step.lr = self._resolve_lr(self._open_lr)
        if isinstance(step.rows, DeferredStep):
            self._defer(step)
        else:
            self._write(step, check=True)
        self._steps += 1

    def abort_step(self) -> None:
        """Drop the step begun by :meth:`begin_step`: nothing of it is recorded."""
        self._take_open()
        self._capture.abort()

    def _take_open(self) -> _Step:
        if self._open is None:
            raise RuntimeError("no recorded step is open: call begin_step first")
        step, self._open = self._open, None
        return step

    def _defer(self, step: _Step) -> None:
        """Hold a step captured before the bases exist; fit them once enough steps are held."""
        assert isinstance(step.rows, DeferredStep)
        bad, step.n_total = self._sink.check(not step.rows.finite, len(step.ids))
        if bad:
            raise NonFiniteGradientError(f"non-finite per-sample gradient at step {step.t}; the step was not recorded")
        if self._whitening is not None:
            step.factors = self._whitening.current(step.t)  # v_t is known at the end of the step
        self._pending.append(step)
        if self._fit_steps is None:  # from the step's tokens over all ranks: every rank fits at the same step
            tokens = torch.tensor([max(ds.numel() // self._specs[idx].d_out
                                       for idx, _, _, ds in step.rows.gradient_factors())], dtype=torch.float64)
            self._sink.all_reduce(tokens)
            self._fit_steps = self._sink.agree(self._fit.steps_wanted(int(tokens.item())))
        if len(self._pending) >= self._fit_steps:
            self._fit_bases()

    def _fit_bases(self) -> None:
        """Fit the bases on the held steps, then project and write them."""
        if self._fit is None:
            return
        for step in self._pending:
            self._capture.set_specs(self._specs, None if step.factors is None else whiten.scales(step.factors))
            projectors = self._capture.projectors
            for idx, module, a, ds in step.rows.gradient_factors():  # type: ignore[union-attr]
                self._fit.add(idx, *projectors[idx].exact_factors(module, a, ds))
        if self._pending:
            self._fit.reduce(self._sink.all_reduce)
            self._specs = self._fit.fitted_specs()
            self._sink.set_layers(self._specs)
        self._fit = None
        pending, self._pending = self._pending, []
        for step in pending:
            self._capture.set_specs(self._specs, None if step.factors is None else whiten.scales(step.factors))
            step.rows = self._capture.realize(step.rows)
            self._write(step, check=False)

    def _open(self) -> None:
        """Create (or resume) the store; fitted bases are stored when they are known (before the first step)."""
        config = StoreConfig(tuple(self._specs), self.options.dtype, self.options.reduction, self.options.curvature,
                             self.options.projection, self.options.seed, self._rule, self._whitening is not None)
        self._sink.open(config)
        self._capture.set_specs(self._specs)

    def _write(self, step: _Step, check: bool) -> None:
        """Scale the step's rows to each sample's own loss, check them and hand them to the store."""
        grads, curvature = step.rows
        local = step.local
        if not isinstance(local, float):  # per-sample weights: divide each row by its own weight
            inverse = torch.from_numpy(np.divide(1.0, local, out=np.zeros_like(local), where=local != 0))
            grads = [g * inverse.to(g.dtype)[:, None] for g in grads]
        if curvature is not None:  # the rows carry sqrt(w_i) of the loss they were read off: H = sum_i w_i c c^T
            root = 1.0 / np.sqrt(local) if isinstance(local, float) else torch.from_numpy(
                np.divide(1.0, np.sqrt(local), out=np.zeros_like(local), where=local != 0))
            curvature = [c * (root if isinstance(root, float) else root.to(c.dtype)[:, None]) for c in curvature]
        dtype = self.options.dtype
        rows = [to_numpy(g, dtype) for g in grads]
        curv_rows = None if curvature is None else [to_numpy(c, dtype) for c in curvature]
        bad = next((name for name, r in zip(self.layers * 2, rows + (curv_rows or [])) if not all_finite(r, dtype)),
                   None)
        n_total = step.n_total
        if check:
            any_bad, n_total = self._sink.check(bad is not None, len(step.ids))
            if any_bad:
                where = f"layer {bad!r}" if bad else "another rank"
                raise NonFiniteGradientError(
                    f"non-finite per-sample gradient in {where} at step {step.t}; the step was not recorded")
        elif bad is not None:
            raise NonFiniteGradientError(f"non-finite projected gradient in layer {bad!r} at step {step.t}")
        # the record's weight in the step's update: DDP averages the ranks' gradients, w = w_local / world
        world = self._sink.world_size
        self._sink.append(StepRecord(step.ids, np.broadcast_to(local / world, len(step.ids)), step.lr, rows,
                                     curv_rows, self._sink.rank,
                                     None if step.factors is None else whiten.rows(step.factors)), n_total)

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
        return self.options.save_checkpoints is not None and self._sink.rank == 0

    def _wants_checkpoint(self, step: int) -> bool:
        every = self.options.save_checkpoints
        if not self._saves_checkpoints:
            return False
        return step % every == 0 if isinstance(every, int) else step in every

    def close(self) -> None:
        """Remove all hooks and close the store (saving theta_T if checkpoints are saved); a step still open is
        dropped."""
        if self._closed:
            return
        if self._open is not None:
            self.abort_step()
        try:
            if self._saves_checkpoints and self.steps > 0:
                save_checkpoint(self.path, self.model, self.steps)
            self._fit_bases()
        finally:
            self._capture.detach()
            self._sink.close()
            self._closed = True

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _resumed_specs(path: Path, specs: list[LayerSpec]) -> list[LayerSpec]:
    """The specs to record with: a store with committed steps keeps its fitted bases (the rest must match)."""
    if not (path / MANIFEST).exists():
        return specs
    try:
        store = Store(path)
    except Exception:  # an unreadable store: the writer reports it when it opens
        return specs
    if store.n_steps == 0:
        return specs
    by_name = {s.name: s for s in store.layers}
    out = []
    for spec in specs:
        found = by_name.get(spec.name)
        same = found is not None and (found.kind, found.d_in, found.d_out, found.bias) == (
            spec.kind, spec.d_in, spec.d_out, spec.bias)
        out.append(found if same and needs_fit(spec) and not needs_fit(found) else spec)
    return out


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

