"""Each step's linearisation coefficients, rebuilt from a store.

SGD needs only the lr. Whitened rows (projected Adam, see capture/whitening.py) follow
:class:`~dvemb.update.adam.WhitenedAdam`, whose coefficients come from the lr and the stored
whitening of each layer and step; the exact layers of such a store keep Adam's own coefficients.
Adam's P_t, Q_t and d_t depend on its moments, which are replayed from step 0 over the stored
per-sample gradients (from the optimizer's state before step 0 where the store keeps one): the batch
gradient of step t is sum_i w_ti g_ti, what the optimizer applied. Exact layers (no projection) get the
moments elementwise. A
projected layer gets one second moment per layer, the mean square of its batch gradient,
||P_out G P_in^T||^2 / size (the projections keep squared norms in expectation), and its v path
is dropped (frozen second moment): an approximation of Adam's per-parameter scaling that keeps
its per-layer and per-step scale.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Sequence

import numpy as np
import torch

from ..store import Store, to_torch, whitening_level
from ..update import Adam, StepCoefficients, UpdateRule
from ..update.adam import WhitenedAdam
from .factored import FactoredSecondMoment, has_operators
from .plan import Part, Plan, SecondMoment

CoefficientsAt = Callable[[int], StepCoefficients]


def linearised_rule(store: Store, second_moment: SecondMoment = "followed") -> UpdateRule:
    """The rule the recursion follows: the store's, or Adam in whitened coordinates for whitened rows (with v's
    path where exact layers follow Adam elementwise and the store's rule follows it); ``second_moment="frozen"``
    drops v's path from an Adam rule."""
    rule, config = store.config.update, store.config
    if second_moment == "frozen" and isinstance(rule, Adam):
        rule = replace(rule, second_moment="frozen")
    if config.whitening and isinstance(rule, Adam):
        elementwise = any(config.elementwise(i) for i in range(len(store.layers)))
        followed = rule.second_moment if elementwise or config.second_factors else "frozen"
        return WhitenedAdam(rule.beta1, rule.beta2, rule.eps, rule.weight_decay, followed,
                            config.second_factors and followed == "full", rule.initial_step)
    return rule


def block_rule(store: Store, plan: Plan, block: Sequence[int]) -> UpdateRule:
    """The rule one block of ``plan`` (indices of its parts) follows: the store's linearised rule, less v's path
    where it is zero on every coordinate of the block (whitened Adam with no layer followed elementwise and no
    whole projected layer with second factors: sketched parts hold v fixed, embed/factored.py). The block then
    keeps two propagator matrices instead of three."""
    rule = linearised_rule(store, plan.second_moment)
    if not isinstance(rule, WhitenedAdam) or rule.second_moment != "full":
        return rule
    parts = [plan.parts[i] for i in block]
    if any(store.config.elementwise(p.layer) or (rule.factored and has_operators(store, p)) for p in parts):
        return rule
    return replace(rule, second_moment="frozen", factored=False)


def step_coefficients(store: Store, rule: UpdateRule, parts: Sequence[Part], start: int, stop: int,
                      dtype: torch.dtype, device: torch.device | None = None) -> CoefficientsAt:
    """Coefficients of steps [start, stop) for one block: its parts' coordinates concatenated in order, their
    per-coordinate scalings on ``device`` (None: the CPU)."""
    records, starts = store.records, store.step_starts
    lrs = np.asarray(records["lr"])
    step_lr = [float(lrs[starts[t]]) if starts[t + 1] > starts[t] else 0.0 for t in range(stop)]
    if isinstance(rule, WhitenedAdam):
        return _whitened(store, rule, parts, start, stop, step_lr, dtype, device)
    if not isinstance(rule, Adam):
        return lambda t: rule.coefficients(step_lr[t], t)
    layers = sorted({p.layer for p in parts})
    tables = dict(zip(layers, (_adam_table(store, rule, [i], start, stop, step_lr, dtype) for i in layers)))
    table = {k: torch.cat([tables[p.layer][k] for p in parts], 1).to(device) for k in tables[layers[0]]}  # unsketched
    return lambda t: StepCoefficients(step_lr[t], t, {k: v[t - start] for k, v in table.items()})


def _adam_table(store: Store, rule: Adam, block: Sequence[int], start: int, stop: int, step_lr: list[float],
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Per step in [start, stop): P_t, and for exact layers Q_t and d_t ([steps, dim] each)."""
    specs = [store.layers[i] for i in block]
    grads = [store.grads(i) for i in block]
    weights = np.ascontiguousarray(store.records["weight"], dtype=np.float64)
    starts = store.step_starts
    exact = [s.proj_in.is_identity and s.proj_out.is_identity for s in specs]
    state = [store.initial_moments(i) or {} for i in block]  # exact layers: the optimizer's state before step 0
    dim = sum(s.dim for s in specs)
    full = rule.second_moment == "full"
    table = {k: torch.zeros(stop - start, dim, dtype=dtype) for k in (["precondition", "second", "gradient"] if full
                                                                      else ["precondition"])}
    for t in range(stop):
        r0, r1 = int(starts[t]), int(starts[t + 1])
        offset = 0
        for k, (spec, rows, is_exact) in enumerate(zip(specs, grads, exact)):
            batch = torch.from_numpy(weights[r0:r1]) @ to_torch(np.asarray(rows[r0:r1]), store.dtype).double()
            if is_exact:
                c = rule.coefficients(step_lr[t], t, state[k], batch)
                state[k] = {"exp_avg": c.diagonals["exp_avg"], "exp_avg_sq": c.diagonals["exp_avg_sq"]}
                values = {name: c.diagonals[name] for name in table}
            else:
                values = {"precondition": _layer_preconditioner(rule, state[k], batch, spec, step_lr[t], t)
                          .expand(spec.dim)}
            if t >= start:
                for name, value in values.items():
                    table[name][t - start, offset: offset + spec.dim] = value
            offset += spec.dim
    return table


def _whitened(store: Store, rule: WhitenedAdam, parts: Sequence[Part], start: int, stop: int, step_lr: list[float],
              dtype: torch.dtype, device: torch.device | None) -> CoefficientsAt:
    """Whitened parts: s_t per coordinate and rho_t = exp(level_{t-1} - level_t) per layer, from the stored
    whitening rows, and with second factors v's operators (embed/factored.py). Parts of layers that follow Adam
    elementwise (never sketched): Adam's own coefficients, and
    rho_t = 1 (their stored factor rows are zeros)."""
    layers = sorted({p.layer for p in parts})
    by_layer = {i: [whitening_level(row, store.layers[i]) for row in store.whitening(i)] for i in layers}
    levels = np.array([by_layer[p.layer] for p in parts])
    dims = [p.width(store) for p in parts]
    tables = {i: {k: v.to(device) for k, v in _adam_table(store, rule.adam, [i], start, stop, step_lr, dtype).items()}
              for i in layers if store.config.elementwise(i)}
    offsets = np.cumsum([0] + dims)
    exact = [(p.layer, slice(offsets[k], offsets[k + 1])) for k, p in enumerate(parts) if p.layer in tables]
    widths = torch.tensor(dims, device=device)
    names = ["precondition"] + (["second", "gradient"] if rule.second_moment == "full" else [])
    factored = FactoredSecondMoment(store, parts, dtype, device) if rule.factored else None

    def at(t: int) -> StepCoefficients:
        ratio = np.exp(levels[:, t - 1] - levels[:, t]) if t > 0 else np.ones(len(parts))
        s = rule.adam.step_size(step_lr[t], t)
        diagonals = {name: torch.full((sum(dims),), s if name == "precondition" else 0.0, dtype=dtype, device=device)
                     for name in names}
        for layer, columns in exact:
            for name in names:
                diagonals[name][columns] = tables[layer][name][t - start]
        diagonals["ratio"] = torch.as_tensor(ratio, dtype=dtype, device=device).repeat_interleave(widths)
        return StepCoefficients(step_lr[t], t, diagonals, factored.at(t, s) if factored else {})

    return at


def _layer_preconditioner(rule: Adam, state: dict, batch: torch.Tensor, spec, lr: float, t: int) -> torch.Tensor:
    """One P_t for a projected layer, from the EMA of its batch gradient's mean square (kept in ``state``)."""
    square = batch @ batch / (spec.d_out * (spec.d_in + spec.bias))
    state["v"] = rule.beta2 * state.get("v", 0.0) + (1 - rule.beta2) * float(square)
    return torch.tensor(rule.step_size(lr, t) / (math.sqrt(state["v"] / (1 - rule.beta2 ** rule.count(t))) + rule.eps),
                        dtype=torch.float64)
