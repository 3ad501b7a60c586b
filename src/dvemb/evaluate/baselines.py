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

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch

from .adjoint import adjoint_estimate
from .functions import GRADIENT_CHUNK, RunFunctions, Target, flatten, layer_projections, numpy, with_steps
from .replay import Record, Trajectory, TrainingSpec, record_weight

Estimator = Callable[[Trajectory, Sequence[Record], Target], np.ndarray]
"""``estimator(trajectory, records, target) -> [n_target, n_records]`` estimated TSLOO."""


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
    trajectory = with_steps(trajectory, steps)
    run = RunFunctions(trajectory)
    ids, inverse = np.unique(np.array([int(i) for _, i in records], dtype=np.int64), return_inverse=True)
    total = 0.0
    for c in steps:
        params = trajectory.params_at(c)
        total = total + run.dots(flatten(run.target_gradients(params, target), 1), params, ids.tolist())
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
    run = RunFunctions(trajectory)
    params = trajectory.final_params
    layers = layer_projections(run.model, projection_dim, seed, spec.dtype)
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
    return numpy(scores) * scale


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
    curvature approximation, no projection. With an optimizer that keeps buffers (``spec.update``:
    momentum, Adam's moments) the adjoint also carries theirs, as :mod:`dvemb.update` linearises it:
    :func:`~dvemb.evaluate.adjoint.adjoint_estimate` with its default (exact) options.

    Cost: one Hessian-vector product per step per test target (a few gradient costs each), plus
    the per-sample gradients of the records at their own steps. Memory: theta_t for every step
    from the earliest record on; steps the trajectory did not keep are recovered by training
    the run again. Meant for small models.
    """
    return adjoint_estimate(trajectory, records, target, show_progress=show_progress)


def standard_baselines(*, projection_dim: int | None = 1024, seed: int = 0) -> dict[str, Estimator]:
    """The baselines of the fidelity study by name; ``projection_dim`` and ``seed`` configure the IF."""
    return {
        "tracin-cp": tracin_cp,
        "grad-dot": grad_dot,
        "influence-function": partial(influence_function, projection_dim=projection_dim, seed=seed),
        "exact-first-order": exact_first_order,
    }


def _coefficients(spec: TrainingSpec, records: Sequence[Record]) -> np.ndarray:
    """``eta_t w_ti`` of every record."""
    return np.array([spec.lr(int(t)) * record_weight(spec, (t, i)) for t, i in records], dtype=np.float64)


def _total_weight(spec: TrainingSpec) -> float:
    """``sum_t eta_t sum_i w_ti``: the summed coefficients of every record of the run."""
    return float(sum(spec.lr(t) * float(spec.weights(t).sum()) for t in range(spec.num_steps)))
