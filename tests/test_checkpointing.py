"""Algorithm 2: segments composed equal Algorithm 1; influence at intermediate checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dvemb
from dvemb.embed.checkpointing import segment_boundaries
from dvemb.store import Store
from reference import final_embeddings, per_sample_gradients, project
from test_recursion import explicit_embeddings, train_recorded


@pytest.fixture(scope="module")
def run64(tmp_path_factory):
    path = tmp_path_factory.mktemp("alg2") / "s"
    model = train_recorded(path, steps=13, batch=5, dtype=torch.float64, projection_dim=16)
    dvemb.compute_embeddings(path, blocking="layer", show_progress=False)
    return path, model, final_embeddings(path)


# Composition reorders float64 products: differences are round-off, ~1e-14 relative.
@pytest.mark.parametrize("checkpoints,workers", [(2, 1), (3, 1), (13, 1), ([4, 5, 11], 1), (4, 2), (1, 3)])
def test_algorithm2_equals_algorithm1(run64, checkpoints, workers):
    path, _, reference = run64
    info = dvemb.compute_embeddings(path, checkpoints=checkpoints, workers=workers, blocking="layer", show_progress=False)
    got = final_embeddings(path)
    assert np.linalg.norm(got - reference) / np.linalg.norm(reference) < 1e-10
    assert list(info.boundaries) == segment_boundaries(13, checkpoints)


@pytest.mark.parametrize("checkpoints,workers", [(3, 1), (4, 2)])
def test_algorithm2_equals_algorithm1_for_a_hierarchical_plan(run64, checkpoints, workers):
    path, model, _ = run64
    small = 1728  # bytes: 6 coarse coordinates per layer in float64 (6^2 (2^2 + 2) values)
    one = dvemb.compute_embeddings(path, blocking="hierarchical", memory=small, show_progress=False)
    assert one.blocking == "hierarchical"
    reference = final_embeddings(path)
    dvemb.compute_embeddings(path, checkpoints=checkpoints, workers=workers, blocking="hierarchical", memory=small,
                             show_progress=False)
    assert np.linalg.norm(final_embeddings(path) - reference) / np.linalg.norm(reference) < 1e-10
    xt = torch.randn(2, 10, dtype=torch.float64)
    inf = dvemb.influence(path, model, lambda: model(xt).sum(1), checkpoint=-1)  # the last checkpoint is T
    assert inf.scores.shape == (2, Store(path).n_records)


def test_influence_at_checkpoint_equals_product_formula_up_to_that_step(tmp_path):
    path = tmp_path / "s"
    torch.manual_seed(0)
    model = train_recorded(path, steps=10, batch=4, dtype=torch.float64, projection_dim=None)
    dvemb.compute_embeddings(path, checkpoints=[3, 7], blocking="layer", show_progress=False)
    assert dvemb.checkpoint_steps(path) == [3, 7, 10]
    store = Store(path)
    xt, yt = torch.randn(3, 10, dtype=torch.float64), torch.tensor([1, 2, 0])
    names = [s.name for s in store.layers]
    for l, until in enumerate([3, 7, 10]):
        # any parameters serve for the algebra; use the final model's as the "checkpoint" model
        inf = dvemb.influence(path, model, lambda: F.cross_entropy(model(xt), yt, reduction="none"), checkpoint=l)
        tests = per_sample_gradients(model, F.cross_entropy, xt, yt, names)
        want = sum(project(spec, tests[spec.name]) @ explicit_embeddings(store, i, until).t()
                   for i, spec in enumerate(store.layers))
        assert inf.scores.shape == (3, int(store.step_starts[until]))
        assert inf.steps.max() == until - 1
        np.testing.assert_allclose(inf.scores, want.numpy(), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="out of range"):
        dvemb.influence(path, model, lambda: F.cross_entropy(model(xt), yt, reduction="none"), checkpoint=3)


def test_recorder_saves_checkpoints_that_load_back(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    snapshots = {}
    with dvemb.Recorder(model, tmp_path / "s", optimizer=opt, save_checkpoints=2) as rec:
        for t in range(5):
            snapshots[t] = [p.detach().clone() for p in model.parameters()]
            with rec.step([t], lr=None):
                F.cross_entropy(model(torch.randn(1, 4)), torch.tensor([t % 2])).backward()
            opt.step()
            opt.zero_grad()
    snapshots[5] = [p.detach().clone() for p in model.parameters()]
    assert dvemb.saved_checkpoints(tmp_path / "s") == [0, 2, 4, 5]
    for step in (0, 2, 4, 5):
        fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
        dvemb.load_checkpoint(tmp_path / "s", fresh, step)
        for a, b in zip(fresh.parameters(), snapshots[step]):
            assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="saved steps"):
        dvemb.load_checkpoint(tmp_path / "s", fresh, 3)


def test_checkpoints_of_models_with_tied_weights(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = torch.nn.Embedding(7, 4)
            self.mid = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 7, bias=False)
            self.head.weight = self.wte.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.mid(self.wte(ids))))

    torch.manual_seed(0)
    model = Tied()
    with pytest.warns(UserWarning, match="tied"):
        rec = dvemb.Recorder(model, tmp_path / "s", save_checkpoints=[0])
    with rec, rec.step([0, 1], lr=0.1):
        F.cross_entropy(model(torch.tensor([1, 2])), torch.tensor([3, 4])).backward()
    fresh = Tied()
    dvemb.load_checkpoint(tmp_path / "s", fresh, 0)
    assert torch.equal(fresh.head.weight, model.head.weight) and fresh.head.weight is fresh.wte.weight
