"""Projected per-sample gradients from layer inputs and output gradients (the ghost trick).

For a tracked layer whose input and output gradient give token rows a (b x n_tok x d_in)
and ds (b x n_tok x d_out) (see layers.py), sample j's projected weight-and-bias gradient is
    sum_tok (P_out ds_jt) (P_in [a_jt, 1])^T,
a k_out x k_in matrix, so the cost is O(n_tok (d_in k_in + d_out k_out + k_in k_out))
and the full gradient is never formed. A forward hook keeps a and registers a hook
on the layer's output tensor, which fires with ds during backward.

Micro-batches (gradient accumulation) are told apart by the phase: the first forward
after a backward starts a new micro-batch whose rows follow the previous ones.

When the process may use more CPUs than torch's threads do, the projections run on one
worker thread: the hooks only queue them, so they overlap the rest of the backward pass
(torch kernels release the GIL), and ``collect`` waits for them, so a step still ends with
all its rows.

With a curvature other than ``gradient_outer``, a hook on the model's output runs, right
after each forward, one vectorised backward (``is_grads_batched``) of all curvature passes
from the logits to the tracked layers' outputs only (no parameter gradients), and projects
each pass's output gradient against the layer's input like a gradient.
"""

from __future__ import annotations

import functools
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..cpus import spare_cpu
from .curvature import Curvature, logit_gradients, logits_of
from .layers import RULES, LayerRule, grouped_rows
from .selection import LayerSpec

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class _Projector:
    """A layer's projection factors (prepared once per dtype/device and output scale) and the two halves of
    its projected gradient: input rows and, from output gradients, the rows themselves."""

    spec: LayerSpec
    _cache: dict = field(default_factory=dict)
    _rule: LayerRule = field(init=False)

    def __post_init__(self) -> None:
        self._rule = next(rule for rule in RULES if rule.kind == self.spec.kind)

    def in_factors(self, dtype: torch.dtype, device: torch.device) -> tuple:
        """(P_in^T restricted to the weight columns, P_in's bias column); (None, None) = exact input side."""
        key = ("in", dtype, device)
        if key not in self._cache:
            in_t = in_bias = None
            if not self.spec.proj_in.is_identity:
                m = self.spec.proj_in.matrix(dtype, device)
                in_t = m[:, : self.spec.d_in].t().contiguous()
                in_bias = m[:, self.spec.d_in].contiguous() if self.spec.bias else None
            self._cache[key] = (in_t, in_bias)
        return self._cache[key]

    def out_factor(self, dtype: torch.dtype, device: torch.device, scale: float) -> torch.Tensor | None:
        """scale * P_out^T; None = exact output side."""
        key = ("out", dtype, device, scale)
        if key not in self._cache:
            p_out = self.spec.proj_out
            self._cache[key] = None if p_out.is_identity else (p_out.matrix(dtype, device).t() * scale).contiguous()
        return self._cache[key]

    def inputs(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """The layer input's token rows, projected: [b, tokens, k_in]."""
        dtype = a.dtype if a.is_floating_point() else module.weight.dtype
        dtype = torch.float32 if dtype in _LOW_PRECISION else dtype
        return self._rule.inputs(module, a, *self.in_factors(dtype, a.device), self.spec.bias, dtype)

    def rows(self, inputs: "_InputRows", ds: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Rows [b, passes * k_out * k_in] of ``scale`` times output gradients ds [passes, b, ...] with input rows."""
        a_rows = inputs.get()
        out_t = self.out_factor(a_rows.dtype, ds.device, scale)  # holds the scale when projected
        ds = ds.to(a_rows.dtype) if out_t is not None or scale == 1.0 else ds.to(a_rows.dtype) * scale
        groups = self._rule.groups(inputs.module)
        if groups > 1:
            return grouped_rows(ds, a_rows, out_t, groups)
        ds = self._rule.outputs(ds)  # [passes, b, tokens, d_out]
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

    __slots__ = ("projector", "module", "a", "value")

    def __init__(self, projector: _Projector, module: nn.Module, a: torch.Tensor) -> None:
        self.projector, self.module, self.a, self.value = projector, module, a, None

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
                 curvature: Curvature = "gradient_outer", curvature_samples: int | None = None, reduction: str = "mean",
                 seed: int = 0, overlap: bool | None = None) -> None:
        self.model = model
        self.modules = list(modules)
        self.specs = list(specs)
        self.curvature = curvature
        self.curvature_samples = curvature_samples
        self.reduction = reduction
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._projectors = [_projector(s) for s in self.specs]
        self._handles: list[RemovableHandle] = []
        self._active = False
        # with a CPU to spare the projections run on a worker thread, overlapping the rest of the backward
        self.overlap = overlap if overlap is not None else spare_cpu()
        self._worker: ThreadPoolExecutor | None = None
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

    def begin(self, scale: float = 1.0) -> None:
        """Start collecting a fresh set of rows; gradients are multiplied by ``scale`` (e.g. 1/w)."""
        self._reset()
        self._scale = scale
        self._active = True

    def abort(self) -> None:
        """Stop collecting and drop everything gathered."""
        self._active = False
        self._reset()

    def collect(self, n_rows: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Stop collecting; return per-layer gradients [n_rows, dim] and curvature rows [n_rows, passes * dim].

        The curvature list is None under ``gradient_outer`` (the gradients are the curvature rows).
        """
        self._active = False
        rows = self._offset + (self._mb_rows or 0)
        if rows == 0:
            raise RuntimeError("no gradients were captured: run forward and backward through the model inside the step")
        if n_rows is not None and rows != n_rows:
            raise ValueError(f"the forward passes of this step covered {rows} samples but {n_rows} ids were given")
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
            a_rows = _InputRows(self._projectors[idx], module, a)  # shared by the gradient and the curvature
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
        """After a recorded forward, backpropagate all curvature pseudo-losses at once to the tracked outputs."""
        pending, self._pending = self._pending, []
        if not (self._active and torch.is_grad_enabled()) or torch._C._current_graph_task_id() != -1:
            return
        logits = logits_of(output)
        if not (logits.requires_grad and pending):
            return
        vectors = logit_gradients(logits, self.curvature, self.curvature_samples, self.reduction,
                                  self._generator(logits.device))
        self._curving = True  # the layer-output hooks fire during this backward: they must ignore it
        try:
            grads = _output_gradients(logits, [out for _, _, _, out in pending], vectors)
        finally:
            self._curving = False
        for (idx, a_rows, offset, _), ds in zip(pending, grads):
            if ds is not None:  # else this call's output does not reach the logits
                self._add(self._curvature_parts[idx], offset, self._projectors[idx].rows, a_rows, ds)

    def _generator(self, device: torch.device) -> torch.Generator:
        """The seeded label sampler of a device (curvature='fisher' is reproducible)."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[device]

    def _on_grad(self, idx: int, a_rows: _InputRows, offset: int, ds: torch.Tensor) -> None:
        self._in_backward = True
        if not self._active:
            return
        # the step's loss is sum_i w_i loss_i; scaling by 1/w gives the sample's own gradient
        self._add(self._parts[idx], offset, self._projectors[idx].rows, a_rows, ds.detach().unsqueeze(0),
                  self._scale)

    def _add(self, parts: dict[int, list], offset: int, fn, *args: object) -> None:
        """Queue the block of rows ``fn(*args)`` at ``offset``: a Future on the worker thread, or computed now.

        A module used several times in a micro-batch adds several blocks; they are summed in :meth:`collect`.
        """
        parts.setdefault(offset, []).append(fn(*args) if self._worker is None else self._worker.submit(fn, *args))


def _output_gradients(logits: torch.Tensor, outputs: list[torch.Tensor],
                      vectors: torch.Tensor) -> Sequence[torch.Tensor | None]:
    """Gradients [passes, *output.shape] of vectors . logits wrt each output, in one vectorised backward.

    Falls back to one backward per pass where an operation in the model has no batching rule.
    """
    try:
        return torch.autograd.grad(logits, outputs, vectors, retain_graph=True, allow_unused=True,
                                   is_grads_batched=True)
    except RuntimeError:
        per_pass = [torch.autograd.grad(logits, outputs, v, retain_graph=True, allow_unused=True) for v in vectors]
        return [None if g[0] is None else torch.stack(g) for g in zip(*per_pass)]


def _total(blocks: list) -> torch.Tensor:
    """Sum of row blocks, waiting for those still being projected."""
    total = None
    for block in blocks:
        block = block.result() if isinstance(block, Future) else block
        total = block if total is None else total + block
    return total
