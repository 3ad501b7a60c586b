"""First-order TSLOO by a backward adjoint pass, with a chosen curvature, blocking and projection.

For one test target the linearised run gives every record's first-order TSLOO in one sweep back
in time: with the test gradient as the adjoint of theta_T, each step turns the adjoints of
(theta, optimizer buffers) after it into those before it (``dvemb.update``), and a record's
estimate is -w_ti gamma_t . g_ti, gamma_t the adjoint of the step's batch gradient. With the exact
Hessian, no blocking and no projection this is the exact first-order TSLOO (the ceiling of
every first-order method). The other options reproduce the approximations of data value
embeddings one at a time, which is what an ablation needs:

* ``curvature``: ``"hessian"`` (exact Hessian-vector products), ``"ggn"`` (the Gauss-Newton
  matrix; for softmax cross-entropy equal to the true Fisher), ``"fisher"`` (its one-sample estimate:
  sum_i w_i g_i(y~) g_i(y~)^T with labels y~ drawn from the model, seeded per step), ``"gradient_outer"``
  (the paper's sum_i w_i g_i g_i^T), ``"none"`` (H = 0: only the optimizer's own dynamics);
* ``blocking``: ``"global"``, ``"layer"`` (the curvature restricted to its per-layer diagonal blocks),
  or a number of consecutive layers per block;
* ``projection_dim``: None, or the Recorder's seeded per-layer Kronecker projections, in whose
  space the adjoint then lives (curvature P H P^T, test gradient P v, record gradients P g);
* ``second_moment``: for Adam, ``"full"`` (the record also moves v) or ``"frozen"``.

Projected Adam needs a preconditioner in the projected space: ``"layer"`` (one number per layer
and step, from the mean square of the projected batch gradient), or ``"whitened"``
(:class:`~dvemb.update.adam.WhitenedAdam`: rows whitened by a rank-1 factor per layer of
D_t^(-1/2) before projection; ``"whitened-lagged"`` takes D from the moments before the step,
``"whitened-elementwise"`` whitens elementwise, a reference the Kronecker trick cannot compute).
With ``second_moment="full"``, ``projected_second_moment`` chooses what whitened coordinates do with v:
``"factored"`` (the Recorder's model: per step the rank-1 fit of sqrt(|r_t d_t|) of each projected
layer, from the replayed moments, through Kronecker operators, ``embed/factored.py``) or ``"frozen"``;
composed (sketched) projections, a hierarchical plan's coarse coordinates, take ``"frozen"`` only.

Data value embeddings compute the same numbers as the adjoint with the same options, for every
test point at once (tests/evaluate/test_adjoint.py checks this), so this is also their reference.
"""

from __future__ import annotations

import dataclasses
from functools import partial
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.func import functional_call, vjp

from ..progress import ProgressBar
from ..update import Adam, StepCoefficients, UpdateRule
from ..capture.whitening import leading_pair
from ..embed.factored import KroneckerBlock, second_moment_operators
from ..update.adam import WhitenedAdam
from ..update.adam import EXP_AVG, EXP_AVG_SQ
from .functions import (ComposedProjection, Projection, RunFunctions, Target, flatten, layer_projections,
                        unflatten, with_steps)
from .replay import Params, Record, Trajectory, record_weight

AdjointCurvature = Literal["hessian", "ggn", "fisher", "gradient_outer", "none"]
CURVATURES = ("hessian", "ggn", "fisher", "gradient_outer", "none")


@dataclass(frozen=True)
class AdjointOptions:
    """Which approximations the adjoint makes (defaults: none, the exact first-order TSLOO)."""

    curvature: AdjointCurvature = "hessian"
    blocking: Literal["global", "layer"] | int = "global"
    projection_dim: int | None = None
    projection_seed: int = 0
    second_moment: Literal["full", "frozen"] = "full"
    preconditioner: Literal["layer", "whitened", "whitened-lagged", "whitened-elementwise"] = "whitened"
    whitening_clip: float | None = None  # with "whitened": R within [median / clip, median * clip] per layer
    projected_second_moment: Literal["factored", "frozen"] = "factored"  # whitened coordinates and v (docstring)
    ggn_rank: int | None = None  # curvature="ggn": the Recorder's rank-k output factors (softmax cross-entropy)
    truncate: int | None = None  # curvature="ggn": each step's curvature (per block) cut to its top-r eigenvectors

    def __post_init__(self) -> None:
        if self.curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {self.curvature!r}")
        if self.blocking not in ("global", "layer") and not (isinstance(self.blocking, int) and self.blocking > 0):
            raise ValueError(f"blocking must be 'global', 'layer' or layers per block, got {self.blocking!r}")


class Coordinates:
    """The adjoint's space: every trainable parameter, or the tracked layers' Kronecker projections."""

    def __init__(self, run: RunFunctions, projections: Sequence[Projection] | None) -> None:
        self.run, self.projections = run, projections
        like = run.trajectory.final_params
        if projections is None:
            sizes = [p.numel() for p in like.values()]
            groups = [n.rsplit(".", 1)[0] for n in like]  # parameters of one module form a layer
            bounds = np.cumsum([0] + sizes)
            starts = [k for k in range(len(groups)) if k == 0 or groups[k] != groups[k - 1]] + [len(groups)]
            self.layers = [slice(int(bounds[a]), int(bounds[b])) for a, b in zip(starts, starts[1:])]
        else:
            bounds = np.cumsum([0] + [p.dim for p in projections])
            self.layers = [slice(int(a), int(b)) for a, b in zip(bounds, bounds[1:])]
        self.dim = self.layers[-1].stop

    def project(self, grads: Params) -> torch.Tensor:
        """Rows [n, N] of parameter-shaped tensors with a leading row dimension."""
        if self.projections is None:
            return flatten(grads, 1)
        return torch.cat([p.project(grads) for p in self.projections], dim=1)

    def lift(self, rows: torch.Tensor) -> torch.Tensor:
        """The adjoint of :meth:`project`: flat parameter rows [n, P]."""
        if self.projections is None:
            return rows
        like = self.run.trajectory.final_params
        full = {n: torch.zeros(rows.shape[0], *p.shape, dtype=rows.dtype, device=rows.device) for n, p in like.items()}
        for projection, part in zip(self.projections, self.layers):
            for name, value in projection.lift(rows[:, part], like).items():
                full[name] += value
        return flatten(full, 1)

    def project_flat(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows [n, N] of flat parameter rows [n, P]."""
        if self.projections is None:
            return rows
        like = self.run.trajectory.final_params
        return self.project({n: torch.stack([unflatten(r, like)[n] for r in rows]) for n in like})


def adjoint_estimate(trajectory: Trajectory, records: Sequence[Record], target: Target,
                     options: AdjointOptions = AdjointOptions(), *, projections: Sequence[Projection] | None = None,
                     show_progress: bool = False) -> np.ndarray:
    """First-order TSLOO of each record on each test target, ``[n_target, n_records]``, under ``options``.

    ``projections`` (one per tracked layer, each with ``dim``, ``project`` and ``lift`` like
    :class:`~dvemb.evaluate.functions.LayerProjection`) replace the Recorder's seeded ones: to study
    other projections. Cost: one curvature product per step (per layer with ``blocking="layer"``) and
    test target, and the per-sample gradients of the records at their own steps. Steps the
    trajectory did not keep are recovered by training the run again. Meant for small models.
    """
    spec = trajectory.spec
    normalised = [(int(t), int(i)) for t, i in records]
    trajectory = with_steps(trajectory, range(spec.num_steps))
    run = RunFunctions(trajectory)
    if projections is None and options.projection_dim is not None:
        projections = layer_projections(run.model, options.projection_dim, options.projection_seed, spec.dtype)
    coords = Coordinates(run, projections)
    rule, coefficients = _rule(spec.update, options), None
    whitening = None
    if isinstance(rule, Adam) and projections is not None and options.preconditioner != "layer":
        whitening = _Whitening(run, coords, rule, options)
        rule, coefficients = whitening.rule, whitening
    coefficients = coefficients or _Coefficients(run, coords, rule)
    scale = whitening.scale if whitening else (lambda t, grads: grads)
    first = min((t for t, _ in normalised), default=spec.num_steps)
    by_step: dict[int, list[int]] = {}
    for k, (t, _) in enumerate(normalised):
        by_step.setdefault(t, []).append(k)
    adjoints = [coords.project(scale(spec.num_steps - 1, run.target_gradients(trajectory.final_params, target)))]
    adjoints += [torch.zeros_like(adjoints[0]) for _ in rule.buffers]
    scores = np.zeros((adjoints[0].shape[0], len(normalised)))
    weights = np.array([record_weight(spec, r) for r in normalised], dtype=np.float64)
    for t in ProgressBar(range(spec.num_steps - 1, first - 1, -1), desc="adjoint", unit="step",
                         disable=not show_progress):
        params = trajectory.params_at(t)
        c = coefficients.at(t, params)
        gamma = rule.mix(adjoints, c)
        dense = gamma.dense()
        if t in by_step:  # score = -w gamma . g
            index = by_step[t]
            ids = [normalised[k][1] for k in index]
            scores[:, index] = run.dots(-dense, params, ids, lambda g: coords.project(scale(t, g))) * weights[index]
        rule.settle(adjoints, gamma, c)
        if t > first:
            adjoints[0] += _curvature_products(run, coords, options, t, params, dense, lambda g: scale(t, g))
            rule.finish(adjoints, c)
    return scores


def _rule(rule: UpdateRule, options: AdjointOptions) -> UpdateRule:
    if isinstance(rule, Adam):
        return dataclasses.replace(rule, second_moment=options.second_moment)
    return rule


def _curvature_products(run: RunFunctions, coords: Coordinates, options: AdjointOptions, t: int, params: Params,
                        rows: torch.Tensor, scale) -> torch.Tensor:
    """``rows H_t`` in the adjoint's space (H_t symmetric; ``scale``d on both sides: R H R), restricted to layer
    blocks with ``blocking="layer"``."""
    if options.curvature == "none":
        return torch.zeros_like(rows)
    blocks = _blocks(coords.layers, options.blocking)
    if options.truncate is not None:
        grads, w = run.gauss_newton_rows(t, params, options.ggn_rank)
        c = coords.project(scale(grads)) * w.sqrt()[:, None]
        out = torch.zeros_like(rows)
        for part in blocks:
            _, sv, vt = torch.linalg.svd(c[:, part], full_matrices=False)
            top = sv[: options.truncate, None] * vt[: options.truncate]
            out[:, part] = (rows[:, part] @ top.T) @ top
        return out
    if options.curvature in ("gradient_outer", "fisher"):
        labels = _sampled_labels(run, t, params) if options.curvature == "fisher" else None
        grads = coords.project(scale(run.sample_gradients(params, run.spec.batch(t), labels)))
        w = run.spec.weights(t)
        out = torch.zeros_like(rows)
        for part in blocks:
            out[:, part] = (rows[:, part] @ grads[:, part].T) * w @ grads[:, part]
        return out
    product = run.hessian_vector_products if options.curvature == "hessian" else partial(
        run.gauss_newton_vector_products, rank=options.ggn_rank)
    out = torch.zeros_like(rows)
    for part in blocks:
        masked = torch.zeros_like(rows)
        masked[:, part] = rows[:, part]
        lifted = flatten(scale(_rows_params(coords.lift(masked), params)), 1)
        out[:, part] = coords.project(scale(_rows_params(product(t, params, lifted), params)))[:, part]
    return out


def _blocks(layers: list[slice], blocking: str | int) -> list[slice]:
    """Coordinate ranges of the blocks: each layer, all of them, or runs of ``blocking`` consecutive layers."""
    size = {"layer": 1, "global": len(layers)}.get(blocking, blocking)  # type: ignore[arg-type]
    return [slice(layers[k].start, layers[min(k + size, len(layers)) - 1].stop) for k in range(0, len(layers), size)]


def _rows_params(rows: torch.Tensor, like: Params) -> Params:
    """Flat parameter rows [n, P] as parameter-shaped tensors [n, *shape]."""
    sizes = [p.numel() for p in like.values()]
    return {n: part.reshape(-1, *p.shape) for (n, p), part in zip(like.items(), torch.split(rows, sizes, dim=1))}


def _sampled_labels(run: RunFunctions, t: int, params: Params) -> torch.Tensor:
    """One label per sample of step t's batch drawn from the model's softmax at theta_t (generator seeded by t)."""
    x, _ = run.spec.step_data(t)
    with torch.no_grad():
        probs = torch.softmax(functional_call(run.model, (params, run.trajectory.fixed), (x,)), dim=-1)
    return torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(t))[:, 0]


class _Coefficients:
    """Each step's linearisation coefficients, at the trajectory (Adam: from the moments the run kept)."""

    def __init__(self, run: RunFunctions, coords: Coordinates, rule: UpdateRule) -> None:
        self.run, self.coords, self.rule = run, coords, rule
        self._layer_scale: dict[int, torch.Tensor] = {}
        if isinstance(rule, Adam) and coords.projections is not None:
            self._layer_scale = self._projected_adam(rule)

    def at(self, t: int, params: Params) -> StepCoefficients:
        """The coefficients of step t at theta_t = ``params``."""
        spec, rule = self.run.spec, self.rule
        if not isinstance(rule, Adam):
            return rule.coefficients(spec.lr(t), t)
        if self._layer_scale:
            return StepCoefficients(spec.lr(t), t, {"precondition": self._layer_scale[t]})
        buffers = self.run.trajectory.buffers.get(t, {})
        names = self.run.names
        state = {kind: torch.cat([buffers[f"{kind}:{n}"].reshape(-1) for n in names]) for kind in (EXP_AVG, EXP_AVG_SQ)
                 if buffers}
        return rule.coefficients(spec.lr(t), t, state, flatten(self.run.step_gradient(t, params), 0),
                                 flatten(params, 0))

    def _projected_adam(self, rule: Adam) -> dict[int, torch.Tensor]:
        """P_t per step with one second moment per layer: the EMA of ||P G_t||^2 / (layer's parameters)."""
        if rule.second_moment != "frozen" or not rule.decoupled and rule.weight_decay:
            raise ValueError("projected Adam in the adjoint supports frozen second moments and AdamW only")
        run, coords = self.run, self.coords
        sizes = torch.tensor([sum(run.trajectory.final_params[n].numel() for n in (p.weight, p.bias) if n)
                              for p in coords.projections], dtype=run.spec.dtype)
        v, out = torch.zeros_like(sizes), {}
        for t in range(run.spec.num_steps):
            g = coords.project({n: x.unsqueeze(0) for n, x in run.step_gradient(t, run.trajectory.params_at(t)).items()})[0]
            square = torch.stack([g[part] @ g[part] for part in coords.layers]) / sizes
            v = rule.beta2 * v + (1 - rule.beta2) * square
            s = rule.step_size(run.spec.lr(t), t)
            scale = s / ((v / (1 - rule.beta2 ** (t + 1))).sqrt() + rule.eps)
            out[t] = torch.cat([scale[k].expand(part.stop - part.start) for k, part in enumerate(coords.layers)])
        return out


class _Whitening:
    """Projected Adam in whitened coordinates: per step R_t (rank-1 per tracked layer, or elementwise), rho_t, s_t.
    Exact layers (identity projections) keep R = 1 and Adam's own P_t, Q_t, d_t, as the Recorder's stores do."""

    def __init__(self, run: RunFunctions, coords: Coordinates, rule: Adam, options: AdjointOptions) -> None:
        if not rule.decoupled and rule.weight_decay:
            raise ValueError("whitened projected Adam supports AdamW and Adam without weight decay")
        mode, clip = options.preconditioner, options.whitening_clip
        self.run, self.coords, self.spec = run, coords, run.spec
        like = run.trajectory.final_params
        exact = {n for p in coords.projections if getattr(p, "exact", False) for n in (p.weight, p.bias) if n}
        self.exact = coords.project_flat(flatten({n: torch.full_like(x, float(n in exact)) for n, x in like.items()},
                                                 0)[None])[0] > 0.5
        projected = [(p, columns) for p, columns in zip(coords.projections, coords.layers)
                     if not getattr(p, "exact", False)]
        factored = rule.second_moment == "full" and options.projected_second_moment == "factored" and bool(projected)
        if factored and mode == "whitened-elementwise":
            raise ValueError("the factored second moment needs factored whitening: use projected_second_moment="
                             "'frozen' with preconditioner='whitened-elementwise'")
        if factored and any(isinstance(p, ComposedProjection) for p, _ in projected):
            raise ValueError("sketched coordinates hold v fixed, as a hierarchical plan's coarse parts do: use "
                             "projected_second_moment='frozen' with composed projections")
        self.blocks = [(p, KroneckerBlock(columns, p.p_out, p.p_in)) for p, columns in projected] if factored else []
        self.rule = WhitenedAdam(rule.beta1, rule.beta2, rule.eps, rule.weight_decay,
                                 rule.second_moment if bool(self.exact.any()) or factored else "frozen", factored)
        logs, self.elementwise, self.second, state = [], [], [], {}
        for t in range(self.spec.num_steps):
            params = run.trajectory.params_at(t)
            c = rule.coefficients(self.spec.lr(t), t, state, flatten(run.step_gradient(t, params), 0),
                                  flatten(params, 0))
            v, bias = (c.diagonals[EXP_AVG_SQ], t) if mode != "whitened-lagged" or t == 0 else (state[EXP_AVG_SQ], t - 1)
            state = {EXP_AVG: c.diagonals[EXP_AVG], EXP_AVG_SQ: c.diagonals[EXP_AVG_SQ]}
            log_r = unflatten(-0.5 * torch.log((v / (1 - rule.beta2 ** (bias + 1))).sqrt() + rule.eps), like)
            log_r = {n: torch.zeros_like(x) if n in exact else x for n, x in log_r.items()}
            if clip is not None:
                log_r = unflatten(self._clipped(log_r, clip), like)
            logs.append(log_r if mode == "whitened-elementwise" else self._factored(log_r))
            if factored:
                rho = rule.coupling(c.diagonals[EXP_AVG], c.diagonals[EXP_AVG_SQ], t) * c.diagonals["gradient"]
                self.second.append(self._second_factors(logs[-1], unflatten(rho, like)))
            if self.exact.any():  # Adam's own coefficients, read on the exact layers' coordinates
                self.elementwise.append({k: coords.project_flat(c.diagonals[k][None])[0]
                                         for k in ("precondition", "second", "gradient")})
        self.factors = [{n: x.exp() for n, x in log.items()} for log in logs]
        means = [torch.stack([self._layer_mean(log, p) for p in coords.projections]) for log in logs]
        self.ratios = [torch.ones(coords.dim, dtype=self.spec.dtype)] + [
            self._per_coordinate((means[t - 1] - means[t]).exp()) for t in range(1, self.spec.num_steps)]

    def _clipped(self, log_r: Params, clip: float) -> torch.Tensor:
        """log R of each tracked layer clipped to its median +- log(clip)."""
        out = dict(log_r)
        for p in self.coords.projections:
            names = [n for n in (p.weight, p.bias) if n]
            median = torch.cat([log_r[n].reshape(-1) for n in names]).median()
            for n in names:
                out[n] = log_r[n].clamp(median - math.log(clip), median + math.log(clip))
        return flatten(out, 0)

    def _factored(self, log_r: Params) -> Params:
        """log R with each tracked layer's [W | b] replaced by its best row + column fit (rank 1 after exp)."""
        out = dict(log_r)
        for p in self.coords.projections:
            matrix = _layer_matrix(p, log_r)
            fit = matrix.mean(1, keepdim=True) + matrix.mean(0, keepdim=True) - matrix.mean()
            _, back = vjp(p.as_matrix, log_r[p.weight])
            out[p.weight] = back(fit[:, : fit.shape[1] - (p.bias is not None)].contiguous())[0]
            if p.bias is not None:
                out[p.bias] = fit[:, -1]
        return out

    def _second_factors(self, log_r: Params, rho: Params) -> list:
        """Per projected layer: its block, (r, c) of its factored log R, the leading pair (x, y) of sqrt(|rho|), and
        the sign of sum(rho) (rho = r_t d_t elementwise: Adam's coupling through v, capture/whitening.py)."""
        out = []
        for p, block in self.blocks:
            log, coupling = _layer_matrix(p, log_r), _layer_matrix(p, rho)  # log: r_i + c_j, with c of mean zero
            x, y = leading_pair(coupling.abs().sqrt())
            out.append((block, [log.mean(1), log.mean(0) - log.mean(), x, y], float(torch.sign(coupling.sum()))))
        return out

    @staticmethod
    def _layer_mean(log_r: Params, p) -> torch.Tensor:
        values = torch.cat([log_r[n].reshape(-1) for n in (p.weight, p.bias) if n])
        return values.mean()

    def _per_coordinate(self, per_layer: torch.Tensor) -> torch.Tensor:
        return torch.cat([per_layer[k].expand(part.stop - part.start) for k, part in enumerate(self.coords.layers)])

    def scale(self, t: int, grads: Params) -> Params:
        """R_t times parameter-shaped tensors with a leading row dimension."""
        return {n: g * self.factors[t][n] for n, g in grads.items()}

    def at(self, t: int, params: Params) -> StepCoefficients:
        """s_t and rho_t of step t (exact layers' coordinates: Adam's P_t, Q_t and d_t, and rho 1)."""
        s = self.rule.adam.step_size(self.spec.lr(t), t)
        diagonals = {"precondition": torch.full((self.coords.dim,), s, dtype=self.spec.dtype), "ratio": self.ratios[t]}
        if self.rule.second_moment == "full":
            diagonals.update(second=torch.zeros(self.coords.dim, dtype=self.spec.dtype), gradient=torch.zeros(
                self.coords.dim, dtype=self.spec.dtype))
        if self.elementwise:  # the exact layers' coordinates take Adam's own coefficients
            for name in diagonals.keys() - {"ratio"}:
                diagonals[name][self.exact] = self.elementwise[t][name][self.exact]
        return StepCoefficients(self.spec.lr(t), t, diagonals,
                                second_moment_operators(self.second[t], s) if self.second else {})


def _layer_matrix(p, values: Params) -> torch.Tensor:
    """A layer's parameter-shaped values as its [d_out, d_in (+1)] matrix (the rows' layout)."""
    matrix = p.as_matrix(values[p.weight])
    return torch.cat([matrix, values[p.bias][:, None]], 1) if p.bias is not None else matrix
