"""`dvemb evaluate ablation`: its cells on the MLP run and on the language-model fidelity study's run (--lm)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from dvemb.capture.curvature import logit_gradients, logits_of
from dvemb.cli import main
from dvemb.evaluate.baselines import exact_first_order
from dvemb.evaluate.fidelity import _mean_loss
from dvemb.evaluate.functions import RunFunctions, layer_projections, spec_projections
from dvemb.evaluate.recorded import record_run
from dvemb.evaluate.replay import train
from dvemb.store import Store
from dvemb.studies.ablation import CURVATURE_NAMES, restrict, variants

pytest.importorskip("transformers")

from dvemb.studies.lm_ablation import QUICK, lm_cells  # noqa: E402  (needs transformers)
from dvemb.studies.lm_fidelity import LMFidelityOptions, build_run  # noqa: E402
from dvemb.studies.text import tokenized_windows  # noqa: E402


@pytest.fixture(scope="module")
def lm_run():
    """The --quick LM run of seed 0: options, spec, validation, records and its trajectory."""
    options = replace(LMFidelityOptions(), **QUICK)
    _, tokens = tokenized_windows(None, options.vocab_size, options.seq_len)
    spec, validation, records, _ = build_run(options, tokens, 0)
    return options, spec, validation, records, train(spec, keep_steps=range(spec.num_steps))


def test_the_exact_lm_cell_is_the_lm_studys_exact_first_order_estimator(lm_run):
    options, spec, validation, records, trajectory = lm_run
    cells, estimators, skipped = lm_cells(options, tuple(CURVATURE_NAMES))
    target = _mean_loss(spec, validation)
    ours = estimators["hessian/global/exact"](trajectory, records, target)
    reference = exact_first_order(trajectory, records, target)
    # Both run the same float64 adjoint (exact Hessian, global, unprojected, full moments): they may differ by
    # rounding only, far below the estimates' size (~1e-4 here).
    np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-14)
    assert np.abs(reference).max() > 1e-6
    assert set(skipped) == {"fisher/*"} and not any(n.startswith("fisher") for n in cells)
    assert cells["ggn/layer/k32/fitted"] == cells["ggn/layer/k32"]
    assert cells["ggn/global/exact/frozen-v"].second_moment == "frozen"
    assert cells["ggn/global/k32/fitted/sampled"] == replace(cells["ggn/global/k32"], ggn_rank=3)
    assert "ggn/layer/exact/frozen-v/sampled" in cells and not any(
        n.endswith("/sampled") for n in cells if not n.startswith("ggn/"))


def test_gauss_newton_products_of_a_sequence_loss_are_symmetric_and_positive(lm_run):
    _, spec, _, _, trajectory = lm_run
    run = RunFunctions(trajectory)
    params = trajectory.params_at(2)
    n = sum(p.numel() for p in params.values())
    u, v = torch.randn(2, n, generator=torch.Generator().manual_seed(0), dtype=spec.dtype)
    gu, gv = run.gauss_newton_vector_products(2, params, torch.stack([u, v]))
    # G = sum_i w_i J_i^T Lambda_i J_i with Lambda_i positive semi-definite: symmetric up to rounding, v G v >= 0
    torch.testing.assert_close(u @ gv, v @ gu, rtol=1e-9, atol=0.0)
    assert v @ gv > 0 and u @ gu > 0
    hv = run.hessian_vector_products(2, params, v[None])[0]
    assert not torch.allclose(gv, hv)  # the model is not linear in its parameters: G != H


def test_sampled_gauss_newton_products_of_a_sequence_loss_are_the_recorders_passes(lm_run):
    """``rank=k`` on a sequence loss: G v = sum_{k,b} c_kb (c_kb . v), c_kb the gradient of <u_kb, logits_b> for the
    Recorder's pass vectors u (logit_gradients, seeded by the step), computed here sample by sample by autograd."""
    _, spec, _, _, trajectory = lm_run
    run, step = RunFunctions(trajectory), 2
    params = trajectory.params_at(step)
    x, y = spec.step_data(step)
    w = spec.weights(step)
    logits = logits_of(run._forward(params, x)).detach().requires_grad_(True)
    loss_grad, = torch.autograd.grad((w * spec.loss(logits, y)).sum(), logits)
    passes = logit_gradients(logits.detach(), loss_grad, "ggn", 3, torch.Generator().manual_seed(step))
    assert passes.shape == (3, *logits.shape)
    names = list(params)
    rows = []
    for k in range(3):
        for b in range(x.shape[0]):
            leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
            out = (passes[k, b] * logits_of(run._forward(leaves, x[b:b + 1]))[0]).sum()
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, [leaves[n] for n in names])]))
    rows = torch.stack(rows)
    v = torch.randn(2, rows.shape[1], generator=torch.Generator().manual_seed(1), dtype=spec.dtype)
    ours = run.gauss_newton_vector_products(step, params, v, rank=3)
    # float64 both ways, the same products in another order: rounding only
    torch.testing.assert_close(ours, (v @ rows.T) @ rows, rtol=1e-9, atol=1e-12)
    exact = run.gauss_newton_vector_products(step, params, v)
    assert not torch.allclose(ours, exact, rtol=1e-3)  # 3 random-sign passes over 11 tokens: not the exact GGN


def test_store_projections_are_the_recorders(lm_run, tmp_path):
    _, spec, _, _, _ = lm_run
    model = record_run(spec, tmp_path / "store", projection_dim=32, projection="gaussian")
    ours = spec_projections(model, Store(tmp_path / "store").layers, spec.dtype)
    seeded = layer_projections(model, 32, 0, spec.dtype)
    assert [p.weight for p in ours] == [p.weight for p in seeded] and len(ours) > 1
    for a, b in zip(ours, seeded):
        torch.testing.assert_close(a.p_in, b.p_in)
        torch.testing.assert_close(a.p_out, b.p_out)


def test_quick_lm_ablation_writes_a_table_with_skipped_cells(tmp_path, capsys):
    cells = "hessian/global/exact,ggn/layer/k32/fitted,ggn/global/exact/sampled,fisher/global/exact"
    assert main(["evaluate", "ablation", "--lm", "--quick", "--cells", cells, "--ggn-rank", "5",
                 "--out", str(tmp_path)]) == 0
    table = (tmp_path / "ablation-lm-adamw.md").read_text()
    for row in ("| hessian/global/exact |", "| ggn/layer/k32/fitted |", "| tracin-cp |"):
        assert row in table
    assert "Skipped fisher/*" in table and "Grid restricted" in table and "| fisher" not in table
    result = json.loads((tmp_path / "ablation-lm-adamw.json").read_text())
    assert result["cells"]["ggn/global/exact/sampled"]["ggn_rank"] == 5
    exact = next(m for m in result["summary"]["single-record"] if m["method"] == "hessian/global/exact")
    assert exact["spearman"]["value"] > 0.5  # the ceiling ranks the 6 replayed removals well (measured 0.94)
    assert "ablation-lm-adamw" in capsys.readouterr().out


def test_quick_mlp_ablation_runs_the_named_cells(tmp_path):
    cells = "ggn/global/exact/frozen-v,hessian/layer/k1024"
    assert main(["evaluate", "ablation", "--quick", "--training", "adamw", "--cells", cells,
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "ablation-digits-gelu-adamw-hidden8.json").read_text())  # --quick: 8 hidden units
    assert [m["method"] for m in result["summary"]["all-epoch"]] == [*cells.split(","), "tracin-cp"]


def test_ablation_options_override_the_training_preset_and_name_the_outputs(tmp_path, capsys):
    cells = "ggn/global/exact"
    assert main(["evaluate", "ablation", "--quick", "--training", "momentum", "--lr", "0.05", "--nesterov",
                 "--depth", "2", "--cells", cells, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "ablation-digits-gelu-momentum-lr0.05-nesterov-depth2-hidden8.json").read_text())
    o = result["options"]
    assert (o["depth"], o["lr"], o["momentum"], o["nesterov"]) == (2, 0.05, 0.9, True)
    assert "(Nesterov)" in (tmp_path / "ablation-digits-gelu-momentum-lr0.05-nesterov-depth2-hidden8.md").read_text()
    capsys.readouterr()
    assert main(["evaluate", "ablation", "--quick", "--training", "adamw", "--nesterov", "--out", str(tmp_path)]) != 0
    assert "are SGD options" in capsys.readouterr().err


def test_quick_cnn_ablation_runs_on_the_fidelity_studys_cnn(tmp_path):
    cells = "ggn/global/exact,hessian/global/exact"
    assert main(["evaluate", "ablation", "--quick", "--arch", "cnn", "--cells", cells, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "ablation-digits-gelu-cnn-sgd.json").read_text())
    assert result["options"]["arch"] == "cnn" and result["options"]["depth"] == 2
    assert [m["method"] for m in result["summary"]["single-record"]] == [*cells.split(","), "tracin-cp"]


def test_restrict_names_unknown_cells():
    cells = variants(64, False, ("ggn",))
    assert list(restrict(cells, ["ggn/global/exact"])) == ["ggn/global/exact"]
    with pytest.raises(ValueError, match="unknown cells"):
        restrict(cells, ["ggn/global/k32"])
