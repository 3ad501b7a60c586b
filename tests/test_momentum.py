"""SGD with momentum, Nesterov, dampening and weight decay: the recursion against a forward simulation
of the linearised run, and the scores against retraining with each record removed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dvemb
from dvemb.embed.layout import final_arrays
from dvemb.update import SGD
from dvemb.store import Store, to_torch
from retraining import against_retraining, tiny_recorded_run

SETTINGS = [
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.8, dampening=0.5),
    dict(momentum=0.9, weight_decay=0.01),
    dict(weight_decay=0.05),
]


def train_with_sgd(path, sgd: dict, *, steps=6, projection_dim=None):
    """torch.optim.SGD (``sgd``'s settings) on a tiny MLP, lr 0.3 / (1 + 0.2 t)."""
    return tiny_recorded_run(path, lambda params: torch.optim.SGD(params, lr=0.3, **sgd), lambda t: 0.3 / (1 + 0.2 * t),
                             steps=steps, projection_dim=projection_dim)


def simulated_embeddings(store: Store, layer: int, until: int | None = None) -> torch.Tensor:
    """Per record, the change of theta_T when its gradient is dropped, simulated forward step by step.

    The linearised run: d_k = (H_k + lambda I) dtheta_k (+ the dropped -w g at the record's step),
    b_k = mu b_{k-1} + gamma_k d_k, dtheta_{k+1} = dtheta_k - eta_k (d_k + mu b_k if Nesterov else b_k).
    """
    sgd = store.config.update
    g = to_torch(store.grads(layer), store.dtype).double()
    rec = store.records
    steps, w, lr = rec["step"], rec["weight"], rec["lr"]
    T, p = store.n_steps if until is None else until, g.shape[1]
    hessians = [torch.einsum("r,rp,rq->pq", torch.from_numpy(w[steps == k].copy()), g[steps == k], g[steps == k])
                + sgd.weight_decay * torch.eye(p, dtype=torch.float64) for k in range(T)]
    eta = [float(lr[steps == k][0]) for k in range(T)]
    out = torch.zeros_like(g)  # records at or after T stay 0
    for r in range(int(store.step_starts[T])):
        theta, buf = torch.zeros(p, dtype=torch.float64), torch.zeros(p, dtype=torch.float64)
        for k in range(int(steps[r]), T):
            d = hessians[k] @ theta - (w[r] * g[r] if k == steps[r] else 0)
            if sgd.momentum:
                buf = sgd.momentum * buf + (1.0 if k == 0 and sgd.fresh else 1.0 - sgd.dampening) * d
                d = d + sgd.momentum * buf if sgd.nesterov else buf
            theta = theta - eta[k] * d
        out[r] = theta
    return out


@pytest.mark.parametrize("sgd", SETTINGS)
@pytest.mark.parametrize("projection_dim", [None, 12])
def test_recursion_equals_forward_simulation(tmp_path, sgd, projection_dim):
    train_with_sgd(tmp_path / "s", sgd, projection_dim=projection_dim)
    store = Store(tmp_path / "s")
    assert store.config.update == SGD(**sgd)
    dvemb.compute_embeddings(tmp_path / "s", blocking="layer", show_progress=False)
    for layer, arr in enumerate(final_arrays(store, "float64")):
        got = torch.from_numpy(np.array(arr.read(store.n_records)))
        want = simulated_embeddings(store, layer)
        # float64 throughout; the two orders of summation agree to round-off
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_layer_sharded_workers_equal_one_process(tmp_path):
    train_with_sgd(tmp_path / "s", dict(momentum=0.9))
    dvemb.compute_embeddings(tmp_path / "s", blocking="layer", show_progress=False)
    store = Store(tmp_path / "s")
    first = [np.array(a.read(store.n_records)) for a in final_arrays(store, "float64")]
    dvemb.compute_embeddings(tmp_path / "s", workers=2, blocking="layer", show_progress=False)  # layers split over 2 processes
    for a, b in zip(first, final_arrays(store, "float64")):
        np.testing.assert_array_equal(a, np.array(b.read(store.n_records)))


@pytest.mark.parametrize("sgd", SETTINGS[:4])
@pytest.mark.parametrize("blocking", ["layer", "global"])
def test_checkpoints_with_momentum(tmp_path, sgd, blocking):
    """Algorithm 2 composes segments through (theta, buffer): final embeddings equal Algorithm 1's, and a
    checkpoint's scores equal the forward simulation of the run cut at that checkpoint."""
    model = train_with_sgd(tmp_path / "s", sgd, steps=9, projection_dim=12)
    store = Store(tmp_path / "s")
    dvemb.compute_embeddings(tmp_path / "s", blocking=blocking, show_progress=False)
    single = [np.array(a.read(store.n_records)) for a in final_arrays(store, "float64")]
    dvemb.compute_embeddings(tmp_path / "s", checkpoints=[3, 6], blocking=blocking, workers=2, show_progress=False)
    for a, b in zip(single, final_arrays(store, "float64")):
        np.testing.assert_allclose(np.array(b.read(store.n_records)), a, rtol=1e-9, atol=1e-12)
    xt, yt = torch.randn(3, 10, dtype=torch.float64), torch.tensor([0, 1, 2])
    inf = dvemb.influence(tmp_path / "s", model, lambda: F.cross_entropy(model(xt), yt, reduction="none"),
                          checkpoint=1)  # relative to theta_6 (the model itself stands in for theta_6)
    assert inf.steps.max() == 5
    tests = per_layer_test_gradients(store, model, xt, yt)
    n = int(store.step_starts[6])
    if blocking == "layer":
        want = sum(t @ simulated_embeddings(store, layer, until=6).t() for layer, t in enumerate(tests))
        torch.testing.assert_close(torch.from_numpy(inf.scores), want[:, :n], rtol=1e-8, atol=1e-12)
    else:  # a global M couples the layers: compare with Algorithm 1 run on the store cut at step 6
        dvemb.compute_embeddings(tmp_path / "s", checkpoints=[6], blocking="global", show_progress=False)
        cut = dvemb.influence(tmp_path / "s", model, lambda: F.cross_entropy(model(xt), yt, reduction="none"),
                              checkpoint=0)
        np.testing.assert_allclose(inf.scores, cut.scores, rtol=1e-8, atol=1e-12)


def per_layer_test_gradients(store: Store, model: nn.Module, x, y) -> list[torch.Tensor]:
    """Projected per-example test gradients per layer (dvemb's own, checked against torch.func elsewhere)."""
    from dvemb.query import query_gradients
    grads, _ = query_gradients(store, model, lambda: F.cross_entropy(model(x), y, reduction="none"))
    return [g.double() for g in grads]


def test_optimizer_settings_are_read_and_checked(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "momentum": 0.9},
                           {"params": model[2].parameters(), "momentum": 0.5}], lr=0.1)
    with pytest.raises(ValueError, match="different momentum"):
        dvemb.Recorder(model, tmp_path / "a", optimizer=opt)
    with pytest.raises(ValueError, match="maximize"):
        dvemb.Recorder(model, tmp_path / "b", optimizer=torch.optim.SGD(model.parameters(), lr=0.1, maximize=True))
    with dvemb.Recorder(model, tmp_path / "c", optimizer=torch.optim.SGD(model.parameters(), lr=0.1,
                                                                         momentum=0.9, nesterov=True)) as rec:
        pass
    assert rec.path.joinpath("manifest.json").exists()
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["update"] == dict(kind="sgd", momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0,
                                      fresh=True)
    assert "update     SGD, momentum 0.9 (Nesterov)\n" in Store(tmp_path / "c").summary()


@pytest.mark.parametrize("sgd", [dict(momentum=0.9, weight_decay=1e-3), dict(momentum=0.9, nesterov=True)])
def test_scores_follow_retraining_and_beat_ignoring_momentum(tmp_path, sgd):
    # lr 0.01 x 1/(1 - 0.9) = 0.1 effective: first order holds (at 0.05, i.e. 0.5 effective, both fall to ~0.8)
    got = against_retraining(tmp_path / "s", lambda params: torch.optim.SGD(params, lr=0.01, **sgd),
                             ignored={"update": SGD().to_dict()})  # read as plain SGD, as earlier versions did
    print(f"\n{sgd}: {got}")
    # measured 0.994-0.997, scale 0.95-0.96; momentum ignored: 0.955-0.963, scale 4.2-4.6 (momentum amplifies a
    # gradient's effect up to 1 / (1 - mu) = 10x; records of the last 10 steps get part of it)
    assert got.spearman >= 0.95 and got.spearman > got.ignored_spearman
    assert 0.8 < got.scale < 1.25 and got.ignored_scale > 3


def test_a_no_decay_group_for_biases_takes_the_weights_decay_with_a_warning(tmp_path):
    """The HF Trainer's layout: weights decay, biases and norms do not. The layer's weights hold most
    elements, so their decay is applied (the biases' error is at most 1 - prod(1 - lr * decay))."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    weights = [m.weight for m in (model[0], model[2])]
    biases = [m.bias for m in (model[0], model[2])]
    opt = torch.optim.AdamW([{"params": weights, "weight_decay": 0.1}, {"params": biases, "weight_decay": 0.0}],
                            lr=1e-3)
    with pytest.warns(UserWarning, match=r"weight decays \[0.0, 0.1\]; the embeddings apply weight_decay=0.1"), \
            dvemb.Recorder(model, tmp_path / "a", optimizer=opt) as rec:
        pass
    assert rec.path.joinpath("manifest.json").exists()
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["update"]["weight_decay"] == 0.1
