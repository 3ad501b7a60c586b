"""Algorithm 1 against the explicit product formula; float32 recursion accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dvemb
from dvemb.embed.layout import final_arrays
from dvemb.store import Store, to_torch


def train_recorded(path, *, steps: int, batch: int, dtype, projection_dim, d=10, lr=lambda t: 0.3 / (1 + 0.1 * t),
                   reduction="mean", seed=0, **recorder):
    """A small tanh MLP trained with SGD under the Recorder, varying batch sizes and lr (the paper's curvature
    and seeded projections unless ``recorder`` says otherwise)."""
    recorder = {"curvature": "gradient_outer", "projection": "gaussian", **recorder}
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 4)).to(dtype)
    n = steps * batch
    x, y = torch.randn(n, d, dtype=dtype), torch.randint(0, 4, (n,))
    with dvemb.Recorder(model, path, projection_dim=projection_dim, dtype=dtype, reduction=reduction, **recorder) as rec:
        start = 0
        for t in range(steps):
            b = batch - (t % 2)  # uneven batch sizes
            ids = list(range(start, start + b))
            start += b
            with rec.step(ids, lr=lr(t)):
                F.cross_entropy(model(x[ids]), y[ids], reduction=reduction).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= lr(t) * p.grad
            model.zero_grad()
    return model


def explicit_embeddings(store: Store, layer: int | list, until: int | None = None) -> torch.Tensor:
    """eta_t w_ti [prod_{k=t+1..T-1} (I - eta_k H_k)] g_ti with H_k = sum_i w_ki g_ki g_ki^T, term by term.

    ``until`` sets T (records of steps >= T are dropped): the embedding relative to theta_T.
    A list of layers concatenates them (one M for the block), each given as its index or as
    (index, S) for its rows sketched by a matrix S; stored curvature rows c replace g in
    H_k = sum_i w_ki sum_s c_kis c_kis^T.
    """
    block = [(i, None) if isinstance(i, int) else i for i in ([layer] if isinstance(layer, int) else layer)]
    T = store.n_steps if until is None else until
    n = int(store.step_starts[T])
    pick = lambda rows, sketch: rows.double() if sketch is None else rows.double() @ sketch.T  # noqa: E731
    g = torch.cat([pick(to_torch(store.grads(i), store.dtype), cols) for i, cols in block], 1).double()[:n]
    passes = store.curvature_passes
    c = (torch.cat([pick(to_torch(store.curvature(i), store.dtype).reshape(-1, passes, store.layers[i].dim), cols)
                    for i, cols in block], 2).double()[:n] if passes else g[:, None, :])
    rec = store.records[:n]
    steps, w, lr = rec["step"], torch.from_numpy(rec["weight"].copy()), torch.from_numpy(rec["lr"].copy())
    p = g.shape[1]
    eye = torch.eye(p, dtype=torch.float64)
    hessians = []
    for k in range(T):
        rows = torch.from_numpy(np.flatnonzero(steps == k))
        hessians.append(torch.einsum("r,rsp,rsq->pq", w[rows], c[rows], c[rows]))
    out = torch.empty_like(g)
    for r in range(len(g)):
        t = int(steps[r])
        prod = eye.clone()
        for k in range(t + 1, T):  # later steps multiply on the left
            eta_k = lr[np.flatnonzero(steps == k)[0]]
            prod = (eye - eta_k * hessians[k]) @ prod
        out[r] = lr[r] * w[r] * (prod @ g[r])
    return out


def plan_embeddings(store: Store, blocking: str) -> list[torch.Tensor]:
    """Each layer's embeddings under a blocking, from the product formula: per layer, one block, or the
    hierarchical plan's fine per-layer blocks plus the coarse global block minus the coarse per-layer ones."""
    from dvemb.embed.plan import hierarchical
    n = len(store.layers)
    if blocking == "layer":
        return [explicit_embeddings(store, i) for i in range(n)]
    if blocking == "global":
        return list(explicit_embeddings(store, list(range(n))).split([s.dim for s in store.layers], 1))
    plan = hierarchical(store, 6)
    sketches = [p.matrix(store.layers[p.layer].dim, torch.float64) for p in plan.parts[n:2 * n]]
    coarse = explicit_embeddings(store, list(enumerate(sketches))).split([len(s) for s in sketches], 1)
    return [explicit_embeddings(store, i) + (coarse[i] - explicit_embeddings(store, [(i, sketches[i])])) @ sketches[i]
            for i in range(n)]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("projection_dim, blocking", [(None, "layer"), (20, "layer"), (20, "global"),
                                                       (20, "hierarchical")])
def test_algorithm1_equals_product_formula(tmp_path, monkeypatch, reduction, projection_dim, blocking):
    train_recorded(tmp_path / "s", steps=7, batch=5, dtype=torch.float64, projection_dim=projection_dim,
                   reduction=reduction, lr=(lambda t: 0.3 / (1 + 0.1 * t)) if reduction == "mean" else lambda t: 0.05)
    monkeypatch.setattr(dvemb.embed.plan, "coarse_size", lambda dims, values, whole=0: 6)  # 6 coarse coordinates per layer
    info = dvemb.compute_embeddings(tmp_path / "s", blocking=blocking, show_progress=False)
    assert info.precision == "float64" and info.blocking == blocking
    store = Store(tmp_path / "s")
    arrays = final_arrays(store, "float64")
    wanted = plan_embeddings(store, blocking)
    for layer in range(len(store.layers)):
        got = torch.from_numpy(np.array(arrays[layer].read(store.n_records)))
        want = wanted[layer]
        # propagation must matter, or the test would not check the recursion
        assert (want - to_torch(store.grads(layer), "float64") * torch.from_numpy(
            store.records["lr"] * store.records["weight"])[:, None]).norm() > 1e-3 * want.norm()
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-8, atol=1e-8 * want.abs().max().item())


def test_float32_recursion_matches_float64(tmp_path):
    """Justifies float32 as the default for float32 stores: same input rows, 1e-5 relative difference."""
    train_recorded(tmp_path / "s", steps=120, batch=16, dtype=torch.float32, projection_dim=64, d=32)
    store = Store(tmp_path / "s")
    results = {}
    for precision in ("float64", "float32"):
        dvemb.compute_embeddings(tmp_path / "s", precision=precision, blocking="layer", show_progress=False)
        results[precision] = np.concatenate(
            [np.array(a.read(store.n_records), dtype=np.float64) for a in final_arrays(store, precision)], 1)
    diff = np.linalg.norm(results["float32"] - results["float64"]) / np.linalg.norm(results["float64"])
    assert diff < 1e-5, diff


def test_chunking_does_not_change_results(tmp_path):
    train_recorded(tmp_path / "s", steps=9, batch=6, dtype=torch.float64, projection_dim=None)
    store = Store(tmp_path / "s")
    outs = []
    for chunk_rows in (1, 11, 10_000):  # one step per chunk, a few steps, everything
        dvemb.compute_embeddings(tmp_path / "s", chunk_rows=chunk_rows, show_progress=False)
        outs.append(np.array(final_arrays(store, "float64")[0].read(store.n_records)))
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_default_chunks_are_bounded_in_bytes(tmp_path, monkeypatch):
    from dvemb.embed import recursion
    train_recorded(tmp_path / "s", steps=9, batch=6, dtype=torch.float64, projection_dim=None)
    store = Store(tmp_path / "s")
    row_bytes = sum(8 * spec.dim for spec in store.layers)
    assert recursion.rows_per_chunk(row_bytes, None) == recursion.CHUNK_BYTES // row_bytes
    assert recursion.rows_per_chunk(row_bytes, 5) == 5 and recursion.rows_per_chunk(10 ** 12, None) == 1
    dvemb.compute_embeddings(tmp_path / "s", show_progress=False)
    whole = np.array(final_arrays(store, "float64")[0].read(store.n_records))
    reads = []
    original = Store.iter_steps_backward

    def spy(self, arrays, chunk_rows, *args):
        reads.append(chunk_rows)
        return original(self, arrays, chunk_rows, *args)

    monkeypatch.setattr(Store, "iter_steps_backward", spy)
    monkeypatch.setattr(recursion, "CHUNK_BYTES", 3 * row_bytes)  # 3 records per chunk: about one step
    dvemb.compute_embeddings(tmp_path / "s", show_progress=False)
    assert reads == [3]
    np.testing.assert_array_equal(np.array(final_arrays(store, "float64")[0].read(store.n_records)), whole)


def test_iter_steps_backward_covers_every_step_once(tmp_path):
    train_recorded(tmp_path / "s", steps=9, batch=6, dtype=torch.float32, projection_dim=None)
    store = Store(tmp_path / "s")
    g = store.grads(0)
    seen = [(t, r0, r1) for t, r0, r1, _ in store.iter_steps_backward([g], chunk_rows=13)]
    assert [t for t, _, _ in seen] == list(range(8, -1, -1))
    starts = store.step_starts
    assert all(r0 == starts[t] and r1 == starts[t + 1] for t, r0, r1 in seen)
    assert store.n_records == starts[-1] == sum(6 - (t % 2) for t in range(9))
