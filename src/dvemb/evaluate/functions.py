"""A replayable run's model as pure functions of its parameters, for the evaluation estimators.

Per-sample and batch gradients, Hessian- and Gauss-Newton-vector products of a step's weighted
batch loss, and the Recorder's per-layer Kronecker projections of parameter-space vectors,
all through :mod:`torch.func` over the full parameter vector: tools for small models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from ..capture.curvature import _ggn_factors, logit_gradients, logits_of
from ..capture.layers import rule_for
from ..capture.selection import layer_spec, match_specs, select_modules
from ..store import LayerSpec
from .replay import Params, Trajectory, train

Target = Callable[[nn.Module], torch.Tensor]
"""``target(model) -> scalar or [n_target]`` test losses."""

GRADIENT_CHUNK = 128
"""Per-sample gradients computed at once."""


class RunFunctions:
    """The run's model as pure functions of its trainable parameters (via :mod:`torch.func`)."""

    def __init__(self, trajectory: Trajectory) -> None:
        self.trajectory = trajectory
        self.spec = trajectory.spec
        self.model = trajectory.model()
        self.names = list(trajectory.final_params)
        self._sample_gradient = vmap(grad(self._sample_loss), in_dims=(None, 0, 0))
        self.batch_gradient = grad(self._batch_loss)

    def _forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, (params, self.trajectory.fixed), (x,))

    def _sample_loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.spec.loss(self._forward(params, x[None]), y[None])[0]

    def _batch_loss(self, params: Params, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (w * self.spec.loss(self._forward(params, x), y)).sum()

    def sample_gradients(self, params: Params, ids: Sequence[int], targets: torch.Tensor | None = None) -> Params:
        """Per-sample gradients ``g_i(params)`` of the samples ``ids``: ``[len(ids), *shape]`` each (at other
        ``targets`` when given)."""
        index = torch.as_tensor(list(ids), device=self.spec.inputs.device)
        x, y = (cast(self.spec, tensor[index]) for tensor in (self.spec.inputs, self.spec.targets))
        return self._sample_gradient(params, x, y if targets is None else targets)

    def dots(self, vectors: torch.Tensor, params: Params, ids: Sequence[int],
             project: Callable[[Params], torch.Tensor] | None = None) -> np.ndarray:
        """``vectors [n, N] . project(g_i(params))`` for each sample id: ``[n, len(ids)]`` (default: flattened)."""
        project = project or (lambda g: flatten(g, 1))
        blocks = [vectors @ project(self.sample_gradients(params, ids[k : k + GRADIENT_CHUNK])).T
                  for k in range(0, len(ids), GRADIENT_CHUNK)]
        return numpy(torch.cat(blocks, dim=1)) if blocks else np.zeros((vectors.shape[0], 0))

    def step_gradient(self, step: int, params: Params) -> Params:
        """The gradient of step's weighted batch loss at ``params``."""
        return self.batch_gradient(params, *self.spec.step_data(step), self.spec.weights(step))

    def target_gradients(self, params: Params, target: Target) -> Params:
        """Gradient of each test target at ``params``: ``[n_target, *shape]`` per parameter."""
        model = self.trajectory.model(params)
        slots = dict(model.named_parameters())
        leaves = [slots[name] for name in self.names]
        with torch.enable_grad():
            values = torch.as_tensor(target(model)).reshape(-1)
            rows = [torch.autograd.grad(v, leaves, retain_graph=True, allow_unused=True, materialize_grads=True)
                    for v in values]
        return {name: torch.stack([row[k] for row in rows]).detach() for k, name in enumerate(self.names)}

    def hessian_vector_products(self, step: int, params: Params, vectors: torch.Tensor) -> torch.Tensor:
        """``H_t(params) v`` for each row of ``vectors [n, P]``, H_t the Hessian of step's batch loss.

        Double backward: one differentiable gradient, then one backward pass per row.
        """
        x, y = self.spec.step_data(step)
        leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
        with torch.enable_grad():
            gradient = torch.autograd.grad(self._batch_loss(leaves, x, y, self.spec.weights(step)),
                                           list(leaves.values()), create_graph=True)
            rows = [torch.autograd.grad(gradient, list(leaves.values()), unflatten(v, params).values(),
                                        retain_graph=True, allow_unused=True, materialize_grads=True)
                    for v in vectors]
        return torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows]).detach()

    def gauss_newton_vector_products(self, step: int, params: Params, vectors: torch.Tensor,
                                     rank: int | None = None) -> torch.Tensor:
        """``G_t(params) v`` for each row of ``vectors [n, P]``: G_t = sum_i w_i J_i^T Lambda_i J_i, the Gauss-Newton
        matrix of step's batch loss (J_i: the model output's Jacobian, Lambda_i: the loss's Hessian in the output).
        ``rank=k``: Lambda_i of softmax cross-entropy replaced by rank-k factors: for one prediction per sample its
        best rank-k part; for sequences the Recorder's own k passes (:func:`~dvemb.capture.curvature.logit_gradients`:
        each token's rank-k part, summed over a sample's tokens with random signs, seeded by ``step``)."""
        x, y = self.spec.step_data(step)
        w = self.spec.weights(step)
        outputs, pullback = vjp(lambda p: logits_of(self._forward(p, x)), params)

        def output_gradient(out: torch.Tensor) -> torch.Tensor:
            return grad(lambda o: (w * self.spec.loss(o, y)).sum())(out)

        passes = None if rank is None else self._output_factors(step, outputs.detach(), output_gradient, rank)
        rows = []
        for v in vectors:
            _, jv = jvp(lambda p: logits_of(self._forward(p, x)), (params,), (unflatten(v, params),))
            if passes is None:
                _, curved = jvp(output_gradient, (outputs,), (jv,))  # Lambda J v, weighted
            else:  # sum_k u_k <u_k, J v> per sample, the passes' vectors u_k weighted
                coefficients = (passes * jv).flatten(2).sum(-1)  # [k, B]
                curved = (passes * coefficients.reshape(*coefficients.shape, *[1] * (jv.dim() - 1))).sum(0)
            rows.append(flatten(pullback(curved)[0], 0))
        return torch.stack(rows).detach()

    def _output_factors(self, step: int, outputs: torch.Tensor, output_gradient: Callable, rank: int) -> torch.Tensor:
        """The rank-``rank`` factors [k, *outputs.shape] of the loss's Hessian in the logits, times sqrt(weight)."""
        if outputs.dim() > 2:
            generator = torch.Generator(outputs.device).manual_seed(step)
            return logit_gradients(outputs, output_gradient(outputs), "ggn", rank, generator)
        w = self.spec.weights(step)
        return _ggn_factors(torch.softmax(outputs, -1), rank) * w.sqrt()[:, None]  # [k, B, C]

    def gauss_newton_rows(self, step: int, params: Params, rank: int | None) -> tuple[Params, torch.Tensor]:
        """Rows c_is (parameter-shaped, [B * passes, *shape]) with G_t = sum_i w_i sum_s c_is c_is^T for softmax
        cross-entropy (``rank``: the Recorder's rank-k factors; None: exact), and each row's weight w_i."""
        x, _ = self.spec.step_data(step)
        w = self.spec.weights(step)
        probs = torch.softmax(self._forward(params, x).detach(), -1)
        factors = _ggn_factors(probs, rank).transpose(0, 1)  # [B, passes, C]

        def pseudo(p: Params, xi: torch.Tensor, ui: torch.Tensor) -> torch.Tensor:
            return (ui * self._forward(p, xi[None])[0]).sum()

        per = vmap(vmap(grad(pseudo), in_dims=(None, None, 0)), in_dims=(None, 0, 0))(params, x, factors)
        return {n: g.reshape(-1, *g.shape[2:]) for n, g in per.items()}, w.repeat_interleave(factors.shape[1])

    def gradient_outer_products(self, step: int, params: Params, vectors: torch.Tensor,
                                project: Callable[[Params], torch.Tensor] | None = None) -> torch.Tensor:
        """``sum_i w_i g_i (g_i . v)`` for each row of ``vectors [n, N]``, g_i the step's per-sample gradients
        (``project``ed into the vectors' space): the paper's curvature."""
        project = project or (lambda g: flatten(g, 1))
        rows = project(self.sample_gradients(params, self.spec.batch(step)))
        return (vectors @ rows.T) * self.spec.weights(step) @ rows


class Projection(Protocol):
    """A linear map of one layer's parameter gradients to ``dim`` coordinates, with its adjoint."""

    weight: str
    bias: str | None

    @property
    def dim(self) -> int: ...

    def project(self, grads: Params) -> torch.Tensor: ...

    def lift(self, rows: torch.Tensor, like: Params) -> Params: ...


@dataclass(frozen=True)
class LayerProjection:
    """One tracked layer's Kronecker projection ``P_out [W | b] P_in^T`` of parameter gradients."""

    weight: str
    bias: str | None
    as_matrix: Callable[[torch.Tensor], torch.Tensor]
    p_in: torch.Tensor
    p_out: torch.Tensor

    @property
    def dim(self) -> int:
        """Projected size k_out * k_in."""
        return self.p_in.shape[0] * self.p_out.shape[0]

    @property
    def exact(self) -> bool:
        """Whether both sides are identities (the layer's rows are its exact gradients)."""
        return all(p.shape[0] == p.shape[1] and torch.equal(p, torch.eye(p.shape[0], dtype=p.dtype, device=p.device))
                   for p in (self.p_in, self.p_out))

    def project(self, grads: Params) -> torch.Tensor:
        """Projected rows ``[n, k_out * k_in]`` from parameter gradients with a leading row dimension."""
        matrix = vmap(self.as_matrix)(grads[self.weight])
        if self.bias is not None:
            matrix = torch.cat([matrix, grads[self.bias].unsqueeze(-1)], dim=-1)
        return (self.p_out @ matrix @ self.p_in.T).flatten(1)

    def lift(self, rows: torch.Tensor, like: Params) -> Params:
        """The adjoint of :meth:`project`: parameter-shaped tensors ``[n, *shape]`` from rows ``[n, k_out * k_in]``."""
        matrix = self.p_out.T @ rows.reshape(-1, self.p_out.shape[0], self.p_in.shape[0]) @ self.p_in
        weight_matrix = matrix[..., : matrix.shape[-1] - (self.bias is not None)]
        shape = like[self.weight].shape
        _, back = vjp(self.as_matrix, torch.zeros(shape, dtype=rows.dtype, device=rows.device))
        out = {self.weight: vmap(lambda m: back(m)[0])(weight_matrix.contiguous())}
        if self.bias is not None:
            out[self.bias] = matrix[..., -1]
        return out


@dataclass(frozen=True)
class ComposedProjection:
    """``matrix`` applied after another projection: a coarser space computable from stored projected rows."""

    inner: Projection
    matrix: torch.Tensor  # [dim, inner.dim]

    @property
    def weight(self) -> str:
        return self.inner.weight

    @property
    def bias(self) -> str | None:
        return self.inner.bias

    @property
    def as_matrix(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The inner projection's weight layout."""
        return self.inner.as_matrix

    @property
    def dim(self) -> int:
        """Rows of ``matrix``."""
        return self.matrix.shape[0]

    def project(self, grads: Params) -> torch.Tensor:
        """``matrix`` times the inner projection's rows."""
        return self.inner.project(grads) @ self.matrix.T

    def lift(self, rows: torch.Tensor, like: Params) -> Params:
        """The adjoint: the inner lift of ``rows @ matrix``."""
        return self.inner.lift(rows @ self.matrix, like)


def layer_projections(model: nn.Module, projection_dim: int | None, seed: int, dtype: torch.dtype,
                      kind: str = "gaussian") -> list[LayerProjection]:
    """The Recorder's projections of every tracked layer, keyed by parameter names."""
    specs = [layer_spec(name, module, projection_dim, seed, kind)  # type: ignore[arg-type]
             for name, module in select_modules(model)]
    return spec_projections(model, specs, dtype)


def spec_projections(model: nn.Module, specs: Sequence[LayerSpec], dtype: torch.dtype) -> list[LayerProjection]:
    """The projections of the layers ``specs`` describe (a store's, say, with its fitted bases), keyed by
    ``model``'s parameter names."""
    names = {id(p): n for n, p in model.named_parameters()}
    device = next(model.parameters()).device
    layers = []
    for spec, module in zip(specs, match_specs(model, specs)):
        rule = rule_for(module)
        assert rule is not None
        layers.append(LayerProjection(
            names[id(module.weight)], names[id(module.bias)] if spec.bias else None, rule.as_matrix,
            spec.proj_in.matrix(dtype, device), spec.proj_out.matrix(dtype, device)))
    return layers


def with_steps(trajectory: Trajectory, steps: Iterable[int]) -> Trajectory:
    """``trajectory``, or the same run trained again when it lacks theta at any of ``steps``."""
    spec = trajectory.spec
    wanted = {int(t) for t in steps if int(t) != spec.num_steps}
    if wanted <= set(trajectory.checkpoints):
        return trajectory
    return train(spec, keep_steps=wanted | set(trajectory.checkpoints))


def cast(spec, tensor: torch.Tensor) -> torch.Tensor:
    """Floating tensors in the run's dtype; integer labels unchanged."""
    return tensor.to(spec.dtype) if tensor.is_floating_point() else tensor


def flatten(tensors: Params, start: int) -> torch.Tensor:
    """Concatenates tensors along their flattened dimensions from ``start`` on (parameter order)."""
    return torch.cat([t.flatten(start) for t in tensors.values()], dim=-1)


def unflatten(vector: torch.Tensor, like: Params) -> Params:
    """Splits a flat ``[P]`` vector into tensors shaped like ``like``."""
    sizes = [p.numel() for p in like.values()]
    return {name: part.view_as(p) for (name, p), part in zip(like.items(), torch.split(vector, sizes))}


def numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as a float64 numpy array on the CPU."""
    return tensor.detach().to(device="cpu", dtype=torch.float64).numpy()
