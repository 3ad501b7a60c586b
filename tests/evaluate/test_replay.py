"""Replay TSLOO against brute-force retraining written independently with plain autograd."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvemb.evaluate import (
    TrainingSpec,
    all_epoch_removal,
    record_run,
    records_of,
    single_records,
    train,
    tsloo,
)
from dvemb.update import SGD, Adam, make_optimizer

N_SAMPLES, N_TEST = 10, 3
LR = 0.5
TOL = {"rtol": 1e-10, "atol": 1e-10}


def make_mlp() -> nn.Module:
    """The same 8-16-4 tanh MLP on every call."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model


def make_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training inputs/labels and test inputs/labels."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N_SAMPLES + N_TEST, 8, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (N_SAMPLES + N_TEST,), generator=generator)
    return x[:N_SAMPLES], y[:N_SAMPLES], x[N_SAMPLES:], y[N_SAMPLES:]


def epoch_batches(epochs: int, batch_size: int = 4) -> list[list[int]]:
    """A fixed permutation per epoch cut into batches; the last batch of an epoch is smaller."""
    generator = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(epochs):
        order = torch.randperm(N_SAMPLES, generator=generator).tolist()
        batches += [order[k : k + batch_size] for k in range(0, N_SAMPLES, batch_size)]
    return batches


def make_spec(
    reduction: str = "mean", epochs: int = 2, lrs: list[float] | float = LR
) -> TrainingSpec:
    x, y, _, _ = make_data()
    return TrainingSpec(make_mlp, x, y, epoch_batches(epochs), lrs, reduction=reduction)


def target_losses(model: nn.Module) -> torch.Tensor:
    """Per-test-point cross entropy."""
    _, _, x_test, y_test = make_data()
    return F.cross_entropy(model(x_test), y_test, reduction="none")


def brute_force_losses(spec: TrainingSpec, removed: set[tuple[int, int]]) -> np.ndarray:
    """Retrains from step 0 with a plain loop, zeroing the weights of ``removed`` records."""
    model = make_mlp().double()
    params = [p for p in model.parameters() if p.requires_grad]
    for t, batch in enumerate(spec.batches):
        outputs = model(spec.inputs[batch])
        per_example = F.cross_entropy(outputs, spec.targets[batch], reduction="none")
        scale = 1.0 / len(batch) if spec.reduction == "mean" else 1.0
        w = torch.tensor([0.0 if (t, i) in removed else scale for i in batch], dtype=torch.float64)
        grads = torch.autograd.grad((w * per_example).sum(), params)
        lr = spec.lrs if isinstance(spec.lrs, float) else spec.lrs[t]
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g
    with torch.no_grad():
        return target_losses(model).numpy()


def brute_force_tsloo(spec: TrainingSpec, removals: list[list[tuple[int, int]]]) -> np.ndarray:
    """[n_test, n_removals] TSLOO by full retraining."""
    base = brute_force_losses(spec, set())
    return np.stack([brute_force_losses(spec, set(r)) - base for r in removals], axis=1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_single_records_match_retraining(reduction: str) -> None:
    spec = make_spec(reduction, lrs=[LR * 0.9**t for t in range(6)] if reduction == "mean" else 0.1)
    records = records_of(spec)
    chosen = [records[0], records[5], records[len(records) // 2], records[-1]]
    removals = single_records(chosen)
    got = tsloo(spec, removals, target_losses, show_progress=False)
    want = brute_force_tsloo(spec, removals)
    assert got.shape == (N_TEST, len(removals))
    assert np.abs(want).max() > 1e-3  # the check is not vacuous
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_epoch_removal_matches_retraining(reduction: str) -> None:
    spec = make_spec(reduction, lrs=LR if reduction == "mean" else 0.1)
    removals = all_epoch_removal(spec, [0, 3, 7])
    assert all(len(r) == 2 and len({t for t, _ in r}) == 2 for r in removals)
    removals.append([(1, spec.batches[1][0]), (4, spec.batches[4][1]), (5, spec.batches[5][0])])
    got = tsloo(spec, removals, target_losses, show_progress=False)
    np.testing.assert_allclose(got, brute_force_tsloo(spec, removals), **TOL)


def test_chunking_and_sparse_checkpoints_do_not_change_results() -> None:
    spec = make_spec(epochs=3)
    removals = single_records(records_of(spec)[::3]) + all_epoch_removal(spec, [2, 5])
    reference = tsloo(spec, removals, target_losses, chunk_size=len(removals), show_progress=False)
    trajectory = train(spec, keep_steps=[4])
    chunked = tsloo(
        spec, removals, target_losses, trajectory=trajectory, chunk_size=3, show_progress=False
    )
    np.testing.assert_allclose(chunked, reference, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(reference, brute_force_tsloo(spec, removals), **TOL)


def test_duplicate_in_batch_removes_every_use() -> None:
    x, y, _, _ = make_data()
    batches = [[0, 1, 1, 2], [3, 1, 4, 5], [1, 1, 6, 7]]
    spec = TrainingSpec(make_mlp, x, y, batches, LR)
    assert records_of(spec) == [
        (0, 0), (0, 1), (0, 2), (1, 3), (1, 1), (1, 4), (1, 5), (2, 1), (2, 6), (2, 7)
    ]
    got = tsloo(spec, [[(0, 1)], [(2, 1)]], target_losses, show_progress=False)
    want = brute_force_tsloo(spec, [[(0, 1)], [(2, 1)]])  # the brute force zeroes both positions
    np.testing.assert_allclose(got, want, **TOL)


def test_target_shapes_and_empty_removal() -> None:
    spec = make_spec()
    removals = [[(0, spec.batches[0][0])], [], [(3, spec.batches[3][1])]]
    per_point = tsloo(spec, removals, target_losses, show_progress=False)
    assert per_point.shape == (N_TEST, 3) and per_point.dtype == np.float64
    np.testing.assert_array_equal(per_point[:, 1], 0.0)
    mean = tsloo(spec, removals, lambda m: target_losses(m).mean(), show_progress=False)
    assert mean.shape == (1, 3)
    np.testing.assert_allclose(mean[0], per_point.mean(axis=0), rtol=1e-12, atol=1e-15)
    assert tsloo(spec, [], target_losses, show_progress=False).shape == (N_TEST, 0)


def test_first_order_estimate_at_tiny_lr() -> None:
    lr = 1e-4
    spec = make_spec(lrs=lr)
    trajectory = train(spec, keep_steps=range(spec.num_steps))
    t, i = 2, spec.batches[2][1]
    got = tsloo(spec, [[(t, i)]], lambda m: target_losses(m).sum(), trajectory=trajectory,
                   show_progress=False)

    def flat_grad(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return torch.cat([g.reshape(-1) for g in grads])

    final = trajectory.model()
    g_test = flat_grad(final, target_losses(final).sum())
    at_t = trajectory.model(trajectory.params_at(t))
    g_ti = flat_grad(at_t, F.cross_entropy(at_t(spec.inputs[[i]]), spec.targets[[i]]))
    estimate = lr / len(spec.batches[t]) * float(g_test @ g_ti)
    assert got[0, 0] == pytest.approx(estimate, rel=1e-3)


def test_trajectory_matches_plain_training_and_frozen_parameters_stay_fixed() -> None:
    def half_frozen() -> nn.Module:
        model = make_mlp()
        model[0].bias.requires_grad_(False)
        return model

    x, y, _, _ = make_data()
    spec = TrainingSpec(half_frozen, x, y, epoch_batches(1), LR)
    trajectory = train(spec, keep_steps=[1])
    assert set(trajectory.checkpoints) == {0, 1}
    assert "0.bias" in trajectory.fixed and "0.bias" not in trajectory.final_params
    model = half_frozen().double()
    params = [p for p in model.parameters() if p.requires_grad]
    for t, batch in enumerate(spec.batches):
        loss = F.cross_entropy(model(x[batch]), y[batch])
        with torch.no_grad():
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                p -= LR * g
    for name, p in model.named_parameters():
        got = trajectory.model().get_parameter(name)
        torch.testing.assert_close(got, p, rtol=1e-12, atol=1e-12)


def test_invalid_removals_raise() -> None:
    spec = make_spec()
    missing = next(i for i in range(N_SAMPLES) if i not in spec.batches[0])
    with pytest.raises(ValueError, match="not in the batch"):
        tsloo(spec, [[(0, missing)]], target_losses, show_progress=False)
    with pytest.raises(ValueError, match="step outside"):
        tsloo(spec, [[(spec.num_steps, 0)]], target_losses, show_progress=False)
    with pytest.raises(ValueError, match="different TrainingSpec"):
        tsloo(spec, [], target_losses, trajectory=train(make_spec()), show_progress=False)


def optimizer_losses(spec: TrainingSpec, removed: set[tuple[int, int]]) -> np.ndarray:
    """Retrains from step 0 with the torch optimizer of spec.update, zeroing the weights of ``removed``."""
    model = make_mlp().double()
    opt = make_optimizer(spec.update, model.parameters(), LR)
    for t, batch in enumerate(spec.batches):
        w = torch.tensor([0.0 if (t, i) in removed else 1.0 / len(batch) for i in batch], dtype=torch.float64)
        (w * F.cross_entropy(model(spec.inputs[batch]), spec.targets[batch], reduction="none")).sum().backward()
        opt.param_groups[0]["lr"] = spec.lr(t)
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        return target_losses(model).numpy()


@pytest.mark.parametrize("rule", [SGD(momentum=0.9), SGD(momentum=0.8, nesterov=True, weight_decay=0.01),
                                  SGD(momentum=0.7, dampening=0.3), SGD(weight_decay=0.05), Adam(),
                                  Adam(0.8, 0.99, 1e-6, weight_decay=0.1), Adam(weight_decay=0.05, decoupled=False)])
def test_replay_matches_torch_optimizer_retraining(rule) -> None:
    x, y, _, _ = make_data()
    lr = 0.02 if isinstance(rule, Adam) else 0.2
    spec = TrainingSpec(make_mlp, x, y, epoch_batches(3), [lr * 0.9**t for t in range(9)], update=rule)
    records = records_of(spec)
    removals = single_records([records[1], records[7], records[-3]]) + [[records[2], records[12]]]
    trajectory = train(spec, keep_steps=[4])  # removals after step 4 replay from its kept state (buffers too)
    got = tsloo(spec, removals, target_losses, trajectory=trajectory, chunk_size=2, show_progress=False)
    base = optimizer_losses(spec, set())
    want = np.stack([optimizer_losses(spec, set(r)) - base for r in removals], axis=1)
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, **TOL)
    np.testing.assert_allclose(trajectory.model()(x).detach().numpy(),
                               _trained_with_optimizer(spec)(x).detach().numpy(), rtol=1e-12, atol=1e-12)


def _trained_with_optimizer(spec: TrainingSpec) -> nn.Module:
    """The run recorded by record_run (the torch optimizer under a Recorder)."""
    with tempfile.TemporaryDirectory() as tmp:
        return record_run(spec, f"{tmp}/s", dtype=torch.float64)
