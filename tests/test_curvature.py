"""Curvature options and blocking: captured rows and the recursion against explicit formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

import dvemb
from dvemb.capture import curvature as curvature_module
from dvemb.capture import ghost as ghost_module
from dvemb.store import Store, to_torch
from reference import final_embeddings, per_sample_gradients
from test_recursion import explicit_embeddings


def tiny(path, curvature, samples=None, steps=1, batch=6, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(steps * batch, 5, dtype=torch.float64), torch.randint(0, 3, (steps * batch,))
    with dvemb.Recorder(model, path, dtype=torch.float64, curvature=curvature, curvature_samples=samples, **kw) as rec:
        for t in range(steps):
            ids = list(range(t * batch, (t + 1) * batch))
            with rec.step(ids, lr=0.3):
                F.cross_entropy(model(x[ids]), y[ids]).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.3 * p.grad
            model.zero_grad()
    return model, x, y


def ggn_check(path, samples, passes, truncate):
    """Rows of ``tiny``'s single step against J^T L J built from torch.func Jacobians, L = truncate(diag(p) - pp^T)."""
    store = Store(path)
    assert store.curvature_passes == passes
    torch.manual_seed(0)  # the single step saw theta_0: rebuild the initial model
    model0 = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(6, 5, dtype=torch.float64)  # same draws as in tiny()
    params = {k: v.detach() for k, v in model0.named_parameters()}

    def logits(p, xi):
        return functional_call(model0, p, (xi[None],))[0]

    jac = vmap(jacrev(logits), in_dims=(None, 0))(params, x)  # per sample: C x param shape
    probs = torch.softmax(model0(x), -1).detach()
    lam = truncate(torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :])
    for i, spec in enumerate(store.layers):
        name = spec.name
        j = torch.cat([jac[f"{name}.weight"].reshape(len(x), 3, -1).reshape(len(x), 3, spec.d_out, spec.d_in),
                       jac[f"{name}.bias"].reshape(len(x), 3, spec.d_out, 1)], -1).reshape(len(x), 3, -1)
        ggn = j.transpose(1, 2) @ lam @ j
        rows = to_torch(store.curvature(i), "float64").reshape(len(x), passes, -1)
        from_rows = rows.transpose(1, 2) @ rows
        # float64 throughout; eigh and the vectorised backward reorder sums: 1e-10 is ~1e6 ulps of margin
        torch.testing.assert_close(from_rows, ggn, rtol=1e-10, atol=1e-12)


def ritz_reference(lam, probs, k):
    """Independent Rayleigh-Ritz: basis matrix Q, Q^T L Q by matmuls, top-k Ritz pairs."""
    out = torch.zeros_like(lam)
    for b in range(lam.shape[0]):
        top = probs[b].topk(k).indices
        rest = probs[b].clone()
        rest[top] = 0
        q = torch.cat([torch.eye(lam.shape[1], dtype=lam.dtype)[:, top], (rest / rest.norm())[:, None]], 1)
        values, vecs = torch.linalg.eigh(q.t() @ lam[b] @ q)
        y = q @ vecs[:, -k:]
        out[b] = y @ torch.diag(values[-k:]) @ y.t()
    return out


def test_ggn_with_k_passes_is_its_leading_factors_and_a_random_sign_sum_of_the_others(tmp_path):
    tiny(tmp_path / "s", "ggn", samples=1)  # 3 classes, 1 pass: the two factors summed with random signs
    torch.manual_seed(0)
    model0 = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    probs = torch.softmax(model0(torch.randn(6, 5, dtype=torch.float64)), -1).detach()
    # the Recorder's sampler: seeded with seed=0, drawn once in the single step
    factors = curvature_module._ggn_factors(probs, 1, torch.Generator().manual_seed(0))
    ggn_check(tmp_path / "s", 1, 1, lambda lam: torch.einsum("kbc,kbd->bcd", factors, factors))


def test_ritz_factors_are_exact_when_the_unlikely_classes_tie_and_close_to_the_best_otherwise():
    for k in (1, 2, 3):
        top = [[0.4, 0.25, 0.15][:k], [0.3, 0.3, 0.2][:k]]
        probs = torch.tensor([t + [(1 - sum(t)) / (10 - k)] * (10 - k) for t in top], dtype=torch.float64)
        lam = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        values, vecs = torch.linalg.eigh(lam)
        v = curvature_module._ggn_factors(probs, k)
        best = (vecs[:, :, -k:] * values[:, None, -k:]) @ vecs[:, :, -k:].transpose(1, 2)
        torch.testing.assert_close(torch.einsum("kbc,kbd->bcd", v, v), best, rtol=0, atol=1e-12)
    torch.manual_seed(0)  # random probabilities: within 20% of the optimal rank-k error (measured 1-15%)
    probs = torch.softmax(torch.randn(50, 10, dtype=torch.float64) * 2, -1)
    lam = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    values, vecs = torch.linalg.eigh(lam)
    for k in (1, 2, 3):
        v = curvature_module._ggn_factors(probs, k)
        torch.testing.assert_close(torch.einsum("kbc,kbd->bcd", v, v), ritz_reference(lam, probs, k),
                                   rtol=0, atol=1e-12)
        best = (vecs[:, :, -k:] * values[:, None, -k:]) @ vecs[:, :, -k:].transpose(1, 2)
        err = (torch.einsum("kbc,kbd->bcd", v, v) - lam).norm() / (best - lam).norm()
        assert 1.0 <= err < 1.2, err


def test_exact_factors_are_the_cholesky_factor_with_classes_pivoted_by_probability():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(5, 7, dtype=torch.float64) * 2, -1)
    lam = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    factors = curvature_module._ggn_factors(probs, None)  # [C - 1, B, C]
    assert factors.shape == (6, 5, 7)
    for b in range(5):
        order = probs[b].argsort(descending=True)
        chol = torch.linalg.cholesky(lam[b][order][:, order][:6, :6])  # positive definite: rank C - 1
        # column j of the Cholesky factor is factor j on the first C - 1 sorted classes (float64 round-off)
        torch.testing.assert_close(factors[:, b][:, order][:, :6].t(), chol, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.einsum("kbc,kbd->bcd", factors, factors), lam, rtol=0, atol=1e-15)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_split_factors_keep_the_leading_ones_and_are_unbiased(k):
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(4, 6, dtype=torch.float64) * 2, -1)
    lam = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    generator = torch.Generator().manual_seed(1)
    draws = [curvature_module._ggn_factors(probs, k, generator) for _ in range(4000)]
    assert draws[0].shape == (k, 4, 6)
    torch.testing.assert_close(draws[0][: k - 1], curvature_module._ggn_factors(probs, None)[: k - 1], rtol=0, atol=0)
    mean = sum(torch.einsum("kbc,kbd->bcd", v, v) for v in draws) / len(draws)
    # Monte Carlo over 4000 sign draws: the cross terms' mean is ~1/sqrt(4000) = 1.6% of their size
    assert (mean - lam).abs().max() < 0.08 * lam.abs().max()
    assert (torch.einsum("kbc,kbd->bcd", draws[0], draws[0]) - lam).abs().max() > 1e-6  # one draw is not exact


def test_leading_factors_carry_most_of_the_curvature():
    """The k - 1 sequential factors kept exactly hold nearly as much of the trace as the k - 1 leading eigenvectors
    (the optimum), so little is left to the random-sign pass (measured: 95-99% of the optimum)."""
    torch.manual_seed(0)
    for temperature in (1.0, 3.0):
        probs = torch.softmax(torch.randn(200, 10, dtype=torch.float64) * temperature, -1)
        lam = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        values = torch.linalg.eigvalsh(lam).flip(-1)
        for k in (2, 3, 4):
            kept = curvature_module._ggn_factors(probs, None)[: k - 1].pow(2).sum((0, 2))
            assert (kept <= values[:, : k - 1].sum(-1) + 1e-12).all()  # no rank-(k-1) part holds more
            assert kept.sum() > 0.95 * values[:, : k - 1].sum()


def test_one_prediction_per_sample_gets_split_factors_from_the_recorders_generator():
    torch.manual_seed(0)
    logits = torch.randn(5, 6, dtype=torch.float64)
    labels = torch.randint(0, 6, (5,))
    probs = torch.softmax(logits, -1)
    grad = (probs - F.one_hot(labels, 6).double()) / 5  # mean cross-entropy: weight 1/5 per sample
    vectors = curvature_module.logit_gradients(logits, grad, "ggn", 3, torch.Generator().manual_seed(7), scale=2.0)
    want = curvature_module._ggn_factors(probs, 3, torch.Generator().manual_seed(7)) * 2.0 / 5 ** 0.5
    torch.testing.assert_close(vectors, want, rtol=1e-12, atol=1e-14)  # one pipeline, float64: round-off only


def test_fisher_rows_are_gradients_at_sampled_labels(tmp_path):
    tiny(tmp_path / "s", "fisher", samples=4)
    store = Store(tmp_path / "s")
    torch.manual_seed(0)
    model0 = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(6, 5, dtype=torch.float64)  # same draws as in tiny()
    names = [s.name for s in store.layers]
    per_class = [per_sample_gradients(model0, F.cross_entropy, x, torch.full((6,), c), names) for c in range(3)]
    rows = torch.cat([to_torch(store.curvature(i), "float64").reshape(6, 4, -1) for i in range(2)], 2) * 2  # *sqrt(4)
    candidates = torch.stack([torch.cat([pc[n].reshape(6, -1) for n in names], 1) for pc in per_class], 1)
    for i in range(6):
        for s in range(4):  # each pass's row is the gradient at one of the classes
            dist = (candidates[i] - rows[i, s]).norm(dim=1)
            assert dist.min() < 1e-10 * candidates[i].norm()


@pytest.mark.parametrize("curvature,blocking", [("ggn", "layer"), ("fisher", "global"), ("gradient_outer", "global"),
                                                ("ggn", "global")])
def test_recursion_with_curvature_rows_and_blocks_matches_product_formula(tmp_path, curvature, blocking):
    model, x, y = tiny(tmp_path / "s", curvature, samples=2 if curvature == "fisher" else None, steps=5, batch=4)
    dvemb.compute_embeddings(tmp_path / "s", blocking=blocking, step_rank=None, show_progress=False)
    store = Store(tmp_path / "s")
    got = final_embeddings(tmp_path / "s")
    blocks = [[0, 1]] if blocking == "global" else [[0], [1]]
    want = torch.cat([explicit_embeddings(store, b) for b in blocks], 1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    # Algorithm 2 with the same blocks agrees, and checkpoint queries work through block propagators
    dvemb.compute_embeddings(tmp_path / "s", blocking=blocking, checkpoints=[2], workers=1, step_rank=None,
                             show_progress=False)
    got2 = final_embeddings(tmp_path / "s")
    np.testing.assert_allclose(got2, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    xt, yt = torch.randn(2, 5, dtype=torch.float64), torch.tensor([0, 2])
    inf = dvemb.influence(tmp_path / "s", model, lambda: F.cross_entropy(model(xt), yt, reduction="none"),
                          checkpoint=0)
    tests = per_sample_gradients(model, F.cross_entropy, xt, yt, [s.name for s in store.layers])
    tg = torch.cat([tests[s.name].reshape(2, -1) for s in store.layers], 1)
    early = torch.cat([explicit_embeddings(store, b, until=2) for b in blocks], 1)
    np.testing.assert_allclose(inf.scores, (tg @ early.t()).numpy(), rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("blocking", ["layer", "global"])
def test_each_steps_curvature_is_cut_to_its_leading_eigenvectors(tmp_path, blocking):
    """step_rank=0.5: H_k replaced by its top-(B/2) eigenpart, built here by eigh of the explicit H_k."""
    tiny(tmp_path / "s", "ggn", samples=2, steps=5, batch=4)
    dvemb.compute_embeddings(tmp_path / "s", blocking=blocking, step_rank=0.5, show_progress=False)
    store = Store(tmp_path / "s")
    got = final_embeddings(tmp_path / "s")
    blocks = [[0, 1]] if blocking == "global" else [[0], [1]]
    rec = store.records
    steps, w, lr = rec["step"], torch.from_numpy(rec["weight"].copy()), torch.from_numpy(rec["lr"].copy())
    parts = []
    for block in blocks:
        g = torch.cat([to_torch(store.grads(i), "float64") for i in block], 1)
        c = torch.cat([to_torch(store.curvature(i), "float64").reshape(-1, 2, store.layers[i].dim) for i in block], 2)
        cut = []
        for k in range(store.n_steps):
            rows = np.flatnonzero(steps == k)
            h = torch.einsum("r,rsp,rsq->pq", w[rows], c[rows], c[rows])
            values, vectors = torch.linalg.eigh(h)
            cut.append(vectors[:, -2:] @ torch.diag(values[-2:]) @ vectors[:, -2:].T)  # B = 4 records: keep 2
        out = torch.empty_like(g)
        for r in range(len(g)):
            v = lr[r] * w[r] * g[r]
            for k in range(int(steps[r]) + 1, store.n_steps):
                v = v - float(lr[steps == k][0]) * cut[k] @ v
            out[r] = v
        parts.append(out)
    want = torch.cat(parts, 1).numpy()
    # eigh of a 4 x 4 Gram against eigh of the explicit curvature: float64 round-off
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12 * np.abs(want).max())


def test_curvature_options_are_validated(tmp_path):
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="curvature must be one of"):
        dvemb.Recorder(model, tmp_path / "a", curvature="hessian")
    single = nn.Linear(3, 1)
    with dvemb.Recorder(single, tmp_path / "c", curvature="ggn") as rec:
        with pytest.raises(ValueError, match=">= 2 classes"):
            with rec.step([0, 1], lr=0.1):
                single(torch.randn(2, 3)).sum().backward()


def test_curvature_without_batching_rules_falls_back_to_one_backward_per_pass(tmp_path, monkeypatch):
    tiny(tmp_path / "batched", "ggn")

    def unbatched(*args, **kwargs):
        raise RuntimeError("no batching rule")  # as vmap reports an unsupported operation

    monkeypatch.setattr(ghost_module, "_vmap", unbatched)
    tiny(tmp_path / "looped", "ggn")
    for i in range(2):  # same rows either way (float64: only summation order may differ)
        np.testing.assert_allclose(np.asarray(Store(tmp_path / "looped").curvature(i)),
                                   np.asarray(Store(tmp_path / "batched").curvature(i)), rtol=1e-12, atol=1e-14)


def test_vectorised_pullback_equals_torch_func_vmap_and_a_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.GELU(), nn.Linear(4, 3)).double()
    hidden = model[1](model[0](torch.randn(6, 5, dtype=torch.float64)))
    unused = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)  # does not reach the logits
    logits = model[2](hidden)
    vectors = torch.randn(4, 6, 3, dtype=torch.float64)
    got = ghost_module._output_gradients(logits, [hidden, logits, unused], vectors)
    assert got[2] is None

    def pullback(v):
        return torch.autograd.grad(logits, [hidden, logits], v, retain_graph=True)

    looped = [pullback(v) for v in vectors]
    for i in range(2):  # float64: the same products in another order at most
        torch.testing.assert_close(got[i], torch.stack([g[i] for g in looped]), rtol=1e-12, atol=1e-14)
    for g, w in zip(ghost_module._vmap(pullback, vectors), vmap(pullback)(vectors)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("groups", [1, 2])
def test_ggn_rows_of_a_cnn_match_the_class_sum_of_gradient_outer_products(tmp_path, groups):
    from test_capture import small_cnn
    model = small_cnn(groups=groups).double()
    x, y = torch.randn(3, 2, 5, 5, dtype=torch.float64), torch.randint(0, 5, (3,))
    model(x)
    params0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with dvemb.Recorder(model, tmp_path / "s", projection_dim=10, dtype=torch.float64, curvature="ggn",
                        curvature_samples=None) as rec:  # exact: C - 1 passes
        with rec.step(range(3), lr=0.1):
            F.cross_entropy(model(x), y).backward()
    model.load_state_dict(params0)  # nothing was updated, but be explicit: theta at the step
    store = Store(tmp_path / "s")
    probs = torch.softmax(model(x), -1).detach()
    names = [s.name for s in store.layers]
    # J^T (diag(p) - pp^T) J = sum_c p_c g(c) g(c)^T with g(c) the gradient at label c (independent of the eigen path)
    per_class = [per_sample_gradients(model, F.cross_entropy, x, torch.full((3,), c), names) for c in range(5)]
    for i, spec in enumerate(store.layers):
        p_in, p_out = spec.proj_in.matrix(torch.float64), spec.proj_out.matrix(torch.float64)
        g = torch.stack([(p_out @ pc[spec.name] @ p_in.t()).reshape(3, -1) for pc in per_class], 1)  # [B, C, dim]
        want = torch.einsum("bc,bcd,bce->bde", probs, g, g)
        rows = to_torch(store.curvature(i), "float64").reshape(3, store.curvature_passes, -1)
        torch.testing.assert_close(rows.transpose(1, 2) @ rows, want, rtol=1e-9, atol=1e-12)


def test_token_weights_are_read_off_the_loss_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (3, 5))
    labels[0, 3:] = -100  # padding: no weight
    weights = torch.rand(3, 5, dtype=torch.float64)
    losses = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    (grad,) = torch.autograd.grad((weights * losses).sum(), logits)
    got = curvature_module.token_weights(torch.softmax(logits.detach(), -1), grad)
    want = torch.where(labels == -100, 0.0, weights)
    # one division of float64 sums: round-off only
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("samples", [1, 2])
def test_sequence_factors_are_per_token_ritz_factors_with_random_signs(samples):
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, dtype=torch.float64)
    labels = torch.randint(0, 6, (2, 4))
    weights = torch.rand(2, 4, dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    grad = weights[..., None] * (probs - F.one_hot(labels, 6).double())
    vectors = curvature_module.logit_gradients(logits, grad, "ggn", samples, torch.Generator().manual_seed(1))
    assert vectors.shape == (samples, 2, 4, 6)
    factors = curvature_module._ggn_factors(probs.reshape(-1, 6), samples).reshape(samples, 2, 4, 6)
    ratio = vectors / (factors * weights.sqrt()[..., None])
    signs = ratio[..., 0]
    assert torch.allclose(signs.abs(), torch.ones_like(signs)), "each token's factor is multiplied by +-1"
    torch.testing.assert_close(ratio, signs[..., None].expand_as(ratio))
    assert (signs > 0).any() and (signs < 0).any()


def test_sequence_ggn_rows_are_unbiased_over_signs(tmp_path):
    """Averaged over sign draws, sum_s c c^T of a sequence sample equals sum over its tokens of J^T Lambda_k J."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).double()
    x, y = torch.randn(2, 3, 3, dtype=torch.float64), torch.randint(0, 5, (2, 3))
    draws = 400
    total = 0.0
    for seed in range(draws):
        with dvemb.Recorder(model, tmp_path / f"s{seed}", dtype=torch.float64, curvature="ggn", curvature_samples=4,
                            seed=seed) as rec:
            with rec.step([0, 1], lr=0.1):
                F.cross_entropy(model(x).transpose(1, 2), y).backward()
            model.zero_grad()
        rows = to_torch(Store(tmp_path / f"s{seed}").curvature(1), "float64").reshape(2, 4, -1)
        total = total + rows.transpose(1, 2) @ rows / draws
    hidden = torch.tanh(model[0](x)).detach()  # the last layer: J of the logits in [W | b] is I_C kron [h, 1]
    a = torch.cat([hidden, torch.ones(2, 3, 1, dtype=torch.float64)], -1)
    probs = torch.softmax(model(x), -1).detach()
    lam = torch.diag_embed(probs) - probs[..., :, None] * probs[..., None, :]  # exact: 4 = C - 1 factors per token
    want = torch.einsum("btoc,bti,btj->boicj", lam, a, a).reshape(2, 25, 25) / 3  # token mean: 1/3 each
    # Monte Carlo over signs: cross-token terms average out at ~1/sqrt(draws) of their size
    assert (total - want).abs().max() < 0.15 * want.abs().max()
    assert (total - want).abs().max() > 1e-6  # and the estimate is not exact (signs matter)
