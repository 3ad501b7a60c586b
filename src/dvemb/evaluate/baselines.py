"""Baseline estimators of trajectory-specific leave-one-out (TSLOO), computed on a replayable run.

Every estimator has the signature ``estimator(trajectory, records, target) -> [n_target, n_records]``:
``trajectory`` is a base run of a :class:`~dvemb.evaluate.TrainingSpec` (from
:func:`~dvemb.evaluate.train`), ``records`` are ``(step, sample_id)`` pairs and ``target(model)``
returns a scalar or 1-D tensor of test losses, exactly as for :func:`~dvemb.evaluate.tsloo`.
Estimates are float64 and follow the DVEmb sign convention: positive means the record helped,
i.e. the estimate approximates ``target(theta'_T) - target(theta_T)`` when the record is removed.

Notation: ``eta_t`` is the record's learning rate, ``w_ti`` its weight in the batch loss (1/B for
``reduction="mean"``) and ``g_i(theta)`` the gradient of the sample's own loss at ``theta``.

* :func:`grad_dot`: ``eta_t w_ti grad target(theta_T) . g_i(theta_T)``.
* :func:`tracin_cp`: ``sum_c eta_t w_ti grad target(theta_c) . g_i(theta_c)`` over checkpoints
  ``c`` (epoch ends by default). It ignores when the record was used, so every record of a sample
  gets the same score.
* :func:`influence_function`: the influence function at the final model, LoGra-style in a
  Kronecker-projected gradient space with a damped empirical-Fisher Hessian per layer.
* :func:`exact_first_order`: the exact first-order TSLOO ("test-aware exact"), a backward adjoint
  pass with exact Hessian-vector products through the run. It is the ceiling of every first-order
  method, DVEmb included; it needs one Hessian-vector product per step and test target.

Per-sample gradients come from :func:`torch.func.vmap` over the full parameter vector, so these
are evaluation tools for small models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..capture.layers import rule_for
from ..capture.selection import layer_spec, select_modules
from ..progress import ProgressBar
from .replay import Params, Record, Trajectory, TrainingSpec, train

Target = Callable[[nn.Module], torch.Tensor]
"""``target(model)``: a scalar or 1-D tensor of test losses, as for :func:`~dvemb.evaluate.tsloo`."""

Estimator = Callable[[Trajectory, Sequence[Record], Target], np.ndarray]
"""``estimator(trajectory, records, target) -> [n_target, n_records]`` estimated TSLOO."""

GRADIENT_CHUNK = 128
"""Samples whose full per-sample gradients are held at once."""


def epoch_ends(spec: TrainingSpec) -> list[int]:
    """Steps that end an epoch: each pass over every sample the run uses; T is always the last."""
    everyone = {i for t in range(spec.num_steps) for i in spec.batch(t)}
    ends: list[int] = []
    seen: set[int] = set()
    for t in range(spec.num_steps):
        seen.update(spec.batch(t))
        if seen == everyone:
            ends.append(t + 1)
            seen = set()
    if not ends or ends[-1] != spec.num_steps:
        ends.append(spec.num_steps)
    return ends


def record_weight(spec: TrainingSpec, record: Record) -> float:
    """``w_ti`` of a record: the summed weight of every use of the sample in its step's batch."""
    t, i = int(record[0]), int(record[1])
    if not 0 <= t < spec.num_steps:
        raise ValueError(f"record {(t, i)}: step outside [0, {spec.num_steps})")
    hits = [p for p, j in enumerate(spec.batch(t)) if j == i]
    if not hits:
        raise ValueError(f"record {(t, i)}: sample {i} is not in the batch of step {t}")
    return float(spec.weights(t)[hits].sum())


def grad_dot(trajectory: Trajectory, records: Sequence[Record], target: Target) -> np.ndarray:
    """Gradient dot product at the final model: ``eta_t w_ti grad target(theta_T) . g_i(theta_T)``."""
    return tracin_cp(trajectory, records, target, checkpoints=[trajectory.spec.num_steps])


def tracin_cp(
    trajectory: Trajectory,
    records: Sequence[Record],
    target: Target,
    checkpoints: Sequence[int] | None = None,
) -> np.ndarray:
    """TracIn-CP: ``sum_c eta_t w_ti grad target(theta_c) . g_i(theta_c)`` over checkpoint steps.

    ``checkpoints`` are steps ``c`` whose parameters theta_c (before step c; ``T`` is the final
    model) serve as checkpoints; the default is the end of every epoch (:func:`epoch_ends`).
    Steps the trajectory did not keep are recovered by training the run again.
    """
    spec = trajectory.spec
    steps = epoch_ends(spec) if checkpoints is None else [int(c) for c in checkpoints]
    if not steps or not all(0 <= c <= spec.num_steps for c in steps):
        raise ValueError(f"checkpoints must be a non-empty list of steps in [0, {spec.num_steps}], got {steps}")
    trajectory = _with_steps(trajectory, steps)
    run = _RunFunctions(trajectory)
    ids, inverse = np.unique(np.array([int(i) for _, i in records], dtype=np.int64), return_inverse=True)
    total = 0.0
    for c in steps:
        params = trajectory.params_at(c)
        total = total + run.dots(_flatten(run.target_gradients(params, target), 1), params, ids.tolist())
    return total[:, inverse] * _coefficients(spec, records)


def influence_function(
    trajectory: Trajectory,
    records: Sequence[Record],
    target: Target,
    *,
    projection_dim: int | None = 1024,
    damping: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """Influence function at the final model, LoGra-style in a Kronecker-projected space.

    Each tracked layer's per-sample gradient ``[W | b]`` is projected to ``P_out G P_in^T`` with
    the same seeded projections a :class:`~dvemb.Recorder` with ``projection_dim`` and ``seed``
    uses (``None``: unprojected). Per layer ``l`` the Hessian is the empirical Fisher over the N
    samples the run uses, ``F_l = (1/N) sum_s g_sl g_sl^T``, damped by ``damping`` times its
    mean eigenvalue; layers are independent (block-diagonal Hessian).

    Scaling: the run fits the objective ``R = sum_r c_r loss_r / C`` with ``c_r = eta_t w_ti``
    over every record ``r`` and ``C = sum_r c_r``. Removing one record is the perturbation
    ``epsilon = -c_r / C`` of its weight, so the standard influence function gives
    ``score = (c_r / C) sum_l grad target_l^T (F_l + lambda_l I)^-1 g_il``, positive when the
    record helped. With a constant learning rate and E epochs this is ``1 / (N E)`` per record.
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    spec = trajectory.spec
    scale = _coefficients(spec, records) / _total_weight(spec)
    run = _RunFunctions(trajectory)
    params = trajectory.final_params
    layers = _layer_projections(run.model, projection_dim, seed, spec.dtype)
    samples = sorted({i for t in range(spec.num_steps) for i in spec.batch(t)})
    blocks: list[list[torch.Tensor]] = [[] for _ in layers]
    for k in range(0, len(samples), GRADIENT_CHUNK):
        chunk = run.sample_gradients(params, samples[k : k + GRADIENT_CHUNK])
        for layer, block in zip(layers, blocks):
            block.append(layer.project(chunk))
    tests = run.target_gradients(params, target)
    rows = torch.as_tensor(np.searchsorted(samples, [int(i) for _, i in records]))
    scores = 0.0
    for layer, block in zip(layers, blocks):
        train_rows = torch.cat(block)
        solved = damped_fisher_solve(train_rows, layer.project(tests), damping)
        scores = scores + (train_rows[rows] @ solved).T
    return _numpy(scores) * scale


def damped_fisher_solve(train_rows: torch.Tensor, tests: torch.Tensor, damping: float) -> torch.Tensor:
    """(F + lambda I)^-1 tests^T with F = mean of train_rows' outer products, lambda = damping x mean eigenvalue.

    ``train_rows`` is [N, p] (one layer's per-sample gradients), ``tests`` [n_test, p]; returns [p, n_test].
    """
    fisher = train_rows.T @ train_rows / train_rows.shape[0]
    shift = damping * torch.trace(fisher) / fisher.shape[0]
    eye = torch.eye(fisher.shape[0], dtype=fisher.dtype, device=fisher.device)
    return torch.linalg.solve(fisher + shift * eye, tests.T)


def exact_first_order(
    trajectory: Trajectory,
    records: Sequence[Record],
    target: Target,
    *,
    show_progress: bool = False,
) -> np.ndarray:
    """Exact first-order TSLOO ("test-aware exact") by a backward adjoint pass through the run.

    With ``v_T = grad target(theta_T)`` and, for ``t = T-1`` down to the earliest record's step,
    ``score(t, i) = eta_t w_ti v_{t+1} . g_ti(theta_t)`` and
    ``v_t = v_{t+1} - eta_t H_t(theta_t) v_{t+1}``, where ``H_t`` is the exact Hessian of the
    step's weighted batch loss. This is the derivative of TSLOO in the record's weight: no
    curvature approximation, no projection. With momentum or weight decay (``spec.sgd``) the
    adjoint is a pair (for theta and for the momentum buffer), carried back as in
    ``embed/recursion.py`` with exact Hessian-vector products in place of sum_i w g g^T.

    Cost: one Hessian-vector product per step per test target (a few gradient costs each), plus
    the per-sample gradients of the records at their own steps. Memory: theta_t for every step
    from the earliest record on; steps the trajectory did not keep are recovered by training
    the run again. Meant for small models.
    """
    spec = trajectory.spec
    normalised = [(int(t), int(i)) for t, i in records]
    first = min((t for t, _ in normalised), default=spec.num_steps)
    trajectory = _with_steps(trajectory, range(first, spec.num_steps))
    run = _RunFunctions(trajectory)
    by_step: dict[int, list[int]] = {}
    for k, (t, _) in enumerate(normalised):
        by_step.setdefault(t, []).append(k)
    adjoint = _flatten(run.target_gradients(trajectory.final_params, target), 1)
    scores = np.zeros((adjoint.shape[0], len(normalised)))
    steps = range(spec.num_steps - 1, first - 1, -1)
    sgd, buffer = spec.sgd, torch.zeros_like(adjoint)  # buffer: the adjoint of the momentum buffer
    weights = np.array([record_weight(spec, r) for r in normalised], dtype=np.float64)
    for t in ProgressBar(steps, desc="exact adjoint", unit="step", disable=not show_progress):
        params, lr = trajectory.params_at(t), spec.lr(t)
        a, b = sgd.mix(adjoint, buffer, lr, t)  # buffer now holds W; plain SGD: Phi = -eta v
        phi = a * buffer + b * adjoint
        if t in by_step:  # score = -w Phi . g
            index = by_step[t]
            scores[:, index] = run.dots(-phi, params, [normalised[k][1] for k in index]) * weights[index]
        if t > first:  # v <- v + (H + lambda I) Phi,  b <- mu W
            sgd.decay(adjoint, buffer, (a, b), lr)
            adjoint = adjoint + run.hessian_vector_products(t, params, phi)
        buffer.mul_(sgd.momentum)
    return scores


def standard_baselines(*, projection_dim: int | None = 1024, seed: int = 0) -> dict[str, Estimator]:
    """The baselines of the fidelity study by name; ``projection_dim`` and ``seed`` configure the IF."""
    return {
        "tracin-cp": tracin_cp,
        "grad-dot": grad_dot,
        "influence-function": partial(influence_function, projection_dim=projection_dim, seed=seed),
        "exact-first-order": exact_first_order,
    }


class _RunFunctions:
    """The run's model as pure functions of its trainable parameters (via :mod:`torch.func`)."""

    def __init__(self, trajectory: Trajectory) -> None:
        self.trajectory = trajectory
        self.spec = trajectory.spec
        self.model = trajectory.model()
        self.names = list(trajectory.final_params)
        self._sample_gradient = vmap(grad(self._sample_loss), in_dims=(None, 0, 0))
        self._batch_gradient = grad(self._batch_loss)

    def _forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, (params, self.trajectory.fixed), (x,))

    def _sample_loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.spec.loss(self._forward(params, x[None]), y[None])[0]

    def _batch_loss(self, params: Params, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (w * self.spec.loss(self._forward(params, x), y)).sum()

    def sample_gradients(self, params: Params, ids: Sequence[int]) -> Params:
        """Per-sample gradients ``g_i(params)`` of the samples ``ids``: ``[len(ids), *shape]`` each."""
        index = torch.as_tensor(list(ids), device=self.spec.inputs.device)
        x, y = (_cast(self.spec, tensor[index]) for tensor in (self.spec.inputs, self.spec.targets))
        return self._sample_gradient(params, x, y)

    def dots(self, vectors: torch.Tensor, params: Params, ids: Sequence[int]) -> np.ndarray:
        """``vectors [n, P] . g_i(params)`` for each sample id: ``[n, len(ids)]``."""
        blocks = [vectors @ _flatten(self.sample_gradients(params, ids[k : k + GRADIENT_CHUNK]), 1).T
                  for k in range(0, len(ids), GRADIENT_CHUNK)]
        return _numpy(torch.cat(blocks, dim=1)) if blocks else np.zeros((vectors.shape[0], 0))

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
            rows = [torch.autograd.grad(gradient, list(leaves.values()), _unflatten(v, params).values(),
                                        retain_graph=True, allow_unused=True, materialize_grads=True)
                    for v in vectors]
        return torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows]).detach()


@dataclass(frozen=True)
class _LayerProjection:
    """One tracked layer's Kronecker projection ``P_out [W | b] P_in^T`` of parameter gradients."""

    weight: str
    bias: str | None
    as_matrix: Callable[[torch.Tensor], torch.Tensor]
    p_in: torch.Tensor
    p_out: torch.Tensor

    def project(self, grads: Params) -> torch.Tensor:
        """Projected rows ``[n, k_out * k_in]`` from parameter gradients with a leading row dimension."""
        matrix = vmap(self.as_matrix)(grads[self.weight])
        if self.bias is not None:
            matrix = torch.cat([matrix, grads[self.bias].unsqueeze(-1)], dim=-1)
        return (self.p_out @ matrix @ self.p_in.T).flatten(1)


def _layer_projections(
    model: nn.Module, projection_dim: int | None, seed: int, dtype: torch.dtype
) -> list[_LayerProjection]:
    """The Recorder's projections of every tracked layer, keyed by parameter names."""
    names = {id(p): n for n, p in model.named_parameters()}
    device = next(model.parameters()).device
    layers = []
    for name, module in select_modules(model):
        spec = layer_spec(name, module, projection_dim, seed, "gaussian")
        rule = rule_for(module)
        assert rule is not None
        layers.append(_LayerProjection(
            names[id(module.weight)], names[id(module.bias)] if spec.bias else None, rule.as_matrix,
            spec.proj_in.matrix(dtype, device), spec.proj_out.matrix(dtype, device)))
    return layers


def _with_steps(trajectory: Trajectory, steps: Iterable[int]) -> Trajectory:
    """``trajectory``, or the same run trained again when it lacks theta at any of ``steps``."""
    spec = trajectory.spec
    wanted = {int(t) for t in steps if int(t) != spec.num_steps}
    if wanted <= set(trajectory.checkpoints):
        return trajectory
    return train(spec, keep_steps=wanted | set(trajectory.checkpoints))


def _coefficients(spec: TrainingSpec, records: Sequence[Record]) -> np.ndarray:
    """``eta_t w_ti`` of every record."""
    return np.array([spec.lr(int(t)) * record_weight(spec, (t, i)) for t, i in records], dtype=np.float64)


def _total_weight(spec: TrainingSpec) -> float:
    """``sum_t eta_t sum_i w_ti``: the summed coefficients of every record of the run."""
    return float(sum(spec.lr(t) * float(spec.weights(t).sum()) for t in range(spec.num_steps)))


def _cast(spec: TrainingSpec, tensor: torch.Tensor) -> torch.Tensor:
    """Floating tensors in the run's dtype; integer labels unchanged."""
    return tensor.to(spec.dtype) if tensor.is_floating_point() else tensor


def _flatten(tensors: Params, start: int) -> torch.Tensor:
    """Concatenates tensors along their flattened dimensions from ``start`` on (parameter order)."""
    return torch.cat([t.flatten(start) for t in tensors.values()], dim=-1)


def _unflatten(vector: torch.Tensor, like: Params) -> Params:
    """Splits a flat ``[P]`` vector into tensors shaped like ``like``."""
    sizes = [p.numel() for p in like.values()]
    return {name: part.view_as(p) for (name, p), part in zip(like.items(), torch.split(vector, sizes))}


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as a float64 numpy array on the CPU."""
    return tensor.detach().to(device="cpu", dtype=torch.float64).numpy()

