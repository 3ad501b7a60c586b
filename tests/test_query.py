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
    dvemb.compute_embeddings(tmp_path / "s", blocking="layer", show_progress=False)
    x = torch.randn(4, 10)
    with dvemb.Recorder(model, tmp_path / "s", projection_dim=None, curvature="gradient_outer", mode="resume") as rec, \
            rec.step([100, 101, 102, 103], lr=0.1):
        F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long)).backward()
    with pytest.warns(UserWarning, match="cover 3 of 4 steps"):
        inf = dvemb.influence(tmp_path / "s", model,
                              lambda: F.cross_entropy(model(x), torch.ones(4, dtype=torch.long), reduction="none"))
    assert inf.scores.shape == (4, Store(tmp_path / "s").n_records) and inf.steps.max() == 3
    assert dvemb.embed.layout.embedding_info(Store(tmp_path / "s"))["blocking"] == "layer"  # the same options
    with pytest.raises(ValueError, match="other options than asked: blocking='global'"):
        dvemb.influence(tmp_path / "s", model, lambda: model(x).sum(1), blocking="global")


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


@pytest.mark.parametrize("checkpoint", [None, 0, 1])
def test_scorer_equals_streamed_queries(tmp_path, checkpoint):
    model = train_recorded(tmp_path / "s", steps=8, batch=6, dtype=torch.float64, projection_dim=16)
    xt, yt = torch.randn(4, 10, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    loss = lambda: F.cross_entropy(model(xt), yt, reduction="none")  # noqa: E731
    with dvemb.Scorer(tmp_path / "s", checkpoints=[3, 5]) as scorer:  # computes the embeddings
        assert dvemb.checkpoint_steps(tmp_path / "s") == [3, 5, 8]
        for _ in range(2):  # the second query reuses the mappings
            mapped = scorer.influence(model, loss, checkpoint=checkpoint, chunk_rows=7)
            top = scorer.top_k(model, loss, 3, checkpoint=checkpoint, chunk_rows=5)
            streamed = dvemb.influence(tmp_path / "s", model, loss, checkpoint=checkpoint)
            # float64 products of the same rows, chunked differently: a few ulps apart
            np.testing.assert_allclose(mapped.scores, streamed.scores, rtol=1e-12, atol=1e-15)
            np.testing.assert_array_equal(mapped.steps, streamed.steps)
            np.testing.assert_array_equal(mapped.sample_ids, streamed.sample_ids)
            want = streamed.top_k(3)
            np.testing.assert_array_equal(top.helpful.index, want.helpful.index)
            np.testing.assert_array_equal(top.harmful.sample_id, want.harmful.sample_id)
            np.testing.assert_allclose(top.harmful.score, want.harmful.score, rtol=1e-12)


def test_scorer_refuses_embeddings_recomputed_after_opening(tmp_path):
    model = train_recorded(tmp_path / "s", steps=6, batch=4, dtype=torch.float32, projection_dim=8)
    xt, yt = torch.randn(2, 10), torch.tensor([0, 1])
    loss = lambda: F.cross_entropy(model(xt), yt, reduction="none")  # noqa: E731
    scorer = dvemb.Scorer(tmp_path / "s")
    before_inf = scorer.influence(model, loss)
    before = before_inf.scores
    dvemb.compute_embeddings(tmp_path / "s", checkpoints=2, show_progress=False)
    with pytest.raises(dvemb.StoreError, match="recomputed since this Scorer was opened"):
        scorer.influence(model, loss)
    scorer.close()
    with dvemb.Scorer(tmp_path / "s") as fresh:  # the last checkpoint's embeddings are the final ones
        np.testing.assert_allclose(fresh.influence(model, loss).scores, before, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="k must be >= 1"):
        fresh.top_k(model, loss, 0)
    for bad in (2.5, True, "3"):
        with pytest.raises(TypeError, match="k must be an integer"):
            fresh.top_k(model, loss, bad)
        with pytest.raises(TypeError, match="k must be an integer"):
            dvemb.top_k(tmp_path / "s", model, loss, bad)
        with pytest.raises(TypeError, match="k must be an integer"):
            before_inf.top_k(bad)
    with pytest.warns(UserWarning, match="k=1000 exceeds the"):  # every record when k exceeds them, with a warning
        assert before_inf.top_k(np.int64(1000)).helpful.score.shape == before.shape
    with pytest.warns(UserWarning, match="k=1000 exceeds the"):
        assert dvemb.top_k(tmp_path / "s", model, loss, 1000).helpful.score.shape == before.shape


@pytest.mark.parametrize("spare_cpu", [True, False])  # read-ahead thread / one mapping per query
def test_streamed_sources_score_alike(tmp_path, monkeypatch, spare_cpu):
    model = train_recorded(tmp_path / "s", steps=8, batch=6, dtype=torch.float64, projection_dim=16)
    xt, yt = torch.randn(4, 10, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    loss = lambda: F.cross_entropy(model(xt), yt, reduction="none")  # noqa: E731
    with dvemb.Scorer(tmp_path / "s", checkpoints=[4]) as scorer:
        want = scorer.influence(model, loss, checkpoint=0)
    monkeypatch.setattr("dvemb.query.spare_cpu", lambda: spare_cpu)
    for chunk_rows in (None, 5):
        got = dvemb.influence(tmp_path / "s", model, loss, checkpoint=0, chunk_rows=chunk_rows)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-12, atol=1e-15)  # float64, other chunking
        top = dvemb.top_k(tmp_path / "s", model, loss, 2, checkpoint=0, chunk_rows=chunk_rows)
        np.testing.assert_array_equal(top.helpful.index, want.top_k(2).helpful.index)
