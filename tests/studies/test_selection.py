"""The selection study: quick run end to end, the selection rule, windows and label noise."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dvemb.studies import selection
from dvemb.studies.dynamics import make_mlp
from dvemb.studies.selection import (WINDOWS, alignment_scores, flip_labels, last_layer_factors, select_aligned,
                                         window_mask)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    selection.add_arguments(parser)
    return parser.parse_args(argv)


def test_quick_run_writes_figure_and_json(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    assert selection.main(parse(["--quick", "--out", str(tmp_path), "--no-progress"])) == 0
    assert (tmp_path / "selection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((tmp_path / "selection.json").read_text())
    assert {"config", "eval_steps", "windows", "claim", "wall_time_s"} <= set(result)
    assert list(result["windows"]) == list(WINDOWS)
    costs = {w: v["cost"] for w, v in result["windows"].items()}
    assert costs == {"none": 0.0, "all": 1.0, "early": 0.2, "late": 0.2, "early+late": 0.4, "middle": 0.4}
    for v in result["windows"].values():
        assert len(v["final_losses"]) == 3 and v["final_loss_std"] >= 0
        assert len(v["curve_mean"]) == len(result["eval_steps"]) and v["final_loss_mean"] == v["curve_mean"][-1]
    assert {"holds", "statement", "recovered_share", "all_steps_gain"} <= set(result["claim"])
    assert result["claim"]["recovered_share"]["all"] == pytest.approx(1.0)


def test_alignment_scores_equal_explicit_last_layer_gradient_dots() -> None:
    model = make_mlp(6, 5, seed=0)
    x, y = torch.randn(7, 6), torch.randint(0, 10, (7,))
    xv, yv = torch.randn(4, 6), torch.randint(0, 10, (4,))
    last = model[-1]

    def grad(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(inputs), targets)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, [last.weight, last.bias])])

    g_val = grad(xv, yv)
    want = torch.stack([grad(x[i:i + 1], y[i:i + 1]) @ g_val for i in range(len(y))])
    got = alignment_scores(*last_layer_factors(model, x, y), *last_layer_factors(model, xv, yv))
    torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-6)


def test_selection_keeps_the_candidates_aligned_with_validation() -> None:
    model = make_mlp(8, 16, seed=1)
    gen = torch.Generator().manual_seed(0)
    prototype = torch.rand(8, generator=gen)
    images = prototype + 0.05 * torch.randn(12, 8, generator=gen)
    x_val, y_val = images[:4], torch.full((4,), 3)
    # candidates: the same kind of image, half with the validation label, half with wrong labels
    x = images[4:]
    y = torch.tensor([3, 7, 3, 1, 3, 9, 3, 0])
    chosen = select_aligned(model, x, y, x_val, y_val, k=4)
    assert sorted(chosen.tolist()) == [0, 2, 4, 6]


def test_windows_and_their_costs() -> None:
    masks = {w: window_mask(w, 100, 0.2) for w in WINDOWS}
    assert masks["early"][:20].all() and not masks["early"][20:].any()
    assert masks["late"][80:].all() and not masks["late"][:80].any()
    np.testing.assert_array_equal(masks["early+late"], masks["early"] | masks["late"])
    assert masks["middle"].sum() == masks["early+late"].sum() == 40
    assert not (masks["middle"] & masks["early+late"]).any()
    assert masks["all"].all() and not masks["none"].any()
    with pytest.raises(ValueError, match="window"):
        window_mask("sometimes", 100, 0.2)


def test_flip_labels_changes_exactly_the_fraction() -> None:
    y = torch.arange(1000) % 10
    noisy = flip_labels(y, 0.3, seed=0)
    assert int((noisy != y).sum()) == 300 and noisy.min() >= 0 and noisy.max() <= 9
    assert torch.equal(noisy, flip_labels(y, 0.3, seed=0))
