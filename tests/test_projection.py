"""Projection matrices: seeds, budget split, never projecting up, scaling."""

from __future__ import annotations

import pytest
import torch

from dvemb.projection import FactorProjection, derive_seed, layer_projections, split_budget


def test_budget_split_never_projects_up_and_fits_the_budget():
    assert split_budget(785, 512, None) == (785, 512)
    assert split_budget(11, 10, 1024) == (11, 10)  # whole layer fits: exact
    assert split_budget(129, 10, 1024) == (129, 10)  # 1,290 values, within 2 x 1024: kept exact
    assert split_budget(129, 16, 1024) == (64, 16)  # 2,064 values: projected
    for d_in, d_out, budget in [(785, 512, 1024), (257, 10, 1024), (65, 10, 256), (4097, 4096, 4096), (3, 900, 64)]:
        k_in, k_out = split_budget(d_in, d_out, budget)
        assert 1 <= k_in <= d_in and 1 <= k_out <= d_out and k_in * k_out <= budget
        assert k_in * k_out >= budget // 2  # most of the budget is used
    assert split_budget(257, 10, 1024) == (102, 10)  # small side kept exact, rest to the other
    assert split_budget(785, 512, 1024) == (32, 32)  # balanced
    assert split_budget(3, 900, 64) == (3, 21)


def test_seeds_differ_per_layer_and_factor_and_are_stable():
    p_in, p_out = layer_projections("fc1", 100, 100, 64, seed=0, kind="gaussian")
    q_in, _ = layer_projections("fc2", 100, 100, 64, seed=0, kind="gaussian")
    assert len({p_in.seed, p_out.seed, q_in.seed}) == 3
    assert p_in.seed == derive_seed(0, "fc1", "in")  # regenerated identically at query time
    assert torch.equal(p_in.matrix(), FactorProjection(**p_in.to_dict()).matrix())


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "orthogonal"])
def test_projection_preserves_inner_products_on_average(kind):
    # E[P^T P] = I for every kind; averaged over 200 seeds the deviation is ~1/sqrt(200 k)
    d, k = 40, 10
    mean = sum(FactorProjection(d, k, s, kind).matrix(torch.float64).t() @ FactorProjection(d, k, s, kind).matrix(
        torch.float64) for s in range(200)) / 200
    assert (mean - torch.eye(d, dtype=torch.float64)).abs().max() < 0.15


def test_orthogonal_rows_are_orthogonal():
    m = FactorProjection(30, 8, 3, "orthogonal").matrix(torch.float64)
    torch.testing.assert_close(m @ m.t(), torch.eye(8, dtype=torch.float64) * 30 / 8)


def test_invalid_projection_sizes():
    with pytest.raises(ValueError):
        FactorProjection(10, 11, 0, "gaussian")
    with pytest.raises(ValueError):
        FactorProjection(10, 5, 0, "sparse")
