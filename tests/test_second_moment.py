"""Adam's second moment on projected layers: the factors captured from torch's AdamW, and the recursion against
a forward simulation of the factored linearised run (embed/factored.py, update/adam.py WhitenedAdam)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dvemb
from dvemb.embed.factored import FactoredSecondMoment
from dvemb.embed.plan import hierarchical
from dvemb.store import Store, second_moment_factors, to_torch, whitening_factors, whitening_level
from reference import final_embeddings

STEPS, BATCH = 6, 5


def _run(path, warm: int = 0, **recorder):
    """A float64 tanh MLP trained with AdamW (``warm`` steps unrecorded, then STEPS) under a projecting Recorder;
    returns, per recorded step, the optimizer's moments before the step and the batch gradient (by parameter
    name)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x, y = torch.randn(STEPS * BATCH, 10, dtype=torch.float64), torch.randint(0, 4, (STEPS * BATCH,))
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    for t in range(warm):  # on the run's first batches, again
        F.cross_entropy(model(x[t * BATCH: (t + 1) * BATCH]), y[t * BATCH: (t + 1) * BATCH]).backward()
        opt.step()
        opt.zero_grad()
    seen = []
    options = {"projection_dim": 12, "projection": "gaussian", "curvature": "gradient_outer", **recorder}
    with dvemb.Recorder(model, path, dtype=torch.float64, optimizer=opt, **options) as rec:
        for t in range(STEPS):
            ids = list(range(t * BATCH, (t + 1) * BATCH))
            moments = {n: {k: v.clone() for k, v in opt.state[p].items() if k != "step"} if p in opt.state else {}
                       for n, p in model.named_parameters()}
            with rec.step(ids):
                F.cross_entropy(model(x[ids]), y[ids]).backward()
            seen.append((moments, {n: p.grad.clone() for n, p in model.named_parameters()}))
            opt.step()
            opt.zero_grad()
    return seen


def _coupling(moments: dict, grad: torch.Tensor, name: str, t: int, beta1=0.9, beta2=0.999, eps=1e-8):
    """rho_t = m_t d_t / (2 D_t sqrt(v_t) sqrt(1 - beta2^(t+1))) of one parameter, from torch's moments."""
    m = beta1 * moments.get("exp_avg", torch.zeros_like(grad)) + (1 - beta1) * grad
    v = beta2 * moments.get("exp_avg_sq", torch.zeros_like(grad)) + (1 - beta2) * grad ** 2
    c2 = (1 - beta2 ** (t + 1)) ** 0.5
    return m * grad / (2 * (v.sqrt() / c2 + eps) * v.sqrt() * c2)


@pytest.mark.parametrize("warm", [0, 3])  # 3: recording starts on an optimizer with state
def test_second_factors_are_the_leading_pair_of_adams_coupling(tmp_path, warm):
    seen = _run(tmp_path / "s", warm)
    store = Store(tmp_path / "s")
    assert store.config.second_factors and "second moment factored per layer" in store.summary()
    assert "factored" in dvemb.embed.coefficients.linearised_rule(store).describe()
    for i, spec in enumerate(store.layers):
        rows = store.second_factors(i)
        for t, (moments, grads) in enumerate(seen):
            count = t + warm  # the optimizer's own step
            rho = torch.cat([_coupling(moments[f"{spec.name}.weight"], grads[f"{spec.name}.weight"], spec.name, count),
                             _coupling(moments[f"{spec.name}.bias"], grads[f"{spec.name}.bias"], spec.name,
                                       count)[:, None]], 1)
            u, s, vh = torch.linalg.svd(rho.abs().sqrt())
            x, y, sign = second_moment_factors(rows[t], spec)
            assert sign == float(torch.sign(rho.sum()))
            # power iteration against the SVD: its error falls as (s2 / s1)^40, below 1e-8 for these gaps
            assert s[1] / s[0] < 0.6
            torch.testing.assert_close(torch.outer(x, y), s[0] * torch.outer(u[:, 0], vh[0]), rtol=1e-7, atol=1e-9)
            assert (x >= 0).all() and (y >= 0).all()
        np.testing.assert_array_equal(store.whitening(i), rows[:, : spec.d_out + spec.d_in + spec.bias])


def _operator(p_out, p_in, a, b):
    """P diag(a (x) b) P^+ for P = P_out (x) P_in, as a dense matrix (torch.kron: rows are k_out-major)."""
    p = torch.kron(p_out, p_in)
    return p @ torch.diag(torch.kron(a, b)) @ torch.linalg.pinv(p)


def simulated(store: Store) -> torch.Tensor:
    """Each record's change of the final whitened parameters, simulated forward step by step with dense matrices:
    x = rho_k dphi, dd = H~ x (- w g~ at the record's step), dmu = beta1 / rho_k dmu + (1 - beta1) dd,
    dnu = beta2 dnu + 2 (1 - beta2) D~ dd, dphi = a x - s dmu + Q~ dnu, with D~, Q~ the Kronecker operators of the
    stored factors (Q~ scaled by s sign; P^+ the pseudo-inverse of the Kronecker projection) and
    H~ = sum_i w_i g~_i g~_i^T."""
    adam, rec = store.config.update, store.records
    g = torch.cat([to_torch(store.grads(i), store.dtype) for i in range(len(store.layers))], 1)
    steps, w, lrs = rec["step"], torch.from_numpy(rec["weight"].copy()), rec["lr"]
    per_step = []
    for k in range(store.n_steps):
        eta = float(lrs[steps == k][0])
        s = eta / (1 - adam.beta1 ** (k + 1 + adam.initial_step))
        ratios, q, d = [], [], []
        for i, spec in enumerate(store.layers):
            white, second = store.whitening(i), store.second_factors(i)
            level = [whitening_level(row, spec) for row in white]
            ratios += [np.exp(level[k - 1] - level[k]) if k else 1.0] * spec.dim
            r, c = whitening_factors(white[k], spec)
            x, y, sign = second_moment_factors(second[k], spec)
            p_out, p_in = spec.proj_out.matrix(torch.float64), spec.proj_in.matrix(torch.float64)
            q.append(s * sign * _operator(p_out, p_in, x * r.exp(), y * c.exp()))
            d.append(_operator(p_out, p_in, x / r.exp(), y / c.exp()))
        rows = torch.from_numpy(np.flatnonzero(steps == k))
        h = torch.einsum("r,rp,rq->pq", w[rows], g[rows], g[rows])
        per_step.append((1 - eta * adam.weight_decay, s, torch.tensor(ratios), h, torch.block_diag(*q),
                         torch.block_diag(*d)))
    out = torch.empty_like(g)
    for n in range(len(g)):
        phi, mu, nu = (torch.zeros(g.shape[1], dtype=torch.float64) for _ in range(3))
        for k in range(int(steps[n]), store.n_steps):
            decay, s, ratio, h, q, d = per_step[k]
            x = ratio * phi
            dd = h @ x - (w[n] * g[n] if k == steps[n] else 0)
            mu = adam.beta1 / ratio * mu + (1 - adam.beta1) * dd
            nu = adam.beta2 * nu + 2 * (1 - adam.beta2) * d @ dd
            phi = decay * x - s * mu + q @ nu
        out[n] = phi
    return out


@pytest.mark.parametrize("checkpoints, warm", [(None, 0), ([2, 4], 0), (None, 3)])
def test_recursion_follows_the_factored_second_moment(tmp_path, checkpoints, warm):
    _run(tmp_path / "s", warm)
    store = Store(tmp_path / "s")
    dvemb.compute_embeddings(tmp_path / "s", blocking="global", checkpoints=checkpoints, step_rank=None,
                             show_progress=False)
    got = torch.from_numpy(final_embeddings(tmp_path / "s"))
    want = simulated(store)
    assert want.abs().max() > 0
    # float64 throughout; the backward recursion and the forward simulation sum in other orders: round-off only
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12 * float(want.abs().max()))


def test_sketched_parts_hold_v_fixed(tmp_path):
    """A hierarchical plan's coarse parts (S z of a layer's coordinates z) get no operators; whole parts in the same
    block keep theirs: P diag(.) P^+ Kronecker products, against dense matrices."""
    _run(tmp_path / "s")
    store = Store(tmp_path / "s")
    plan = hierarchical(store, q=5)
    sketched = [p for p in plan.parts if p.sketch is not None]
    assert sketched and not FactoredSecondMoment(store, sketched, torch.float64, None)
    mixed = [plan.parts[0], sketched[0]]
    t, s = 3, 0.7
    ops = FactoredSecondMoment(store, mixed, torch.float64, None).at(t, s)
    spec = store.layers[mixed[0].layer]
    x = torch.randn(4, spec.dim + sketched[0].sketch, dtype=torch.float64)
    r, c = whitening_factors(store.whitening(mixed[0].layer)[t], spec)
    fx, fy, sign = second_moment_factors(store.second_factors(mixed[0].layer)[t], spec)
    p_out, p_in = spec.proj_out.matrix(torch.float64), spec.proj_in.matrix(torch.float64)
    whole = slice(0, spec.dim)
    for name, m in (("second", s * sign * _operator(p_out, p_in, fx * r.exp(), fy * c.exp())),
                    ("gradient", _operator(p_out, p_in, fx / r.exp(), fy / c.exp()))):
        # float64 products of a few small matrices in another order: round-off only
        torch.testing.assert_close(ops[name](x)[:, whole], x[:, whole] @ m, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ops[name].transposed(x)[:, whole], x[:, whole] @ m.T, rtol=1e-9, atol=1e-12)
        assert not ops[name](x)[:, spec.dim:].any() and not ops[name].transposed(x)[:, spec.dim:].any()


def test_second_moment_can_be_frozen(tmp_path):
    """``second_moment="frozen"`` drops v's path (its equality with the adjoint is in test_adjoint); it is recorded
    in the plan, keeps no v buffer in Algorithm 2's files, composes like Algorithm 1, and `dvemb embed` takes it."""
    from dvemb.cli import main
    from dvemb.embed.layout import SEGMENTS_DIR, embedding_info, embedding_plan, embeddings_dir

    _run(tmp_path / "s")
    store = Store(tmp_path / "s")
    dvemb.compute_embeddings(tmp_path / "s", blocking="global", show_progress=False)
    followed = final_embeddings(tmp_path / "s")
    dvemb.compute_embeddings(tmp_path / "s", blocking="global", second_moment="frozen", checkpoints=[2, 4],
                             show_progress=False)
    assert embedding_plan(embedding_info(store)).second_moment == "frozen"
    assert "second moment held fixed" in Store(tmp_path / "s").summary()
    assert not list((embeddings_dir(store) / SEGMENTS_DIR).glob("*exp_avg_sq*"))
    frozen = final_embeddings(tmp_path / "s")
    assert np.abs(frozen - followed).max() > 1e-3 * np.abs(followed).max()
    assert main(["embed", str(tmp_path / "s"), "--blocking", "global", "--second-moment", "frozen",
                 "--no-progress"]) == 0
    # one segment against three composed, float64: round-off only
    np.testing.assert_allclose(final_embeddings(tmp_path / "s"), frozen, rtol=1e-9, atol=1e-12 * np.abs(frozen).max())
    with pytest.raises(ValueError, match="second_moment must be one of"):
        dvemb.compute_embeddings(tmp_path / "s", second_moment="none", show_progress=False)


def test_hierarchical_plan_keeps_v_only_on_blocks_where_it_moves(tmp_path):
    """Under a hierarchical plan the whole layers' blocks follow v (three propagator matrices); the coarse,
    sketched blocks hold it fixed, so they keep two. Algorithm 2 composes both kinds to Algorithm 1's result."""
    from dvemb.embed.layout import embedding_info, embedding_plan, propagator_arrays

    _run(tmp_path / "s")
    store = Store(tmp_path / "s")
    dvemb.compute_embeddings(tmp_path / "s", blocking="hierarchical", step_rank=None, show_progress=False)
    whole = final_embeddings(tmp_path / "s")
    dvemb.compute_embeddings(tmp_path / "s", blocking="hierarchical", step_rank=None, checkpoints=[2, 4],
                             show_progress=False)
    # float64; three segments composed against one: round-off only
    np.testing.assert_allclose(final_embeddings(tmp_path / "s"), whole, rtol=1e-9, atol=1e-12 * np.abs(whole).max())
    plan = embedding_plan(embedding_info(store))
    sides = [np.load(a.path, mmap_mode="r").shape[1] for a in propagator_arrays(store, plan, "float64")]
    widths = [sum(plan.parts[i].width(store) for i in block) for block in plan.blocks]
    coarse = [all(plan.parts[i].sketch is not None for i in block) for block in plan.blocks]
    assert any(coarse) and not all(coarse)
    assert sides == [(2 if c else 3) * w for c, w in zip(coarse, widths)]
