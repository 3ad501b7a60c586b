"""The dynamics study: quick run end to end, the regime detector, the schedule and the similarity term."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dvemb import Recorder, Store
from dvemb.studies import dynamics
from dvemb.studies.dynamics import absorbed_terms, detect_regimes
from dvemb.studies.schedules import WarmupCosine

PNG = b"\x89PNG\r\n\x1a\n"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    dynamics.add_arguments(parser)
    return parser.parse_args(argv)


def test_quick_run_writes_figures_and_json(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    assert dynamics.main(parse(["--quick", "--out", str(tmp_path), "--no-progress"])) == 0
    for name in ("regimes.png", "decay.png", "topk.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    result = json.loads((tmp_path / "dynamics.json").read_text())
    assert {"config", "schedule", "validation", "curve", "regimes", "regime_rule",
            "checkpoint_steps", "decay", "topk", "wall_time_s"} <= set(result)
    steps = result["config"]["steps"]
    assert result["config"]["dataset"] == "digits" and result["checkpoint_steps"] == [30, 60, 90, 120]
    for key in ("mean", "median", "mean_smoothed", "median_smoothed"):
        assert len(result["curve"][key]) == steps and min(result["curve"][key]) > 0
    assert set(result["regimes"]) == {"median", "mean"}
    for regimes in result["regimes"].values():
        assert [r["start"] for r in regimes][0] == 0 and regimes[-1]["stop"] == steps
        assert all(a["stop"] == b["start"] for a, b in zip(regimes, regimes[1:]))
        assert {r["name"] for r in regimes} <= {"warm-up", "basin", "ascent"}
    decay = result["decay"]
    assert len(decay["early_influence"]["median"]) == len(decay["validation_loss_at_checkpoint"]) == 4
    assert -1 <= decay["spearman_retention_vs_absorbed"] <= 1
    assert 0 < decay["same_label_share_of_later_records"] < 1
    for entry in result["topk"]["checkpoints"]:
        assert len(entry["top"]) == 3 and all(r["step"] < entry["step"] for r in entry["top"])
        assert [r["score"] for r in entry["top"]] == sorted((r["score"] for r in entry["top"]), reverse=True)


def planted_curve(rng: np.random.Generator, warmup: bool = True) -> np.ndarray:
    """log-curve 2 until step 150 (warm-up), 0 until 600 (basin), a ramp to 3 at step 1000; noise and outliers."""
    t = np.arange(1000)
    log = np.where(t < 150, 2.0 if warmup else 0.0, 0.0) + np.clip((t - 600) / 400, 0, None) * 3
    log += rng.normal(0, 0.3, len(t))
    log[rng.choice(len(t), 30, replace=False)] += 4  # rare huge records
    return np.exp(log - 7)


def test_detector_finds_planted_regimes() -> None:
    regimes = detect_regimes(planted_curve(np.random.default_rng(0)), window=51)
    assert [r.name for r in regimes] == ["warm-up", "basin", "ascent"]
    warm, basin, ascent = regimes
    assert abs(basin.start - 150) <= 10  # the drop
    assert abs(ascent.start - 680) <= 30  # ramp reaches ALPHA = 0.2 of its log-rise of 3 at step 680
    assert ascent.stop == 1000
    # peaks and floor of a noisy smoothed curve are biased apart, hence the loose tolerance
    assert warm.extreme / basin.extreme == pytest.approx(np.exp(2), rel=0.4)
    assert ascent.extreme / basin.extreme == pytest.approx(np.exp(3), rel=0.4)


def test_detector_reports_no_warmup_when_there_is_none() -> None:
    regimes = detect_regimes(planted_curve(np.random.default_rng(1), warmup=False), window=51)
    assert [r.name for r in regimes] == ["basin", "ascent"] and regimes[0].start == 0


def test_warmup_cosine_schedule() -> None:
    s = WarmupCosine(peak=0.1, total=100, warmup=10, final_fraction=0.01)
    lrs = s.values()
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.1)
    assert lrs[-1] == pytest.approx(0.001) and np.all(np.diff(lrs[10:]) <= 0)
    with pytest.raises(ValueError):
        WarmupCosine(peak=0.1, total=10, warmup=10)


def test_absorbed_terms_match_a_direct_sum(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x, labels = torch.randn(12, 5), torch.tensor([0, 1, 2] * 4)
    batches = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [0, 4, 8]]
    with Recorder(model, tmp_path / "s") as rec:
        for t, ids in enumerate(batches):
            with rec.step(ids, lr=0.1 * (t + 1)):
                F.cross_entropy(model(x[ids]), labels[ids]).backward()
            model.zero_grad()
    edges = np.array([1, 3, 5])
    probes = np.array([0, 2])
    got = absorbed_terms(tmp_path / "s", probes, labels, edges, chunk_rows=4)
    store = Store(tmp_path / "s")
    g = np.concatenate([np.array(store.grads(i), dtype=np.float64) for i in range(len(store.layers))], axis=1)
    rec = store.records
    want = np.zeros((2, 2, 2))
    count = np.zeros((2, 2, 2))
    for p, r in enumerate(probes):
        for i in range(3, len(rec)):  # records of steps >= 1
            b = int(np.searchsorted(edges, rec["step"][i], side="right") - 1)
            other = int(labels[rec["sample_id"][i]] != labels[rec["sample_id"][r]])
            want[p, b, other] += rec["lr"][i] * rec["weight"][i] * (g[i] @ g[r]) ** 2 / (g[r] @ g[r])
            count[p, b, other] += 1
    np.testing.assert_allclose(got.share, want, rtol=1e-4)
    np.testing.assert_array_equal(got.count, count)
