"""Adam / AdamW with frozen second moments: the recursion against a forward simulation of the linearised run,
and the scores against retraining with torch.optim.Adam."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dvemb
from dvemb.embed.layout import final_arrays
from dvemb.evaluate.metrics import spearman
from dvemb.sgd import AdamSettings
from dvemb.store import Store, to_torch
from test_momentum import _digits_run

SETTINGS = [dict(), dict(betas=(0.8, 0.99), eps=1e-6), dict(weight_decay=0.1, adamw=True)]


def train_with_adam(path, settings: dict, *, steps=7, batch=5, d=10):
    """A small tanh MLP trained by Adam (AdamW with ``adamw``) under a Recorder that reads the optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x, y = torch.randn(steps * batch, d, dtype=torch.float64), torch.randint(0, 4, (steps * batch,))
    kind = torch.optim.AdamW if settings.pop("adamw", False) else torch.optim.Adam
    opt = kind(model.parameters(), lr=0.05, **settings)
    with dvemb.Recorder(model, path, dtype=torch.float64, optimizer=opt) as rec:  # exact gradients
        for t in range(steps):
            opt.param_groups[0]["lr"] = 0.05 / (1 + 0.3 * t)
            ids = list(range(t * batch, (t + 1) * batch))
            with rec.step(ids):
                F.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step()
            opt.zero_grad()
    return model


def simulated_embeddings(store: Store, layer: int) -> torch.Tensor:
    """Per record, the change of theta_T when its gradient is dropped, simulated forward with v frozen:
    d = H dtheta (- w g at the record's step), m = beta1 m + (1 - beta1) d,
    dtheta = (1 - eta lambda) dtheta - eta / (1 - beta1^(k+1)) / (sqrt(v_k / (1 - beta2^(k+1))) + eps) m."""
    adam = store.config.adam
    g = to_torch(store.grads(layer), store.dtype).double()
    rec = store.records
    steps, w, lr = rec["step"], torch.from_numpy(rec["weight"].copy()), rec["lr"]
    T, p = store.n_steps, g.shape[1]
    v, hessians, scale = torch.zeros(p, dtype=torch.float64), [], []
    for k in range(T):
        rows = torch.from_numpy(np.flatnonzero(steps == k))
        hessians.append(torch.einsum("r,rp,rq->pq", w[rows], g[rows], g[rows]))
        batch_gradient = w[rows] @ g[rows]
        v = adam.beta2 * v + (1 - adam.beta2) * batch_gradient ** 2
        eta = float(lr[steps == k][0])
        scale.append(eta / (1 - adam.beta1 ** (k + 1)) / ((v / (1 - adam.beta2 ** (k + 1))).sqrt() + adam.eps))
    eta = [float(lr[steps == k][0]) for k in range(T)]
    out = torch.empty_like(g)
    for r in range(len(g)):
        theta, m = torch.zeros(p, dtype=torch.float64), torch.zeros(p, dtype=torch.float64)
        for k in range(int(steps[r]), T):
            d = hessians[k] @ theta - (w[r] * g[r] if k == steps[r] else 0)
            m = adam.beta1 * m + (1 - adam.beta1) * d
            theta = (1 - eta[k] * adam.weight_decay) * theta - scale[k] * m
        out[r] = theta
    return out


@pytest.mark.parametrize("settings", SETTINGS)
def test_recursion_equals_forward_simulation(tmp_path, settings):
    train_with_adam(tmp_path / "s", dict(settings))
    store = Store(tmp_path / "s")
    assert store.config.adam is not None and "second moments frozen" in store.summary()
    dvemb.compute_embeddings(tmp_path / "s", show_progress=False)
    single = [np.array(a.read(store.n_records)) for a in final_arrays(store, "float64")]
    for layer, got in enumerate(single):
        # float64 throughout; the two orders of summation agree to round-off
        torch.testing.assert_close(torch.from_numpy(got), simulated_embeddings(store, layer), rtol=1e-9, atol=1e-12)
    dvemb.compute_embeddings(tmp_path / "s", checkpoints=[2, 5], workers=2, show_progress=False)
    for a, b in zip(single, final_arrays(store, "float64")):  # Algorithm 2 composes through (theta, m)
        np.testing.assert_allclose(np.array(b.read(store.n_records)), a, rtol=1e-9, atol=1e-12)


def _train(x, y, batches, settings: dict, lr: float, removed=None, rec=None) -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, **settings)
    recorder = rec(model, opt) if rec else None
    for t, ids in enumerate(batches):
        w = torch.full((len(ids),), 1.0 / len(ids), dtype=torch.float64)
        if removed is not None and removed[0] == t:
            w[ids.index(removed[1])] = 0.0
        if recorder is None:
            (w * F.cross_entropy(model(x[ids]), y[ids], reduction="none")).sum().backward()
        else:
            with recorder.step(ids):
                F.cross_entropy(model(x[ids]), y[ids]).backward()
        opt.step()
        opt.zero_grad()
    if recorder is not None:
        recorder.close()
    return model


def test_scores_follow_retraining_with_adamw(tmp_path):
    x, y, xv, yv, batches = _digits_run()
    settings, lr = dict(weight_decay=0.01), 1e-3
    model = _train(x, y, batches, settings, lr, rec=lambda m, o: dvemb.Recorder(m, tmp_path / "s", optimizer=o,
                                                                                dtype=torch.float64))
    loss = lambda m: F.cross_entropy(m(xv), yv)  # noqa: E731
    base = float(loss(model).detach())
    inf = dvemb.influence(tmp_path / "s", model, lambda: F.cross_entropy(model(xv), yv, reduction="none"))
    chosen = np.random.default_rng(0).choice(np.flatnonzero(inf.steps >= len(batches) - 10), 30, replace=False)
    truth = np.array([float(loss(_train(x, y, batches, settings, lr, (int(inf.steps[r]), int(inf.sample_ids[r]))))
                            .detach()) - base for r in chosen])
    manifest_path = tmp_path / "s" / "manifest.json"  # the same store read as plain SGD
    manifest = json.loads(manifest_path.read_text())
    manifest["adam"] = None
    manifest_path.write_text(json.dumps(manifest))
    dvemb.compute_embeddings(tmp_path / "s", show_progress=False)
    naive = dvemb.influence(tmp_path / "s", model, lambda: F.cross_entropy(model(xv), yv, reduction="none"))
    estimate, ignored = inf.scores.mean(axis=0)[chosen], naive.scores.mean(axis=0)[chosen]
    slope = lambda e: float(e @ truth / (e @ e))  # noqa: E731
    print(f"\nAdamW: Spearman vs retraining {spearman(estimate, truth):.3f}, scale {slope(estimate):.3f} "
          f"(read as SGD: {spearman(ignored, truth):.3f}, scale {slope(ignored):.3f})")
    assert spearman(estimate, truth) >= 0.9 and spearman(estimate, truth) > spearman(ignored, truth)
    assert 0.7 < slope(estimate) < 1.4


def test_adam_settings_that_cannot_be_followed_fall_back_with_a_warning(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    for opt, why in [(torch.optim.Adam(model.parameters(), weight_decay=0.1), "use AdamW"),
                     (torch.optim.Adam(model.parameters(), amsgrad=True), "amsgrad")]:
        with pytest.warns(UserWarning, match=why):
            with dvemb.Recorder(model, tmp_path / why.replace(" ", "_"), optimizer=opt) as rec:
                pass
        assert Store(rec.path).config.adam is None
    with dvemb.Recorder(model, tmp_path / "ok", optimizer=torch.optim.AdamW(model.parameters(), betas=(0.8, 0.9))):
        pass
    assert Store(tmp_path / "ok").config.adam == AdamSettings(0.8, 0.9, 1e-8, 0.01)


def test_projected_layers_get_one_preconditioner_per_layer_and_step(tmp_path):
    from dvemb.embed.recursion import adam_preconditioners
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x, y = torch.randn(20, 10, dtype=torch.float64), torch.randint(0, 4, (20,))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    with pytest.warns(UserWarning, match="one per layer and step"):
        rec = dvemb.Recorder(model, tmp_path / "s", projection_dim=12, dtype=torch.float64, optimizer=opt)
    with rec:
        for t in range(4):
            with rec.step(range(5 * t, 5 * t + 5)):
                F.cross_entropy(model(x[5 * t:5 * t + 5]), y[5 * t:5 * t + 5]).backward()
            opt.step()
            opt.zero_grad()
    store = Store(tmp_path / "s")
    got = adam_preconditioners(store, [0], 1, 4, torch.float64)  # steps 1..3 of layer 0
    spec, adam = store.layers[0], store.config.adam
    g = to_torch(store.grads(0), "float64").reshape(4, 5, -1)
    v = 0.0
    for t in range(4):  # v of the layer: EMA of the batch gradient's mean square, ||projected||^2 / (d_out (d_in + 1))
        batch = g[t].mean(0)
        v = adam.beta2 * v + (1 - adam.beta2) * float(batch @ batch) / (spec.d_out * (spec.d_in + 1))
        if t >= 1:
            want = 0.01 / (1 - adam.beta1 ** (t + 1)) / (np.sqrt(v / (1 - adam.beta2 ** (t + 1))) + adam.eps)
            torch.testing.assert_close(got[t - 1], torch.full((spec.dim,), want, dtype=torch.float64))
