"""Adam / AdamW with frozen second moments: the recursion against a forward simulation of the linearised run,
and the scores against retraining with torch.optim.Adam."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dvemb
from dvemb.embed.layout import final_arrays
from dvemb.sgd import AdamSettings
from dvemb.store import Store, to_torch
from retraining import against_retraining, tiny_recorded_run

SETTINGS = [dict(), dict(betas=(0.8, 0.99), eps=1e-6), dict(weight_decay=0.1, adamw=True)]


def train_with_adam(path, settings: dict, *, steps=7):
    """Adam (AdamW with ``adamw``) on a tiny MLP, exact gradients, lr 0.05 / (1 + 0.3 t)."""
    kind = torch.optim.AdamW if settings.pop("adamw", False) else torch.optim.Adam
    return tiny_recorded_run(path, lambda params: kind(params, lr=0.05, **settings), lambda t: 0.05 / (1 + 0.3 * t),
                             steps=steps)


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


def test_scores_follow_retraining_with_adamw(tmp_path):
    got = against_retraining(tmp_path / "s", lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01),
                             ignored={"adam": None})  # read as plain SGD
    print(f"\nAdamW: {got}")  # measured 0.988, scale 0.89; read as SGD 0.958, scale 23
    assert got.spearman >= 0.9 and got.spearman > got.ignored_spearman
    assert 0.7 < got.scale < 1.4


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
