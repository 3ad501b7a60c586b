"""End to end: DVEmb scores against the exact TSLOO obtained by replaying training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dvemb
from dvemb.evaluate import TrainingSpec, record_run, spearman, train, tsloo

pytest.importorskip("sklearn")
from dvemb.studies.data import load_digits_split  # noqa: E402

SPEARMAN_FLOOR = 0.9  # issue acceptance bound; measured ~0.99 (see the printed figure)


ARCHITECTURES = {
    "mlp": lambda: nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)),
    "cnn": lambda: nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 6, 3, padding=1), nn.Tanh(),
                                 nn.Conv2d(6, 4, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(36, 10)),
    "grouped-cnn": lambda: nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 6, 3, padding=1), nn.Tanh(),
                                         nn.Conv2d(6, 6, 3, stride=2, groups=6), nn.Tanh(),  # depthwise
                                         nn.Conv2d(6, 4, 1, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(36, 10)),
}


def digits_spec(epochs: int = 3, batch: int = 32, lr: float = 0.05, seed: int = 0, n_train: int = 640,
                arch: str = "mlp"):
    x, y, xv, yv = load_digits_split(seed=seed)
    x, y = x[:n_train], y[:n_train]
    g = torch.Generator().manual_seed(seed)
    batches = [b.tolist() for _ in range(epochs) for b in torch.randperm(n_train, generator=g).split(batch)]

    def factory() -> nn.Module:
        torch.manual_seed(seed)
        return ARCHITECTURES[arch]()

    return TrainingSpec(factory, x, y, batches, lr), xv.double(), yv


@pytest.mark.parametrize("arch", ["mlp", "cnn", "grouped-cnn"])
def test_dvemb_matches_replayed_tsloo_on_validation_loss(tmp_path, arch):
    spec, xv, yv = digits_spec(arch=arch)
    model = record_run(spec, tmp_path / "s", projection_dim=None, dtype=torch.float64)
    traj = train(spec)
    for name, p in model.named_parameters():  # the recorded run is the replayed trajectory
        torch.testing.assert_close(p, traj.final_params[name], rtol=0, atol=1e-12)

    inf = dvemb.influence(tmp_path / "s", model, lambda: F.cross_entropy(model(xv), yv, reduction="none"))
    estimate = inf.scores.mean(axis=0)  # mean validation loss = mean of per-example losses
    last_epoch = np.flatnonzero(inf.steps >= spec.num_steps - spec.num_steps // 3)
    chosen = np.random.default_rng(0).choice(last_epoch, 50, replace=False)
    removals = [[(int(inf.steps[r]), int(inf.sample_ids[r]))] for r in chosen]
    truth = tsloo(spec, removals, lambda m: F.cross_entropy(m(xv), yv), trajectory=traj, show_progress=False)[0]
    rho = spearman(estimate[chosen], truth)
    print(f"\n{arch}: Spearman(DVEmb, replayed TSLOO) over 50 last-epoch records: {rho:.4f}")
    assert rho >= SPEARMAN_FLOOR


def test_checkpoint_influence_matches_tsloo_replayed_to_that_checkpoint(tmp_path):
    spec, xv, yv = digits_spec()
    b = 2 * spec.num_steps // 3  # end of epoch 2
    model = record_run(spec, tmp_path / "s", projection_dim=None, dtype=torch.float64, save_checkpoints=[b])
    dvemb.compute_embeddings(tmp_path / "s", checkpoints=[b], show_progress=False)
    assert dvemb.checkpoint_steps(tmp_path / "s") == [b, spec.num_steps]
    dvemb.load_checkpoint(tmp_path / "s", model, b)
    inf = dvemb.influence(tmp_path / "s", model, lambda: F.cross_entropy(model(xv), yv, reduction="none"),
                          checkpoint=0)
    assert inf.steps.max() == b - 1
    estimate = inf.scores.mean(axis=0)
    epoch2 = np.flatnonzero(inf.steps >= b // 2)
    chosen = np.random.default_rng(1).choice(epoch2, 50, replace=False)
    removals = [[(int(inf.steps[r]), int(inf.sample_ids[r]))] for r in chosen]
    truncated = TrainingSpec(spec.model_factory, spec.inputs, spec.targets, spec.batches[:b], spec.lrs)
    truth = tsloo(truncated, removals, lambda m: F.cross_entropy(m(xv), yv), show_progress=False)[0]
    rho = spearman(estimate[chosen], truth)
    print(f"\nSpearman at checkpoint step {b}: {rho:.4f}")
    assert rho >= 0.85
