"""Scores against an explicit computation; Influence helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dvemb
from dvemb.embed.layout import final_arrays
from dvemb.store import Store
from reference import per_sample_gradients, project
from test_recursion import train_recorded


def test_scores_are_test_gradient_dot_embedding(tmp_path):
    model = train_recorded(tmp_path / "s", steps=6, batch=5, dtype=torch.float64, projection_dim=12)
    xt, yt = torch.randn(3, 10, dtype=torch.float64), torch.tensor([0, 1, 3])
    inf = dvemb.influence(tmp_path / "s", model, lambda: F.cross_entropy(model(xt), yt, reduction="none"))
    store = Store(tmp_path / "s")
    names = [s.name for s in store.layers]
    tests = per_sample_gradients(model, F.cross_entropy, xt, yt, names)
    want = sum(
        project(spec, tests[spec.name]) @ torch.from_numpy(np.array(arr.read(store.n_records))).t()
        for spec, arr in zip(store.layers, final_arrays(store, "float64")))
    np.testing.assert_allclose(inf.scores, want.numpy(), rtol=1e-10, atol=1e-14)
    assert inf.scores.shape == (3, store.n_records)
    np.testing.assert_array_equal(inf.steps, store.records["step"])
    np.testing.assert_array_equal(inf.sample_ids, store.records["sample_id"])
    assert all(p.grad is None for p in model.parameters())  # querying leaves .grad untouched


def test_by_sample_and_top_k():
    scores = np.array([[0.5, -1.0, 2.0, 0.1], [-0.2, 0.3, -0.4, 1.0]])
    inf = dvemb.Influence(scores, steps=np.array([0, 0, 1, 1]), sample_ids=np.array([7, 3, 7, 5]))
    ids, summed = inf.by_sample()
    assert ids.tolist() == [3, 5, 7]
    np.testing.assert_allclose(summed, [[-1.0, 0.1, 2.5], [0.3, 1.0, -0.6]])
    top = inf.top_k(2)
    assert top.helpful.index.tolist() == [[2, 0], [3, 1]]
    assert top.helpful.sample_id.tolist() == [[7, 7], [5, 3]]
    assert top.helpful.step.tolist() == [[1, 0], [1, 0]]
    assert top.harmful.index.tolist() == [[1, 3], [2, 0]]
    np.testing.assert_allclose(top.harmful.score, [[-1.0, 0.1], [-0.4, -0.2]])
    assert inf.top_k(10).helpful.index.shape == (2, 4)


def test_stale_embeddings_are_recomputed(tmp_path):
    model = train_recorded(tmp_path / "s", steps=3, batch=4, dtype=torch.float32, projection_dim=None)
    dvemb.compute_embeddings(tmp_path / "s", show_progress=False)
    x = torch.randn(4, 10)
    with dvemb.Recorder(model, tmp_path / "s") as rec, rec.step([100, 101, 102, 103], lr=0.1):
        F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long)).backward()
    inf = dvemb.influence(tmp_path / "s", model, lambda: F.cross_entropy(model(x), torch.ones(4, dtype=torch.long),
                                                                           reduction="none"))
    assert inf.scores.shape == (4, Store(tmp_path / "s").n_records) and inf.steps.max() == 3


def test_loss_closure_must_be_per_example(tmp_path):
    model = train_recorded(tmp_path / "s", steps=2, batch=4, dtype=torch.float32, projection_dim=None)
    x, y = torch.randn(4, 10), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="1-D tensor of per-example losses"):
        dvemb.influence(tmp_path / "s", model, lambda: F.cross_entropy(model(x), y))


@pytest.mark.parametrize("checkpoint", [None, 0])
def test_streaming_top_k_equals_top_k_of_full_scores(tmp_path, checkpoint):
    model = train_recorded(tmp_path / "s", steps=8, batch=6, dtype=torch.float64, projection_dim=16)
    dvemb.compute_embeddings(tmp_path / "s", checkpoints=[5], show_progress=False)
    xt, yt = torch.randn(4, 10, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    loss = lambda: F.cross_entropy(model(xt), yt, reduction="none")  # noqa: E731
    full = dvemb.influence(tmp_path / "s", model, loss, checkpoint=checkpoint).top_k(3)
    streamed = dvemb.top_k(tmp_path / "s", model, loss, 3, checkpoint=checkpoint, chunk_rows=7)  # many chunks
    for a, b in ((full.helpful, streamed.helpful), (full.harmful, streamed.harmful)):
        np.testing.assert_array_equal(a.index, b.index)
        np.testing.assert_array_equal(a.sample_id, b.sample_id)
        np.testing.assert_array_equal(a.step, b.step)
        np.testing.assert_allclose(a.score, b.score, rtol=1e-12)
