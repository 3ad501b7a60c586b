"""Baseline estimators against independent computations with explicit loops and full Hessians."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvemb.capture.selection import layer_spec
from dvemb.evaluate import TrainingSpec, records_of, train
from dvemb.evaluate.baselines import (
    epoch_ends,
    exact_first_order,
    grad_dot,
    influence_function,
    record_weight,
    tracin_cp,
)
from dvemb.update import SGD

N_SAMPLES, BATCH, EPOCHS, LR = 12, 4, 2, 0.3
TOL = {"rtol": 1e-9, "atol": 1e-12}


def make_mlp() -> nn.Module:
    """The same 6-5-3 tanh MLP on every call."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.7)
    return model


@pytest.fixture(scope="module")
def spec() -> TrainingSpec:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N_SAMPLES, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (N_SAMPLES,), generator=generator)
    batches = [b.tolist() for _ in range(EPOCHS) for b in torch.randperm(N_SAMPLES, generator=generator).split(BATCH)]
    return TrainingSpec(make_mlp, x, y, batches, LR)


@pytest.fixture(scope="module")
def validation() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(5, 6, generator=generator, dtype=torch.float64), torch.randint(0, 3, (5,), generator=generator)


@pytest.fixture(scope="module")
def trajectory(spec):
    return train(spec, keep_steps=range(spec.num_steps))


def mean_loss(validation):
    x, y = validation
    return lambda model: F.cross_entropy(model(x), y)


def flat_params(trajectory, step: int) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in trajectory.params_at(step).values()])


def loss_at(trajectory, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_i w_i loss_i at a flat parameter vector, through a model built by hand."""
    model = trajectory.spec.build_model()
    shapes = [p.shape for p in model.parameters()]
    parts = torch.split(flat, [int(np.prod(s)) for s in shapes])
    w1, b1, w2, b2 = (part.reshape(s) for part, s in zip(parts, shapes))
    logits = torch.tanh(x @ w1.T + b1) @ w2.T + b2
    return (w * F.cross_entropy(logits, y, reduction="none")).sum()


def gradient(trajectory, step: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of the mean loss of (x, y) at theta_step, by plain autograd."""
    flat = flat_params(trajectory, step).requires_grad_()
    w = torch.full((len(y),), 1.0 / len(y), dtype=torch.float64)
    return torch.autograd.grad(loss_at(trajectory, flat, x, y, w), flat)[0]


def sample_gradient(trajectory, step: int, sample: int) -> torch.Tensor:
    spec = trajectory.spec
    return gradient(trajectory, step, spec.inputs[sample : sample + 1], spec.targets[sample : sample + 1])


def some_records(spec) -> list[tuple[int, int]]:
    return records_of(spec)[1::2]


def test_epoch_ends_and_record_weights(spec):
    assert epoch_ends(spec) == [3, 6]
    assert record_weight(spec, (0, spec.batch(0)[0])) == pytest.approx(1 / BATCH)
    duplicated = TrainingSpec(make_mlp, spec.inputs, spec.targets, [[1, 1, 2]], LR)
    assert record_weight(duplicated, (0, 1)) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="not in the batch"):
        record_weight(spec, (0, next(i for i in range(N_SAMPLES) if i not in spec.batch(0))))


@pytest.mark.parametrize("checkpoints", [None, [6]])
def test_tracin_and_grad_dot_match_explicit_loops(spec, trajectory, validation, checkpoints):
    records = some_records(spec)
    steps = [3, 6] if checkpoints is None else checkpoints
    expected = np.zeros(len(records))
    for c in steps:
        test = gradient(trajectory, c, *validation)
        for k, (t, i) in enumerate(records):
            expected[k] += LR / BATCH * float(test @ sample_gradient(trajectory, c, i))
    estimate = tracin_cp(trajectory, records, mean_loss(validation)) if checkpoints is None else \
        grad_dot(trajectory, records, mean_loss(validation))
    assert estimate.shape == (1, len(records))
    np.testing.assert_allclose(estimate[0], expected, **TOL)


def test_tracin_rejects_checkpoints_outside_the_run(spec, trajectory, validation):
    for checkpoints in ([], [spec.num_steps + 1]):
        with pytest.raises(ValueError, match="checkpoints"):
            tracin_cp(trajectory, some_records(spec), mean_loss(validation), checkpoints=checkpoints)


def layer_matrices(flat: torch.Tensor) -> list[torch.Tensor]:
    """A flat 6-5-3 MLP gradient as per-layer [W | b] matrices."""
    w1, b1, w2, b2 = torch.split(flat, [30, 5, 15, 3])
    return [torch.cat([w1.reshape(5, 6), b1[:, None]], 1), torch.cat([w2.reshape(3, 5), b2[:, None]], 1)]


@pytest.mark.parametrize("projection_dim", [None, 16])
def test_influence_function_matches_explicit_projected_fisher_solve(spec, trajectory, validation, projection_dim):
    records = some_records(spec)
    damping = 0.2
    model = spec.build_model()
    projections = [layer_spec(name, module, projection_dim, 0, "gaussian") for name, module in
                   (("0", model[0]), ("2", model[2]))]
    grads = [layer_matrices(sample_gradient(trajectory, spec.num_steps, i)) for i in range(N_SAMPLES)]
    test = layer_matrices(gradient(trajectory, spec.num_steps, *validation))
    expected = np.zeros(len(records))
    for l, layer in enumerate(projections):
        p_in, p_out = (p.matrix(torch.float64) for p in (layer.proj_in, layer.proj_out))
        g = torch.stack([(p_out @ grad[l] @ p_in.T).reshape(-1) for grad in grads])
        fisher = g.T @ g / N_SAMPLES
        eye = torch.eye(fisher.shape[0], dtype=torch.float64)
        solved = torch.linalg.solve(fisher + damping * torch.trace(fisher) / fisher.shape[0] * eye,
                                    (p_out @ test[l] @ p_in.T).reshape(-1))
        expected += np.array([float(g[i] @ solved) for _, i in records])
    expected *= (LR / BATCH) / (LR * spec.num_steps)  # c_r / C: 1 / (N * epochs) here
    estimate = influence_function(trajectory, records, mean_loss(validation), projection_dim=projection_dim,
                                  damping=damping)
    np.testing.assert_allclose(estimate[0], expected, **TOL)


def step_hessians(trajectory) -> list[torch.Tensor]:
    """Exact Hessian of every step's weighted batch loss at theta_t, by plain autograd on a flat vector."""
    spec, hessians = trajectory.spec, []
    for t in range(spec.num_steps):
        x, y = spec.step_data(t)
        hessians.append(torch.autograd.functional.hessian(
            lambda flat: loss_at(trajectory, flat, x, y, spec.weights(t)), flat_params(trajectory, t), vectorize=False))
    return hessians


def test_vector_targets_and_retraining_for_missing_steps(spec, trajectory, validation):
    records = some_records(spec)
    x, y = validation
    per_example = exact_first_order(train(spec), records, lambda m: F.cross_entropy(m(x), y, reduction="none"))
    assert per_example.shape == (len(y), len(records))
    scalar = exact_first_order(trajectory, records, mean_loss(validation))
    np.testing.assert_allclose(per_example.mean(axis=0), scalar[0], **TOL)


@pytest.mark.parametrize("settings", [dict(), dict(momentum=0.9), dict(momentum=0.8, nesterov=True, weight_decay=0.05),
                                      dict(momentum=0.7, dampening=0.4), dict(weight_decay=0.1)])
def test_exact_first_order_matches_a_forward_simulation_with_explicit_hessians(spec, validation, settings):
    """d = (H_k + lambda I) dtheta (+ the dropped -w g at the record's step); b = mu b + gamma d;
    dtheta -= eta (d + mu b if Nesterov else b): exact Hessians, simulated forward per record
    (plain SGD: delta = prod (I - eta H_k) eta w g)."""
    sgd = SGD(**settings)
    run = TrainingSpec(spec.model_factory, spec.inputs, spec.targets, spec.batches, LR, update=sgd)
    trajectory = train(run, keep_steps=range(run.num_steps))
    records = some_records(run)
    hessians = step_hessians(trajectory)
    test = gradient(trajectory, run.num_steps, *validation)
    eye = torch.eye(test.shape[0], dtype=torch.float64)
    expected = []
    for t, i in records:
        theta, buf = torch.zeros_like(test), torch.zeros_like(test)
        for k in range(t, run.num_steps):
            d = (hessians[k] + sgd.weight_decay * eye) @ theta
            if k == t:
                d = d - record_weight(run, (t, i)) * sample_gradient(trajectory, t, i)
            if sgd.momentum:
                buf = sgd.momentum * buf + (1.0 if k == 0 else 1.0 - sgd.dampening) * d
                d = d + sgd.momentum * buf if sgd.nesterov else buf
            theta = theta - LR * d
        expected.append(float(test @ theta))
    estimate = exact_first_order(trajectory, records, mean_loss(validation))
    assert np.abs(expected).max() > 1e-4
    np.testing.assert_allclose(estimate[0], expected, **TOL)
