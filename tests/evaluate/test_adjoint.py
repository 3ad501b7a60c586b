"""The adjoint estimator: exact first order against forward-mode derivatives of the replayed run, and each
approximation against what data value embeddings compute with the same options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

import dvemb
from dvemb.capture import curvature as curvature_module
from dvemb.evaluate import TrainingSpec, record_run, records_of, train
from dvemb.capture.layers import rule_for
from dvemb.evaluate.adjoint import AdjointOptions, adjoint_estimate
from dvemb.evaluate.functions import ComposedProjection, LayerProjection
from dvemb.embed.plan import STEP_RANK
from dvemb.store import Store
from dvemb.evaluate.replay import record_weight
from dvemb.update import SGD, Adam

# float64 throughout: both sides sum the same products in different orders, round-off ~1e-15 relative
TOL = {"rtol": 1e-9, "atol": 1e-12}


def make_spec(rule, lr: float, n: int = 24, batch: int = 6, epochs: int = 2) -> tuple[TrainingSpec, tuple]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n + 10, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n + 10,), generator=g)

    def factory() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))

    order = [torch.randperm(n, generator=g).split(batch) for _ in range(epochs)]
    batches = [b.tolist() for epoch in order for b in epoch]
    spec = TrainingSpec(factory, x[:n], y[:n], batches, [lr * (1 - 0.05 * t) for t in range(len(batches))],
                        update=rule)
    return spec, (x[n:], y[n:])


def mean_loss(validation):
    x, y = validation
    return lambda m: F.cross_entropy(m(x), y)


def weight_derivative(spec: TrainingSpec, record, target) -> float:
    """d target(theta_T) / d w_ti by forward-mode differentiation through the replayed run."""
    model = spec.build_model()
    params = {n: p.detach() for n, p in model.named_parameters()}
    t_r, i_r = record
    position = spec.batch(t_r).index(i_r)

    def final(eps: torch.Tensor) -> torch.Tensor:
        p, state = dict(params), {}
        for t in range(spec.num_steps):
            x, y = spec.step_data(t)
            w = spec.weights(t)
            if t == t_r:
                w = w + eps * F.one_hot(torch.tensor(position), len(w)).to(w.dtype)
            loss = lambda q: (w * F.cross_entropy(functional_call(model, q, (x,)), y, reduction="none")).sum()
            p, state = spec.update.step(p, grad(loss)(p), state, spec.lr(t), t)
        return target(lambda inputs: functional_call(model, p, (inputs,)))

    return float(jvp(final, (torch.tensor(0.0, dtype=torch.float64),), (torch.tensor(1.0, dtype=torch.float64),))[1])


@pytest.mark.parametrize("rule, lr", [(SGD(momentum=0.9, weight_decay=0.01), 0.2), (Adam(weight_decay=0.05), 0.02),
                                      (Adam(0.8, 0.95, 1e-6), 0.01)])
def test_exact_first_order_is_the_derivative_of_the_replayed_run(rule, lr):
    spec, validation = make_spec(rule, lr)
    records = records_of(spec)[::5]
    estimate = adjoint_estimate(train(spec), records, mean_loss(validation))[0]
    want = [-record_weight(spec, r) * weight_derivative(spec, r, mean_loss(validation)) for r in records]
    assert np.abs(want).max() > 1e-5
    np.testing.assert_allclose(estimate, want, **TOL)


def test_frozen_second_moment_differs_from_full(tmp_path):
    spec, validation = make_spec(Adam(weight_decay=0.05), 0.02)
    trajectory, records = train(spec), records_of(spec)
    full = adjoint_estimate(trajectory, records, mean_loss(validation))
    frozen = adjoint_estimate(trajectory, records, mean_loss(validation), AdjointOptions(second_moment="frozen"))
    assert np.abs(full - frozen).max() > 1e-3 * np.abs(full).max()


PAPER = dict(curvature="gradient_outer", projection="gaussian")
TRUNCATE = math.ceil(STEP_RANK * 6)  # compute_embeddings' default cut of each step's curvature (batch 6)


@pytest.mark.parametrize("options, recorder", [
    (AdjointOptions("gradient_outer", "layer", 12), dict(projection_dim=12, **PAPER)),
    (AdjointOptions("gradient_outer", "global", 12), dict(projection_dim=12, blocking="global", **PAPER)),
    (AdjointOptions("ggn", "global", 12, truncate=TRUNCATE), dict(projection_dim=12, curvature="ggn", curvature_samples=None,
                                                            projection="gaussian", blocking="global")),
    (AdjointOptions("ggn", "layer", None, truncate=TRUNCATE), dict(projection_dim=None, curvature="ggn",
                                                            curvature_samples=None)),
    (AdjointOptions("ggn", "global", 12, ggn_rank=1, truncate=TRUNCATE), dict(projection_dim=12, curvature_samples=1,
                                                                       blocking="global")),
    (AdjointOptions("ggn", "global", 12, ggn_rank=3, truncate=TRUNCATE), dict(projection_dim=12)),  # the defaults
])
@pytest.mark.parametrize("rule", [SGD(), SGD(momentum=0.9, nesterov=True)])
def test_approximations_equal_data_value_embeddings_with_the_same_options(tmp_path, monkeypatch, options, recorder,
                                                                         rule):
    if options.ggn_rank is not None and options.ggn_rank < 2:  # the adjoint's rank-k factors are the leading part:
        ritz = curvature_module._ritz_factors  # make the Recorder use them instead of its random-sign pass
        monkeypatch.setattr(curvature_module, "_sequential_factors",
                            lambda probs, leading, generator: ritz(probs, leading + 1))
    spec, validation = make_spec(rule, 0.3)
    recorder = dict(recorder)
    recorder.pop("blocking", None)
    blocking = options.blocking
    model = record_run(spec, tmp_path / "s", dtype=torch.float64, **recorder)
    x, y = validation
    inf = dvemb.influence(tmp_path / "s", model, lambda: F.cross_entropy(model(x), y, reduction="none"),
                          blocking=blocking)
    records = list(zip(inf.steps.tolist(), inf.sample_ids.tolist()))
    projections = store_projections(tmp_path / "s", model) if recorder.get("projection", "fitted") == "fitted" else None
    estimate = adjoint_estimate(train(spec), records, mean_loss(validation), options, projections=projections)[0]
    np.testing.assert_allclose(inf.scores.mean(axis=0), estimate, **TOL)


@pytest.mark.parametrize("blocking", ["layer", "global"])
@pytest.mark.parametrize("k", [8, 12])  # 12: the 3 x 8 output layer stays exact and follows Adam with v's path
@pytest.mark.parametrize("second_moment", ["followed", "frozen"])
def test_whitened_adam_equals_the_adjoint_in_whitened_coordinates(tmp_path, blocking, k, second_moment):
    spec, validation = make_spec(Adam(weight_decay=0.05), 0.02)
    model = record_run(spec, tmp_path / "s", dtype=torch.float64, projection_dim=k, fit_steps=1)
    store = Store(tmp_path / "s")
    assert store.config.whitening and [s.exact for s in store.layers] == [False, k == 12]
    dvemb.compute_embeddings(tmp_path / "s", blocking=blocking, second_moment=second_moment, show_progress=False)
    x, y = validation
    inf = dvemb.influence(tmp_path / "s", model, lambda: F.cross_entropy(model(x), y, reduction="none"),
                          blocking=blocking)
    records = list(zip(inf.steps.tolist(), inf.sample_ids.tolist()))
    options = AdjointOptions("ggn", blocking, k, ggn_rank=3, second_moment="full" if second_moment == "followed" else
                             "frozen", preconditioner="whitened-lagged", truncate=TRUNCATE)  # 6 records per step: cut to 3
    estimate = adjoint_estimate(train(spec), records, mean_loss(validation), options,
                                projections=store_projections(tmp_path / "s", model))[0]
    np.testing.assert_allclose(inf.scores.mean(axis=0), estimate, **TOL)


def test_hierarchical_plan_keeps_exact_adam_layers_whole_in_the_global_block(tmp_path, monkeypatch):
    """With one layer projected (whitened) and one exact (Adam elementwise: no sketch may mix its coordinates),
    the hierarchical plan sketches only the projected layer: its scores equal the adjoint's per-layer scores, plus
    its global ones over [S P_0, exact layer], minus its per-layer ones over [S P_0, exact layer], the sketched
    coordinates holding v fixed."""
    from dvemb.embed.plan import make_plan

    spec, validation = make_spec(Adam(weight_decay=0.05), 0.02)
    model = record_run(spec, tmp_path / "s", dtype=torch.float64, projection_dim=12, fit_steps=1)
    monkeypatch.setattr(dvemb.embed.plan, "coarse_size", lambda dims, values, whole=0: 4)
    store = Store(tmp_path / "s")
    plan = make_plan(store, "hierarchical")
    assert [(p.layer, p.sketch, p.sign) for p in plan.parts] == [(0, None, 1), (0, 4, 1), (1, None, 1), (0, 4, -1)]
    assert plan.blocks == ((0,), (1, 2), (3,))
    x, y = validation
    dvemb.compute_embeddings(tmp_path / "s", blocking="hierarchical", step_rank=None, show_progress=False)
    inf = dvemb.influence(tmp_path / "s", model, lambda: F.cross_entropy(model(x), y, reduction="none"))
    records = list(zip(inf.steps.tolist(), inf.sample_ids.tolist()))
    base = store_projections(tmp_path / "s", model)
    coarse = [ComposedProjection(base[0], plan.parts[1].matrix(store.layers[0].dim, torch.float64)), base[1]]

    def adjoint(blocking: str, projections, projected_second_moment="factored") -> np.ndarray:
        options = AdjointOptions("ggn", blocking, 12, ggn_rank=3, second_moment="full",
                                 preconditioner="whitened-lagged", truncate=18,  # 6 records x 3 rows: no cut
                                 projected_second_moment=projected_second_moment)
        return adjoint_estimate(train(spec), records, mean_loss(validation), options, projections=projections)[0]

    with pytest.raises(ValueError, match="sketched coordinates hold v fixed"):
        adjoint("global", coarse)
    want = adjoint("layer", base) + adjoint("global", coarse, "frozen") - adjoint("layer", coarse, "frozen")
    np.testing.assert_allclose(inf.scores.mean(axis=0), want, **TOL)


def store_projections(path, model: nn.Module) -> list[LayerProjection]:
    """The store's (fitted) projections as the adjoint's Kronecker maps."""
    names = dict(model.named_modules())
    out = []
    for spec in Store(path).layers:
        module = names[spec.name]
        out.append(LayerProjection(f"{spec.name}.weight", f"{spec.name}.bias" if spec.bias else None,
                                   rule_for(module).as_matrix, spec.proj_in.matrix(torch.float64),
                                   spec.proj_out.matrix(torch.float64)))
    return out
