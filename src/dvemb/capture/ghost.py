"""Projected per-sample gradients from layer inputs and output gradients (the ghost trick).

For a tracked layer whose input and output gradient give token rows a (b x n_tok x d_in)
and ds (b x n_tok x d_out) (see layers.py), sample j's projected weight-and-bias gradient is
    sum_tok (P_out ds_jt) (P_in [a_jt, 1])^T,
a k_out x k_in matrix, so the cost is O(n_tok (d_in k_in + d_out k_out + k_in k_out))
and the full gradient is never formed. A forward hook keeps a and registers a hook
on the layer's output tensor, which fires with ds during backward.

Micro-batches (gradient accumulation) are told apart by the phase: the first forward
after a backward starts a new micro-batch whose rows follow the previous ones.

When the process may use more CPUs than torch's threads do, the projections of large forward
calls (``OVERLAP_MIN_FLOPS``) run on one worker thread: the hooks only queue them, so they overlap
the rest of the backward pass (torch kernels release the GIL), and ``collect`` waits for them, so a
step still ends with all its rows. Small ones run at once: handing them over costs more than it saves.

With a curvature other than ``gradient_outer``, a hook on the model's output hooks its logits:
when the training backward reaches them, one nested vectorised backward (vmap, see ``_vmap``)
of all curvature passes runs from the logits to the tracked layers' outputs only (no parameter
gradients), weighting each token as the loss does, and each pass's output gradient is
projected against the layer's input like a gradient.
"""

from __future__ import annotations

import functools
import sys
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..cpus import spare_cpu
from .curvature import Curvature, logit_gradients, logits_of
from .layers import LayerRule, grouped_rows, rule_by_kind
from ..store import LayerSpec

try:  # torch.func.vmap's primitives (see _vmap); torch.func.vmap itself where a torch lacks them
    from torch._C._functorch import _add_batch_dim, _remove_batch_dim, _vmap_decrement_nesting, _vmap_increment_nesting
    from torch._functorch.vmap import lazy_load_decompositions as _load_decompositions
except ImportError:  # pragma: no cover - depends on the torch build
    _add_batch_dim = None

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# a forward call whose projections take fewer flops runs them on the training thread even when a worker is there.
# Measured on 2 CPUs, 1 torch thread, 2026-12-06 (medians of 7-9 alternated blocks in one process): with every call
# on the worker the defaults' recorded step was 27% slower on 784-128-10 (batch 32) and 14-27% on 784-512-10 than
# with this threshold (first layers 1.9e6 and 2.7e6 flops: the hand-over and the contention for the GIL cost more than
# these projections take); the paper's configuration was within +-10% (the runs' spread) either way, also on
# 784-512-256-10 (batch 64, 5.4e6 flops in its first layer)
OVERLAP_MIN_FLOPS = 4e6


@dataclass
class _Projector:
    """A layer's projection factors (prepared once per dtype/device and output scale) and the two halves of
    its projected gradient: input rows and, from output gradients, the rows themselves.

    ``in_scale`` [d_in (+1)] and ``out_scale`` [d_out] multiply the factors before projection (whitening:
    the rows are then those of the gradient scaled elementwise by out_scale in_scale^T).
    """

    spec: LayerSpec
    in_scale: torch.Tensor | None = None
    out_scale: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict)
    _rule: LayerRule = field(init=False)

    def __post_init__(self) -> None:
        self._rule = rule_by_kind(self.spec.kind)

    def in_factors(self, dtype: torch.dtype, device: torch.device) -> tuple:
        """(P_in^T restricted to the weight columns, P_in's bias column); (None, None) = exact input side."""
        key = ("in", dtype, device)
        if key not in self._cache:
            in_t = in_bias = None
            if not self.spec.proj_in.is_identity:
                m = self.spec.proj_in.matrix(dtype, device)
                if self.in_scale is not None:
                    m = m * self.in_scale.to(dtype=dtype, device=device)
                in_t = m[:, : self.spec.d_in].t().contiguous()
                in_bias = m[:, self.spec.d_in].contiguous() if self.spec.bias else None
            self._cache[key] = (in_t, in_bias)
        return self._cache[key]

    def out_factor(self, dtype: torch.dtype, device: torch.device, scale: float) -> torch.Tensor | None:
        """scale * P_out^T (times out_scale's rows); None = exact output side."""
        key = ("out", dtype, device, scale)
        if key not in self._cache:
            p_out = self.spec.proj_out
            matrix = None
            if not p_out.is_identity:
                matrix = p_out.matrix(dtype, device)
                if self.out_scale is not None:
                    matrix = matrix * self.out_scale.to(dtype=dtype, device=device)
                matrix = (matrix.t() * scale).contiguous()
            self._cache[key] = matrix
        return self._cache[key]

    def _dtype(self, module: nn.Module, a: torch.Tensor) -> torch.dtype:
        dtype = a.dtype if a.is_floating_point() else module.weight.dtype
        return torch.float32 if dtype in _LOW_PRECISION else dtype

    def inputs(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """The layer input's token rows, projected: [b, tokens, k_in]."""
        dtype = self._dtype(module, a)
        rows = self._rule.inputs(module, a, *self.in_factors(dtype, a.device), self.spec.bias, dtype)
        if self.spec.proj_in.is_identity and self.in_scale is not None:
            rows = rows * self.in_scale.to(dtype=rows.dtype, device=rows.device)
        return rows

    def exact_factors(self, module: nn.Module, a: torch.Tensor, ds: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Unprojected (whitened) token rows of the input [b, tokens, d_in (+1)] and output gradient
        [b, tokens, d_out], and the layer's groups (grouped convolutions: inputs [b, groups * tokens, ...]),
        for fitting a basis."""
        dtype = self._dtype(module, a)
        rows = self._rule.inputs(module, a, None, None, self.spec.bias, dtype)
        outputs = self._rule.outputs(ds.unsqueeze(0).to(dtype))[0]
        if self.in_scale is not None:
            rows = rows * self.in_scale.to(dtype=dtype, device=rows.device)
        if self.out_scale is not None:
            outputs = outputs * self.out_scale.to(dtype=dtype, device=outputs.device)
        return rows, outputs, self._rule.groups(module)

    def flops(self, a: torch.Tensor, output: torch.Tensor) -> int:
        """About how many flops projecting a forward call's gradient takes (input ``a``, ``output``)."""
        k_in, k_out = self.spec.proj_in.k, self.spec.proj_out.k
        inputs = 0 if self.spec.proj_in.is_identity else a.numel() * k_in
        outputs = 0 if self.spec.proj_out.is_identity else output.numel() * k_out
        tokens = output.numel() // max(self.spec.d_out, 1)  # sample x token rows
        return 2 * (inputs + outputs + tokens * k_out * k_in)

    def rows(self, inputs: "_InputRows", ds: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Rows [b, passes * k_out * k_in] of ``scale`` times output gradients ds [passes, b, ...] with input rows."""
        a_rows = inputs.get()
        out_t = self.out_factor(a_rows.dtype, ds.device, scale)  # holds the scale when projected
        ds = ds.to(a_rows.dtype) if out_t is not None or scale == 1.0 else ds.to(a_rows.dtype) * scale
        whiten = out_t is None and self.out_scale is not None  # exact output side: whiten the gradients themselves
        groups = self._rule.groups(inputs.module)
        if groups > 1:
            if whiten:  # [passes, b, C_out, *spatial]
                ds = ds * self.out_scale.to(dtype=ds.dtype, device=ds.device).reshape(-1, *[1] * (ds.dim() - 3))
            return grouped_rows(ds, a_rows, out_t, groups)
        ds = self._rule.outputs(ds)  # [passes, b, tokens, d_out]
        if whiten:
            ds = ds * self.out_scale.to(dtype=ds.dtype, device=ds.device)
        if out_t is not None:
            ds = ds @ out_t
        passes, b, tokens = ds.shape[:3]
        if tokens == 1:  # one token per sample: outer products (broadcasting is 2-3x faster than bmm here)
            return (ds[:, :, 0].transpose(0, 1).unsqueeze(3) * a_rows[:, None, :, :]).reshape(b, -1)
        # per sample: sum over tokens of [ds of all passes]^T a, i.e. (passes * k_out) x k_in
        ds = ds.permute(1, 2, 0, 3).reshape(b, tokens, -1)
        return torch.bmm(ds.transpose(1, 2), a_rows).reshape(b, -1)


class _InputRows:
    """A forward call's projected input rows, computed on first use (by the gradient or a curvature pass)."""

    __slots__ = ("projector", "module", "a", "value", "overlap")

    def __init__(self, projector: _Projector, module: nn.Module, a: torch.Tensor, overlap: bool = False) -> None:
        self.projector, self.module, self.a, self.value = projector, module, a, None
        self.overlap = overlap  # whether this call's blocks are projected on the worker thread (all or none of them)

    def get(self) -> torch.Tensor:
        """[b, tokens, k_in]; only one thread (the worker, or the training thread without one) calls this."""
        if self.value is None:
            self.value, self.a = self.projector.inputs(self.module, self.a), None
        return self.value


@functools.lru_cache(maxsize=1024)
def _projector(spec: LayerSpec) -> _Projector:
    """One projector per layer spec, shared by every capture (queries too): factors are built once per dtype."""
    return _Projector(spec)


class GhostCapture:
    """Hooks on tracked modules that accumulate projected per-sample gradients by row."""

    def __init__(self, model: nn.Module, modules: Sequence[nn.Module], specs: Sequence[LayerSpec], *,
                 curvature: Curvature = "gradient_outer", curvature_samples: int | None = None,
                 seed: int = 0, overlap: bool | None = None) -> None:
        self.model = model
        self.modules = list(modules)
        self.specs = list(specs)
        self.curvature = curvature
        self.curvature_samples = curvature_samples
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._projectors = [_projector(s) for s in self.specs]
        self._handles: list[RemovableHandle] = []
        self._active = False
        # with a CPU to spare the projections run on a worker thread, overlapping the rest of the backward
        self.overlap = overlap if overlap is not None else spare_cpu()
        self._worker: ThreadPoolExecutor | None = None
        self._sharded: list[nn.Module] = []  # FSDP2 modules, unsharded for the curvature's nested backward
        self._reset()

    # -- lifecycle -------------------------------------------------------------------
    def attach(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return
        if self.overlap:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dvemb-projection")
        for idx, module in enumerate(self.modules):
            self._handles.append(module.register_forward_hook(self._forward_hook(idx)))
        if self.curvature != "gradient_outer":
            self._handles.append(self.model.register_forward_hook(self._curvature_hook))
            self._sharded = _fsdp_modules(self.model)

    def detach(self) -> None:
        """Remove every hook; the model behaves exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._active = False
        self._reset()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    def begin(self, scale: float = 1.0, defer: bool = False) -> None:
        """Start collecting a fresh set of rows; gradients are multiplied by ``scale`` (e.g. 1/w).

        With ``defer`` the hooks keep the raw factors instead of projecting them: :meth:`collect` returns a
        :class:`DeferredStep`, whose rows :meth:`realize` computes once the bases are fitted.
        """
        self._reset()
        self._scale = scale
        self._defer = defer
        self._active = True

    def set_specs(self, specs: Sequence[LayerSpec], scales: Sequence[tuple] | None = None) -> None:
        """Project with these specs from now on (fitted bases), each with (in_scale, out_scale) whitening."""
        self.specs = list(specs)
        if scales is None:
            self._projectors = [_projector(s) for s in self.specs]
        else:
            self._projectors = [_Projector(s, *scale) for s, scale in zip(self.specs, scales)]

    @property
    def projectors(self) -> list[_Projector]:
        """The current projectors, one per tracked layer."""
        return self._projectors

    def realize(self, step: "DeferredStep") -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The rows of a deferred step, projected with the current specs (as :meth:`collect` returns them)."""
        def run(parts: list[dict[int, list]]) -> list[dict[int, list]]:
            out = []
            for layer in parts:
                done = {}
                for offset, calls in layer.items():
                    blocks = []
                    for idx, a_rows, *args in calls:
                        a_rows.projector = self._projectors[idx]
                        blocks.append(self._projectors[idx].rows(a_rows, *args))
                    done[offset] = blocks
                out.append(done)
            return out

        grads = [self._assemble(spec, parts, step.rows) for spec, parts in zip(self.specs, run(step.parts))]
        curvature = None
        if step.curvature_parts is not None:
            curvature = [self._assemble(spec, parts, step.rows)
                         for spec, parts in zip(self.specs, run(step.curvature_parts))]
        return grads, curvature

    def abort(self) -> None:
        """Stop collecting and drop everything gathered."""
        self._active = False
        self._reset()

    def collect(self, n_rows: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor] | None] | "DeferredStep":
        """Stop collecting; return per-layer gradients [n_rows, dim] and curvature rows [n_rows, passes * dim].

        The curvature list is None under ``gradient_outer`` (the gradients are the curvature rows).
        A deferred step (``begin(fit=...)``) returns a :class:`DeferredStep` instead.
        """
        self._active = False
        rows = self._offset + (self._mb_rows or 0)
        if rows == 0:
            raise RuntimeError("no gradients were captured: run forward and backward through the model inside the step")
        if n_rows is not None and rows != n_rows:
            raise ValueError(f"the forward passes of this step covered {rows} samples but {n_rows} ids were given")
        if self._defer:
            for spec, parts in zip(self.specs, self._parts):
                if not parts:
                    self._assemble(spec, parts, rows)  # raises: the layer received no gradient
            step = DeferredStep(rows, self._parts, None if self.curvature == "gradient_outer" else self._curvature_parts,
                                all(self._finite))
            self._reset()
            return step
        grads = [self._assemble(spec, parts, rows) for spec, parts in zip(self.specs, self._parts)]
        curvature = None
        if self.curvature != "gradient_outer":
            curvature = [self._assemble(spec, parts, rows) for spec, parts in zip(self.specs, self._curvature_parts)]
        self._reset()
        return grads, curvature

    # -- internals -------------------------------------------------------------------
    def _reset(self) -> None:
        # per layer, row offset -> blocks (or their futures) to sum: gradients, and curvature rows (all passes
        # side by side)
        self._parts: list[dict[int, list]] = [{} for _ in self.specs]
        self._curvature_parts: list[dict[int, list]] = [{} for _ in self.specs]
        self._pending: list[tuple[int, torch.Tensor, int, torch.Tensor]] = []  # (layer, a, offset, output)
        self._jobs: list[tuple[torch.Tensor, list] | None] = []  # (logits, pending) awaiting the loss gradient
        self._defer = False
        self._finite: list[bool] = []  # deferred steps: whether each factor seen was finite
        self._curving = False
        self._scale = 1.0
        self._offset = 0
        self._mb_rows: int | None = None
        self._in_backward = False

    @staticmethod
    def _assemble(spec: LayerSpec, queued: dict[int, list], rows: int) -> torch.Tensor:
        """Rows of all micro-batches in order; micro-batches that missed this layer are zero."""
        parts = {offset: _total(blocks) for offset, blocks in queued.items()}
        if not parts:
            raise RuntimeError(
                f"layer {spec.name!r} received no gradient in this step; track only layers used in the "
                "forward pass (modules=...), and keep its output connected to the loss")
        first = next(iter(parts.values()))
        if len(parts) == 1 and 0 in parts and first.shape[0] == rows:  # one micro-batch: no copy
            return first
        full = first.new_zeros(rows, first.shape[1])
        for offset, block in parts.items():
            full[offset: offset + block.shape[0]] = block
        return full

    def _forward_hook(self, idx: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not (self._active and torch.is_grad_enabled() and isinstance(output, torch.Tensor)
                    and output.requires_grad):
                return
            if torch._C._current_graph_task_id() != -1:  # forward recomputed inside backward
                return
            a = inputs[0].detach()
            self._start_rows(a.shape[0], self.specs[idx].name)
            offset = self._offset
            projector = self._projectors[idx]
            overlap = self._worker is not None and projector.flops(a, output) >= OVERLAP_MIN_FLOPS
            a_rows = _InputRows(projector, module, a, overlap)  # shared by the gradient and the curvature
            output.register_hook(lambda ds: None if self._curving else self._on_grad(idx, a_rows, offset, ds))
            if self.curvature != "gradient_outer":
                self._pending.append((idx, a_rows, offset, output))

        return hook

    def _start_rows(self, batch: int, name: str) -> None:
        """Place this forward call's rows: a forward after a backward starts a micro-batch."""
        if self._in_backward:
            self._offset += self._mb_rows or 0
            self._mb_rows = None
            self._in_backward = False
        if self._mb_rows is None:
            self._mb_rows = batch
        elif batch != self._mb_rows:
            raise ValueError(
                f"layer {name!r} saw a batch of {batch} rows but this micro-batch has {self._mb_rows}; "
                "tracked layers must take inputs whose first dimension is the sample")

    def _curvature_hook(self, module: nn.Module, inputs: tuple, output: object) -> None:
        """After a recorded forward, wait for the loss's gradient at the logits to run the curvature passes."""
        pending, self._pending = self._pending, []
        if not (self._active and torch.is_grad_enabled()) or torch._C._current_graph_task_id() != -1:
            return
        logits = logits_of(output)
        if not (logits.requires_grad and pending):
            return
        job = len(self._jobs)
        self._jobs.append((logits, pending))
        logits.register_hook(lambda grad: self._on_logits_grad(job, grad))

    def _on_logits_grad(self, job: int, loss_grad: torch.Tensor) -> None:
        """When the backward pass reaches the logits: backpropagate all curvature pseudo-losses at once to the
        tracked outputs (a nested backward; the layer-output hooks it fires ignore it)."""
        if self._curving or not self._active or job >= len(self._jobs) or self._jobs[job] is None:
            return
        logits, pending = self._jobs[job]
        self._jobs[job] = None
        # the gradients' scale 1/w is 1/sqrt(w) on curvature rows (H = sum_i w_i c c^T): applied to the vectors
        vectors = logit_gradients(logits, loss_grad, self.curvature, self.curvature_samples,
                                  self._generator(logits.device), self._scale ** 0.5)
        self._curving = True
        try:
            grads = _output_gradients(logits, [out for _, _, _, out in pending], vectors)
        finally:
            self._curving = False
        for module in self._sharded:  # FSDP2's hooks resharded them in the nested backward: the training one
            module.unshard()  # needs them again
        for (idx, a_rows, offset, _), ds in zip(pending, grads):
            if ds is not None:  # else this call's output does not reach the logits
                self._add(self._curvature_parts[idx], offset, idx, a_rows, ds)

    def _generator(self, device: torch.device) -> torch.Generator:
        """The seeded label sampler of a device (curvature='fisher' is reproducible)."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[device]

    def _on_grad(self, idx: int, a_rows: _InputRows, offset: int, ds: torch.Tensor) -> None:
        self._in_backward = True
        if not self._active:
            return
        ds = ds.detach()
        if self._defer:
            self._finite.append(bool(torch.isfinite(ds).all()) and bool(torch.isfinite(a_rows.a).all()))
        # the step's loss is sum_i w_i loss_i; scaling by 1/w gives the sample's own gradient
        self._add(self._parts[idx], offset, idx, a_rows, ds.unsqueeze(0), self._scale)

    def _add(self, parts: dict[int, list], offset: int, idx: int, a_rows: _InputRows, *args: object) -> None:
        """Queue the block of rows ``projector.rows(a_rows, *args)`` of layer ``idx`` at ``offset``: a Future on the
        worker thread (when the forward call was large enough), computed now, or (deferred) the call itself.

        A module used several times in a micro-batch adds several blocks; they are summed in :meth:`collect`.
        """
        if self._defer:
            block = (idx, a_rows, *args)
        else:
            fn = self._projectors[idx].rows
            block = self._worker.submit(fn, a_rows, *args) if a_rows.overlap else fn(a_rows, *args)
        parts.setdefault(offset, []).append(block)


@dataclass
class DeferredStep:
    """A step whose rows wait for fitted bases: per layer, row offset -> (layer, input rows, ds, ...) calls."""

    rows: int
    parts: list[dict[int, list]]
    curvature_parts: list[dict[int, list]] | None
    finite: bool

    def gradient_factors(self) -> Iterator[tuple[int, nn.Module, torch.Tensor, torch.Tensor]]:
        """(layer, module, raw input, output gradient [b, ...]) of every forward call's gradient."""
        for layer in self.parts:
            for calls in layer.values():
                for idx, a_rows, ds, *_ in calls:
                    yield idx, a_rows.module, a_rows.a, ds[0]

    def nbytes(self) -> int:
        """Bytes of the distinct tensors held (a layer's gradient and curvature blocks share its inputs)."""
        sizes = {}
        for layer in [*self.parts, *(self.curvature_parts or [])]:
            for calls in layer.values():
                for _, a_rows, *rest in calls:
                    for t in (a_rows.a, *rest):
                        if isinstance(t, torch.Tensor):
                            sizes[id(t)] = t.numel() * t.element_size()
        return sum(sizes.values())


def _output_gradients(logits: torch.Tensor, outputs: list[torch.Tensor],
                      vectors: torch.Tensor) -> Sequence[torch.Tensor | None]:
    """Gradients [passes, *output.shape] of vectors . logits wrt each output (None: it does not reach the logits),
    in one vectorised backward over the passes (:func:`_vmap`).

    Falls back to one backward per pass where an operation in the model has no batching rule.
    """
    unused: list[bool] = []

    def pullback(v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grads = torch.autograd.grad(logits, outputs, v, retain_graph=True, allow_unused=True)
        unused[:] = [g is None for g in grads]
        return tuple(v.new_zeros(()) if g is None else g for g in grads)  # vmap returns tensors only

    try:
        with warnings.catch_warnings():  # an operation without a batching rule is looped over the passes: correct,
            warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)  # and not the user's concern
            grads = _vmap(pullback, vectors)
    except RuntimeError:
        grads = [torch.stack(g) for g in zip(*(pullback(v) for v in vectors))]
    return [None if skip else g for g, skip in zip(grads, unused)]


def _vmap(fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], vectors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``fn`` over the first dimension of ``vectors``, vectorised: ``torch.func.vmap(fn)(vectors)``.

    Built from vmap's own primitives where torch has them: its argument and output handling (pytrees, checks)
    costs more than the backward of a small model (0.3 ms of a 2.4 ms step on 784-128-10, 2026-12-07).
    """
    if _add_batch_dim is None:
        return torch.func.vmap(fn)(vectors)
    n = vectors.shape[0]
    _load_decompositions()  # batching rules written as decompositions, as torch.func.vmap loads them
    level = _vmap_increment_nesting(n, "error")
    try:
        return tuple(_remove_batch_dim(g, level, n, 0) for g in fn(_add_batch_dim(vectors, 0, level)))
    finally:
        _vmap_decrement_nesting()


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The model's FSDP2 (``fully_shard``) modules: the curvature's nested backward from the logits runs
    before FSDP's own pre-backward hooks gather their parameters, so it gathers them (all ranks together)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    kind = getattr(fsdp, "FSDPModule", None)
    return [] if kind is None else [m for m in model.modules() if isinstance(m, kind)]


def _total(blocks: list) -> torch.Tensor:
    """Sum of row blocks, waiting for those still being projected."""
    total = None
    for block in blocks:
        block = block.result() if isinstance(block, Future) else block
        total = block if total is None else total + block
    return total
