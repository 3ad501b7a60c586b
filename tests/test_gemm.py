"""Scoring products (oneDNN or torch.mm) against float64 products, with a rounding-error bound."""

from __future__ import annotations

import pytest
import torch

from dvemb import gemm


def assert_within_rounding(got: torch.Tensor, tests: torch.Tensor, rows: torch.Tensor) -> None:
    """|got - exact| <= gamma_K |tests| |rows|^T: the bound of any float32 summation order of K products."""
    k, u = tests.shape[1], 2.0 ** -24
    gamma = k * u / (1 - k * u)
    exact = tests.double() @ rows.double().t()
    bound = gamma * (tests.double().abs() @ rows.double().abs().t())
    assert got.shape == exact.shape and got.dtype == tests.dtype
    assert bool(((got.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("n_test", [1, 3, 40])
@pytest.mark.parametrize("onednn", [True, False])
def test_rows_product_is_a_float32_product(n_test, onednn):
    torch.manual_seed(n_test)
    tests, rows = torch.randn(n_test, 700), torch.randn(300, 700)  # 210,000 elements: oneDNN's size
    assert rows.numel() >= gemm.ONEDNN_MIN_ELEMENTS
    assert_within_rounding(gemm.rows_product(tests, rows, onednn=onednn), tests, rows)


@pytest.mark.skipif(not gemm.onednn_available(), reason="torch built without oneDNN")
def test_onednn_and_mm_agree_to_rounding():
    torch.manual_seed(0)
    tests, rows = torch.randn(5, 1024), torch.randn(200, 1024)
    a, b = gemm.rows_product(tests, rows), gemm.rows_product(tests, rows, onednn=False)
    # both within gamma_K |t||r| of the exact product, so within twice that of each other
    k = 1024
    bound = 2 * k * 2.0 ** -24 / (1 - k * 2.0 ** -24) * (tests.abs() @ rows.abs().t())
    assert bool(((a - b).abs() <= bound).all())


def test_small_float64_and_strided_products_use_torch():
    torch.manual_seed(1)
    tests = torch.randn(2, 9, dtype=torch.float64)
    rows = torch.randn(9, 4, dtype=torch.float64).t()  # not contiguous
    torch.testing.assert_close(gemm.rows_product(tests, rows), tests @ rows.t(), rtol=0, atol=0)
    t32, r32 = torch.randn(3, 1000), torch.randn(1000, 300).t()  # large but strided: torch.mm
    assert_within_rounding(gemm.rows_product(t32, r32), t32, r32)


def test_scores_sum_over_layers():
    torch.manual_seed(2)
    tests = [torch.randn(4, 300), torch.randn(4, 500)]
    rows = [torch.randn(250, 300), torch.randn(250, 500)]
    got = gemm.scores(tests, rows)
    # the concatenated product: one K = 800 sum, whose rounding bound covers the two partial sums and their addition
    assert_within_rounding(got, torch.cat(tests, 1), torch.cat(rows, 1))


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("dims", [(64, 300, 300), (16, 400, 200)])  # (B, p, q): square M as in the recursion, and not
def test_add_outer_is_a_float32_rank_update(onednn, dims):
    batch, p, q = dims
    torch.manual_seed(batch)
    m, e, g = torch.randn(p, q), torch.randn(batch, p), torch.randn(batch, q)
    assert m.numel() >= gemm.ONEDNN_MIN_ELEMENTS and 2 * m.numel() * 4 <= gemm.last_level_cache_bytes()
    want = m.double() + e.double().t() @ g.double()
    gemm.add_outer(m, e, g, onednn=onednn)
    # the B-term product (gamma_B |e|^T |g|) plus the final addition's rounding (u |M + E^T G|)
    k, u = batch, 2.0 ** -24
    bound = k * u / (1 - k * u) * (e.double().abs().t() @ g.double().abs()) + u * want.abs()
    assert bool(((m.double() - want).abs() <= 2 * bound).all())  # x2: the sum of two rounded values rounds once more


def test_last_level_cache_is_read_or_defaulted():
    size = gemm.last_level_cache_bytes()
    assert size >= 256 << 10  # any real last-level cache, or the 8 MiB default
