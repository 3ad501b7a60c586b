"""The Recorder: captures projected per-sample gradients during training into a store."""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import math
import os
import warnings
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..store import MANIFEST, LayerSpec, StepRecord, Store, StoreConfig, StoreError, all_finite, to_numpy
from ..store.writer import Mode
from ..update import Adam, rule_of
from . import whitening as whiten
from .amp import current_scale, unscale
from .checkpoints import save_checkpoint
from .curvature import Curvature
from .distributed import full_tensor, sharded_modules
from .fitting import MAX_FIT_BYTES, BasisFit, needs_fit
from .ghost import DeferredStep, GhostCapture
from .options import DEFAULT_GGN_RANK, RecorderOptions, Reduction
from ..projection import DEFAULT_PROJECTION_DIM, ProjectionKind
from ..resources import check_memory
from .selection import ModuleSelection, layer_spec, select_modules
from .sink import sink_for
from .transfer import NonFiniteGradientError, PendingStep


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
    second: list | None = None  # the second moment's factors (whitening.py), known when the step ends
    n_total: int = 0  # the step's records over all ranks
    scale: torch.Tensor | float = 1.0  # the loss scale of the step's backward (GradScaler), divided out


class Recorder:
    """Records each optimizer step's per-sample projected gradients of the tracked layers.

    Use ``with rec.step(ids, lr=lr): loss.backward()`` around each optimizer step's forward and
    backward passes (several passes for gradient accumulation; their samples follow ``ids`` in
    order). Steps are written in a background thread and committed together at least every 50 ms;
    ``flush`` and ``close`` commit at once, and a crash loses only uncommitted steps, never part of one.

    The defaults are the most faithful configuration that scales (docs/results.md): each layer's
    per-sample gradient projected to ``projection_dim`` values on bases fitted to its factors during
    the first steps (``projection="fitted"``; ``"gaussian"`` etc. for seeded random projections;
    ``projection_dim=None`` for exact gradients; a layer of at most twice ``projection_dim`` values is
    kept exact), and the Gauss-Newton curvature in 3 passes per
    sample: its 2 leading factors and a random-sign sum of the others (``curvature="ggn"``; the
    paper's ``"gradient_outer"`` needs no extra pass). Under Adam / AdamW (``optimizer=``) projected
    rows are whitened by the optimizer's factored preconditioner.
    ``save_checkpoints`` (every N steps, or a list of steps) saves theta_t before those steps, and
    theta_T on close, as safetensors files for checkpoint queries.

    ``mode``: ``"new"`` (default) refuses a path that already holds recorded steps; ``"resume"``
    continues that run (the model must hold the parameters it ended with, checked when the previous
    Recorder was closed); ``"overwrite"`` deletes it first. One Recorder writes a path at a time.

    ``scaler`` (a ``torch.amp.GradScaler``; needs ``optimizer=``, the one ``scaler.step`` steps): the
    rows are divided by the loss scale of their step's backward, and a step the scaler skips (inf/NaN
    gradients: ``optimizer.step()`` is not called) is not recorded. A committed step is then written
    when ``optimizer.step()`` begins, so call ``scaler.step(optimizer)`` after each step block as usual.
    Under ``torch.autocast`` (bfloat16 or float16) the rows are computed and stored in float32 (``dtype``).
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
        mode: Mode = "new",
        scaler: object | None = None,
    ) -> None:
        self.options = RecorderOptions.of(dtype, modules, save_checkpoints, projection_dim=projection_dim, seed=seed,
                                          reduction=reduction, projection=projection, curvature=curvature,
                                          curvature_samples=curvature_samples, fit_steps=fit_steps, fsync=fsync)
        if scaler is not None and optimizer is None:
            raise ValueError("scaler= needs optimizer= (the optimizer scaler.step steps): a step is recorded when "
                             "the optimizer steps, and dropped when the scaler skips it")
        self.model, self.optimizer, self._path, self.scaler = model, optimizer, Path(path), scaler
        self._sharded = bool(sharded_modules(model))  # FSDP2: parameters are gathered by every rank together
        _warn_if_batch_norm(model)
        chosen = select_modules(model, self.options.modules)
        self._modules = [m for _, m in chosen]
        o = self.options
        specs = [layer_spec(name, m, o.projection_dim, o.seed, o.projection) for name, m in chosen]
        rule = rule_of(optimizer, self._modules)
        whitened = isinstance(rule, Adam) and not all(s.proj_in.is_identity and s.proj_out.is_identity for s in specs)
        self._second_factors = whitened and rule.second_moment == "full"
        self._sink = sink_for(path, o.fsync)
        self._specs, self._rule = _resumed_specs(self._path, specs), rule
        self._capture = GhostCapture(model, self._modules, self._specs, curvature=o.curvature,
                                     curvature_samples=o.curvature_samples, seed=o.seed)
        self._fit = BasisFit(self._specs) if any(needs_fit(s) for s in self._specs) else None
        self._fit_steps = o.fit_steps
        self._pending: list[_Step] = []
        _refuse_oversized(self._specs)
        self._open(mode, whitened)
        self._steps = self._sink.committed_steps()
        if isinstance(rule, Adam):  # resumed: the store's start, which the optimizer's count was checked against
            self._rule = replace(rule, initial_step=rule.initial_step - self._steps)
        self._whitening = whiten.Whitening(optimizer, self._modules, specs, self._rule) if whitened else None
        self._capture.attach()
        self._current: _Step | None = None
        self._open_lr: float | None = None
        self._closed = False
        self._given_lr: float | None = None  # an explicit lr, to compare with the optimizer's at its next step()
        self._lr_hook = None if optimizer is None else optimizer.register_step_pre_hook(self._compare_lr)
        self._held: _Step | None = None  # with a scaler: the committed step, written when the optimizer steps
        self._step_hook = None if scaler is None else optimizer.register_step_pre_hook(self._on_optimizer_step)
        self._async_copies: bool | None = None  # None: for rows on a CUDA device in one process (transfer.py)
        _OPEN.add(self)

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
        if self._current is not None:
            raise RuntimeError("Recorder.step blocks cannot be nested")
        self._held = None  # a step held for the optimizer that never stepped was skipped (GradScaler): dropped
        sample_ids = check_ids(ids)
        if lr is not None:
            lr = check_lr(lr)
        t = self._steps
        if self._wants_checkpoint(t):
            save_checkpoint(self.path, self.model, t, write=self._sink.rank == 0)  # theta_t, before this step's update
        local = _local_weights(len(sample_ids), self.options.reduction, weights)
        defer = self._fit is not None
        factors = None if defer or self._whitening is None else self._whitening.lagged(t)
        self._capture.set_specs(self._specs, None if factors is None else whiten.scales(factors))
        # hooks see this rank's loss gradient w_local * g: scaling by 1/w_local stores the sample's own g
        self._capture.begin(scale=1.0 / local if isinstance(local, float) else 1.0, defer=defer)
        self._current = _Step(t, sample_ids, local, 0.0, None, factors)
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
        if self.scaler is not None:  # written when the optimizer steps; dropped if the scaler skips the step
            step.scale = current_scale(self.scaler)
            self._held = step
            return
        self._finish(step)

    def _finish(self, step: _Step) -> None:
        """Hand a collected step on (held for the bases, or written) and count it."""
        if self._second_factors:  # the batch gradient is complete (and unscaled, with a GradScaler) here
            step.second = self._whitening.second(step.t)
        if isinstance(step.rows, DeferredStep):
            self._defer(step)
        else:
            self._write(step, check=True)
        self._steps += 1

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, *_: object) -> None:
        """The optimizer steps (the scaler did not skip the step): record the held step."""
        step, self._held = self._held, None
        if step is not None:
            self._finish(step)

    def abort_step(self) -> None:
        """Drop the step begun by :meth:`begin_step`: nothing of it is recorded."""
        self._take_open()
        self._capture.abort()

    def _take_open(self) -> _Step:
        if self._current is None:
            raise RuntimeError("no recorded step is open: call begin_step first")
        step, self._current = self._current, None
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
            per_layer = [0] * len(self._specs)  # a layer's tokens over its forward calls (micro-batches, reuse)
            for idx, _, _, ds in step.rows.gradient_factors():
                per_layer[idx] += ds.numel() // self._specs[idx].d_out
            tokens = torch.tensor(per_layer, dtype=torch.float64)
            self._sink.all_reduce(tokens)
            self._fit_steps = self._sink.agree(self._fit.steps_wanted(tokens.tolist()))
        held = sum(s.rows.nbytes() for s in self._pending)  # type: ignore[union-attr]
        early = self._sink.agree(int(held >= MAX_FIT_BYTES))  # any rank's memory: all ranks fit together
        if len(self._pending) >= self._fit_steps or early:
            self._fit_bases()

    def _fit_bases(self) -> None:
        """Fit the bases on the held steps, then project and write them."""
        if self._fit is None:
            return
        for step in self._pending:
            self._capture.set_specs(self._specs, None if step.factors is None else whiten.scales(step.factors))
            projectors = self._capture.projectors
            for idx, module, a, ds in step.rows.gradient_factors():  # type: ignore[union-attr]
                self._fit.add(idx, *projectors[idx].exact_factors(module, a, unscale([ds], step.scale)[0]))
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

    def _open(self, mode: Mode, whitened: bool) -> None:
        """Create (or resume) the store; fitted bases are stored when they are known (before the first step), and
        Adam's moments of the layers it follows elementwise when the optimizer already has state."""
        config = StoreConfig(tuple(self._specs), self.options.dtype, self.options.reduction, self.options.curvature,
                             self.options.projection, self.options.seed, self._rule, whitened,
                             second_factors=self._second_factors)
        followed = [i for i in range(len(self._specs)) if config.elementwise(i)]
        started = isinstance(self._rule, Adam) and self._rule.initial_step and followed
        moments = functools.partial(whiten.initial_moments, self.optimizer, [self._modules[i] for i in followed],
                                    [self._specs[i] for i in followed])  # read only if the store is created
        self._sink.open(config, mode, moments if started else None)
        self._capture.set_specs(self._specs)
        if self._sink.committed_steps():
            try:
                self._check_continues(self._sink.committed_steps())
            except BaseException:
                self._sink.close()
                raise

    def _check_continues(self, steps: int) -> None:
        """On resume: the model must hold the parameters the recorded run ended with, where they were recorded."""
        stored = Store(self._path).manifest.get("parameters")
        if not stored or stored.get("step") != steps:
            warnings.warn(f"{self._path}: cannot check that the model continues the recorded run (the process that "
                          f"recorded its {steps} steps did not close the Recorder)", stacklevel=4)
        elif stored["sha256"] != parameters_digest(self._modules):
            raise StoreError(f"{self._path}: the model's tracked parameters are not those the recorded run ended with "
                             f"after step {steps}: load that state (e.g. dvemb.load_checkpoint) before resuming, or "
                             "record into another path")

    def _scaled_rows(self, step: _Step) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The step's rows scaled to each sample's own loss (and divided by the loss scale), on their device."""
        grads, curvature = step.rows
        local = step.local
        grads = unscale(list(grads), step.scale)
        if curvature is not None:  # H = sum_i w_i c c^T: curvature rows scale as sqrt(w_i)
            curvature = unscale(list(curvature), step.scale, 0.5)
        if isinstance(local, float):  # a batch-wide weight, already undone by the capture's scale
            return grads, curvature
        # per-sample weights: divide each row by its own weight (curvature rows by its root); weight 0 stays 0
        inverse = torch.from_numpy(np.divide(1.0, local, out=np.zeros_like(local), where=local != 0))
        return _per_row(grads, inverse), None if curvature is None else _per_row(curvature, inverse.sqrt())

    def _write(self, step: _Step, check: bool) -> None:
        """Scale the step's rows to each sample's own loss, check them and hand them to the store."""
        grads, curvature = self._scaled_rows(step)
        if self._copies_async(grads[0]):
            self._sink.append(PendingStep.start(step.t, self.layers, self.options.dtype, grads, curvature,
                                                lambda g, c: self._record(step, g, c)), len(step.ids))
            return
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
        self._sink.append(self._record(step, rows, curv_rows), n_total)

    def _copies_async(self, rows: torch.Tensor) -> bool:
        """Whether the rows go to the host asynchronously: on a CUDA device, in one process (see transfer.py)."""
        if self._async_copies is not None:
            return self._async_copies
        return rows.device.type == "cuda" and self._sink.world_size == 1

    def _record(self, step: _Step, rows: list[np.ndarray], curv_rows: list[np.ndarray] | None) -> StepRecord:
        """The step's records and host rows for the store."""
        # the record's weight in the step's update: DDP averages the ranks' gradients, w = w_local / world
        world = self._sink.world_size
        return StepRecord(step.ids, np.broadcast_to(step.local / world, len(step.ids)), step.lr, rows, curv_rows,
                          self._sink.rank, None if step.factors is None else whiten.rows(step.factors, step.second))

    def _resolve_lr(self, lr: float | None) -> float:
        if lr is not None:
            self._given_lr = lr
            return lr
        if self.optimizer is None:
            raise ValueError("give lr= to Recorder.step, or pass optimizer= to the Recorder")
        return self._optimizer_lr()

    def _compare_lr(self, optimizer: torch.optim.Optimizer, *_: object) -> None:
        """At optimizer.step(): warn (once) when the lr given to the step just recorded is not the one applied."""
        lr, self._given_lr = self._given_lr, None
        if lr is None:
            return
        found = self._optimizer_lr()
        if not math.isclose(found, lr, rel_tol=1e-6, abs_tol=0.0):  # float32 schedules round at ~1e-7
            self._lr_hook.remove()
            warnings.warn(f"step {self._steps - 1}: lr={lr} was given to Recorder.step but the optimizer applies "
                          f"lr={found}; the embeddings follow lr={lr} (warned once)", stacklevel=3)

    def _optimizer_lr(self) -> float:
        """The lr of the optimizer groups that hold the tracked layers (one value)."""
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
        """Whether this process takes part in model checkpoints (one copy, written by rank 0 under torch.distributed;
        under FSDP every rank gathers the parameters with it)."""
        return self.options.save_checkpoints is not None and (self._sink.rank == 0 or self._sharded)

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
        if self._current is not None:
            self.abort_step()
        self._held = None  # committed but the optimizer never stepped after it: not recorded
        try:
            if self._saves_checkpoints and self.steps > 0:
                save_checkpoint(self.path, self.model, self.steps, write=self._sink.rank == 0)
            if self._sink.stopped:  # writing failed and said so: the store keeps what it committed
                return
            self._fit_bases()
            self._sink.flush()
            self._sink.set_metadata("parameters", {"step": self.steps, "sha256": parameters_digest(self._modules)})
        finally:
            self._closed = True  # even when closing the store fails below: a second close must not wait on it
            _OPEN.discard(self)
            for hook in (self._lr_hook, self._step_hook):
                if hook is not None:
                    hook.remove()
            self._capture.detach()
            self._sink.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and getattr(self, "_sink", None) is not None \
                and self._sink.world_size == 1:
            warnings.warn(f"a Recorder writing {self.path} was garbage-collected while open: closing it "
                          "(use `with` or close())", ResourceWarning)
            self.close()

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


def parameters_digest(modules: Sequence[nn.Module]) -> str:
    """SHA-256 of the tracked layers' parameters (their bytes, in order): what a resumed run must continue from.

    FSDP-sharded parameters are gathered first (every rank calls this)."""
    digest = hashlib.sha256()
    for module in modules:
        for p in module.parameters(recurse=False):
            digest.update(full_tensor(p.detach()).to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def _refuse_oversized(specs: Sequence[LayerSpec]) -> None:
    """Refuse layers whose propagator (dim^2 float32 values) alone exceeds this machine's memory."""
    for spec in specs:
        check_memory(4 * spec.dim ** 2, f"layer {spec.name!r} keeps {spec.dim:,} values per record "
                     f"({spec.describe()}): its propagator", "project it (projection_dim=1024, the default) or "
                     "leave it out (modules=...)")


def _per_row(rows: list[torch.Tensor], scales: torch.Tensor) -> list[torch.Tensor]:
    """Each row of every tensor times its scale (moved to the rows' device without waiting)."""
    return [r * scales.to(device=r.device, dtype=r.dtype, non_blocking=True)[:, None] for r in rows]


def check_ids(ids: object) -> np.ndarray:
    """Sample ids as int64: non-negative, distinct within the step, and below 2^63."""
    raw = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if raw.ndim == 1 and raw.dtype == np.uint64 and raw.size and raw.max() >= 2 ** 63:
        raise ValueError(f"sample ids must be below 2^63, got {int(raw.max())}")
    arr = as_ids(raw)
    if len(arr) == 0:
        raise ValueError("a step needs at least one sample id")
    if (arr < 0).any():
        raise ValueError(f"sample ids must be non-negative integers, got {int(arr.min())}")
    unique, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"sample ids must be distinct within a step: {unique[counts > 1][:5].tolist()} repeat "
                         "(a sample used twice in one batch needs two ids)")
    return arr


def check_lr(lr: float) -> float:
    """A learning rate: finite and non-negative."""
    lr = float(lr)
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr must be a finite number >= 0, got {lr}")
    return lr


_OPEN: "weakref.WeakSet[Recorder]" = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """Commit the steps of Recorders a script never closed (one process; ranks close their own)."""
    for rec in list(_OPEN):
        if rec._sink.world_size == 1:
            warnings.warn(f"a Recorder writing {rec.path} was never closed: closed at exit (use `with` or close())")
            rec.close()


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

