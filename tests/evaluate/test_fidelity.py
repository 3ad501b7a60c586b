"""The fidelity harness and `dvemb evaluate fidelity` against replayed ground truth on digits."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dvemb.evaluate import TrainingSpec, pearson, spearman
from dvemb.evaluate.baselines import exact_first_order
from dvemb.evaluate.fidelity import ALL_EPOCH, SINGLE, Interval, bootstrap_interval, evaluate_fidelity
from dvemb.studies import fidelity as study

pytest.importorskip("sklearn")
from dvemb.studies.data import load_digits_split  # noqa: E402

HARNESS_FLOOR = 0.98  # issue acceptance: the exact first-order estimate at a small learning rate


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Runs these tests on one intra-op thread: on a shared 2-core machine, thread contention made
    the many tiny ops of a fidelity run ~14x slower (63 s against 4.6 s for the quick study)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digits_run(lr: float, n_train: int = 256, hidden: int = 16) -> tuple[TrainingSpec, tuple, list, list]:
    """A GELU MLP on digits for 3 epochs; 30 samples, with their last-epoch records."""
    x, y, x_val, y_val = load_digits_split(seed=0)
    generator = torch.Generator().manual_seed(0)
    batches = [b.tolist() for _ in range(3) for b in torch.randperm(n_train, generator=generator).split(32)]

    def factory() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, 10))

    spec = TrainingSpec(factory, x[:n_train], y[:n_train], batches, lr)
    samples = sorted(np.random.default_rng(0).choice(n_train, 30, replace=False).tolist())
    last = range(2 * spec.num_steps // 3, spec.num_steps)
    records = [(t, i) for t in last for i in spec.batch(t) if i in samples]
    return spec, (x_val, y_val), records, samples


def test_exact_first_order_reaches_the_harness_floor_at_a_small_learning_rate():
    spec, validation, records, samples = digits_run(lr=0.02)
    result = evaluate_fidelity(spec, validation, records=records, samples=samples, dvemb_configs={},
                               baselines={"exact-first-order": exact_first_order}, resamples=50)
    for setting in (SINGLE, ALL_EPOCH):
        rho = result.setting(setting).method("exact-first-order").spearman
        print(f"\nexact first-order vs replayed TSLOO, {setting}: Spearman {rho}")
        assert rho.value >= HARNESS_FLOOR


def test_harness_reports_every_method_and_serialises(tmp_path):
    spec, validation, records, samples = digits_run(lr=0.3)
    configs = {"dvemb": {}, "f64": {"dtype": torch.float64, "projection_dim": 256}}
    result = evaluate_fidelity(spec, validation, records=records[:10], samples=samples[:10], dvemb_configs=configs,
                               resamples=20, workdir=tmp_path)
    assert result.methods == ("dvemb", "f64", "tracin-cp", "grad-dot", "influence-function", "exact-first-order")
    assert {"train", "ground truth", *result.methods} <= set(result.seconds)
    single = result.setting(SINGLE)
    assert single.removals == tuple(((t, i),) for t, i in records[:10])
    assert single.method("tracin-cp").spearman.value == pytest.approx(
        spearman(single.method("tracin-cp").estimates, single.truth))
    document = json.loads(result.to_json())
    assert document["dvemb_configs"]["f64"] == {"dtype": "float64", "projection_dim": 256}
    assert len(document["settings"][1]["removals"][0]) == 3  # all-epoch: one record per epoch
    assert (tmp_path / "f64" / "manifest.json").is_file()
    with pytest.raises(FileExistsError, match="already exists"):
        evaluate_fidelity(spec, validation, records=records[:2], dvemb_configs={"dvemb": {}}, baselines={},
                          workdir=tmp_path)


def test_harness_rejects_clashing_names_and_empty_requests():
    spec, validation, records, _ = digits_run(lr=0.1, n_train=64)
    with pytest.raises(ValueError, match="both"):
        evaluate_fidelity(spec, validation, records=records, dvemb_configs={"grad-dot": {}})
    with pytest.raises(ValueError, match="give records"):
        evaluate_fidelity(spec, validation)


def test_bootstrap_interval_over_groups():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=60)
    perfect = bootstrap_interval([(2 * truth, truth)], pearson, resamples=50)
    assert (perfect.value, perfect.low, perfect.high) == pytest.approx((1.0, 1.0, 1.0))
    groups = [(truth + rng.normal(size=60) * s, truth) for s in (0.5, 1.0)]
    interval = bootstrap_interval(groups, spearman, resamples=200)
    assert interval.value == pytest.approx(np.mean([spearman(e, t) for e, t in groups]))
    assert interval.low < interval.value < interval.high
    assert str(Interval(0.5, 0.25, 0.75)) == "0.500 [0.250, 0.750]"


def test_reduced_fidelity_study_on_digits_dvemb_beats_the_influence_function(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    args = parser.parse_args(["--quick", "--out", str(tmp_path), "--no-progress", "--projection-sweep",
                              "--config", 'f64={"dtype": "float64"}'])
    assert study.main(args) == 0
    printed = capsys.readouterr().out
    assert "single-epoch removal" in printed and "influence-function" in printed
    report = json.loads((tmp_path / "fidelity-digits-relu-hidden16.json").read_text())  # --quick: 16 hidden units
    for figure in ("scatter-digits-relu-hidden16.png", "projection-sweep-digits-relu-hidden16.png"):
        assert (tmp_path / figure).stat().st_size > 0
    single = {m["method"]: m["spearman"]["value"] for m in report["summary"][SINGLE]}
    print(f"\nquick digits study, single-epoch Spearman: {single}")
    assert single["dvemb"] > single["influence-function"]
    assert report["options"]["extra_configs"] == {"f64": {"dtype": "float64"}}


def test_reduced_cnn_fidelity_study_on_digits(tmp_path):
    """``--arch cnn``: the study trains, records and replays a convolutional net (two stride-2 convolutions,
    then a Linear classifier), and DVEmb ranks the removals better than the influence function (measured
    0.96 against 0.63 on this quick run)."""
    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    args = parser.parse_args(["--arch", "cnn", "--quick", "--out", str(tmp_path), "--no-progress"])
    options = study.options_from(args)
    model = study.build_run(options, 0).spec.build_model()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [(1, 8, (2, 2)), (8, 16, (2, 2))]
    assert model(torch.zeros(3, 64, dtype=torch.float64)).shape == (3, 10)  # 8x8 digits: 4x4, then 2x2 maps of 16 channels
    assert study.main(args) == 0
    report = json.loads((tmp_path / "fidelity-digits-relu-cnn.json").read_text())
    single = {m["method"]: m["spearman"]["value"] for m in report["summary"][SINGLE]}
    assert single["dvemb"] > single["influence-function"]
    with pytest.raises(ValueError, match="square images"):
        study._cnn_factory(10, 4, 1, 3, "relu", 0)


def test_output_names_say_what_differs_from_the_studys_defaults():
    parser = argparse.ArgumentParser()
    study.add_arguments(parser)

    def stem(*argv: str) -> str:
        return study.output_stem(study.options_from(parser.parse_args(list(argv))))

    assert stem() == "digits-relu"
    assert stem("--hidden", "32", "--depth", "1", "--optimizer", "adamw") == "digits-relu-adamw"
    assert (stem("--activation", "gelu", "--momentum", "0.9", "--nesterov", "--depth", "2", "--hidden", "64")
            == "digits-gelu-momentum0.9-nesterov-depth2-hidden64")
    assert stem("--arch", "cnn", "--depth", "2", "--hidden", "16") == "digits-relu-cnn-hidden16"


def test_config_argument_is_validated():
    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--config", "broken={"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--config", 'x={"dtype": "float65"}'])
    with pytest.raises(ValueError, match="data-dir"):
        study.options_from(parser.parse_args(["--dataset", "mnist"]))


MNIST_DIR = Path(os.environ.get("DVEMB_MNIST_DIR", Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"))


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_mnist_fidelity_dvemb_beats_every_baseline_in_single_epoch_removal(tmp_path, activation):
    """The paper's MNIST study at full size (about 2.5 min per activation): run with `pytest -m slow`."""
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST not found in {MNIST_DIR} (set DVEMB_MNIST_DIR)")
    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    args = parser.parse_args(["--dataset", "mnist", "--data-dir", str(MNIST_DIR), "--activation", activation,
                              "--records", "100", "--seeds", "3", "--out", str(tmp_path), "--no-progress"])
    assert study.main(args) == 0
    report = json.loads((tmp_path / f"fidelity-mnist-{activation}.json").read_text())
    single = {m["method"]: m["spearman"]["value"] for m in report["summary"][SINGLE]}
    for baseline in ("tracin-cp", "grad-dot", "influence-function"):
        assert single["dvemb"] > single[baseline], (baseline, single)
