"""The digits demo end to end (quick mode) and the dataset loaders."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dvemb import Store
from dvemb.cli import main
from dvemb.studies.data import load_digits_split, load_mnist
from dvemb.studies.demo import _pick_test_points, run_demo

REPO_ROOT = Path(__file__).resolve().parents[1]


def mnist_dir() -> Path:
    """Where real MNIST lives: $DVEMB_MNIST_DIR, else ../shared/data/mnist next to the repository."""
    return Path(os.environ.get("DVEMB_MNIST_DIR", REPO_ROOT.parent / "shared" / "data" / "mnist"))


def test_demo_quick_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out_dir = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "helpful" in out and "harmful" in out and "total wall time" in out
    assert out.count("test image ") == 4
    png = out_dir / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    store = Store(out_dir / "store")
    assert store.n_steps == 3 * 10 and store.n_records == 3 * 320


def test_run_demo_result_and_rerun_replaces_store(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    first = run_demo(tmp_path, quick=True, epochs=1, n_test=2, show_progress=False)
    second = run_demo(tmp_path, quick=True, epochs=1, n_test=2, projection_dim=64, show_progress=False)
    assert Store(second.store_path).n_steps == 10  # replaced, not appended to
    assert second.png_path.is_file() and second.wall_time_s > 0
    assert len(first.tests) == 2 and first.tests[0].test_index == second.tests[0].test_index
    for t in first.tests:
        assert len(t.helpful) == len(t.harmful) == 3
        assert t.helpful[0].score >= t.helpful[-1].score >= t.harmful[-1].score >= t.harmful[0].score
        assert all(1 <= r.epoch <= 1 and 0 <= r.sample_id < 320 for r in t.helpful + t.harmful)


def test_pick_test_points_distinct_labels_then_a_mistake() -> None:
    labels = [3, 3, 1, 4, 1, 5, 9]
    preds = [3, 3, 1, 4, 7, 5, 9]
    assert _pick_test_points(labels, preds, 4) == [0, 3, 5, 4]  # label 1 is taken by the mistake
    assert _pick_test_points(labels, labels, 3) == [0, 2, 3]
    assert _pick_test_points([0, 0, 0], [0, 0, 0], 3) == [0, 1, 2]


def test_digits_split_is_deterministic_and_disjoint() -> None:
    pytest.importorskip("sklearn")
    x, y, xt, yt = load_digits_split(seed=1, n_test=100)
    assert x.shape == (1697, 64) and xt.shape == (100, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= float(x.min()) and float(x.max()) == 1.0
    again = load_digits_split(seed=1, n_test=100)
    assert torch.equal(x, again[0]) and torch.equal(yt, again[3])
    assert not torch.equal(xt, load_digits_split(seed=2, n_test=100)[2])
    rows = {tuple(r) for r in x.tolist()}
    assert sum(tuple(r) in rows for r in xt.tolist()) < 5  # digits has a few duplicate images, no shared rows


def _write_idx(path: Path, magic: int, data: np.ndarray) -> None:
    header = np.array([magic, *data.shape], dtype=">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + data.astype(np.uint8).tobytes())


def test_mnist_reader_on_synthetic_idx_files(tmp_path: Path) -> None:
    images = np.arange(5 * 28 * 28).reshape(5, 28, 28) % 256
    labels = np.array([3, 1, 4, 1, 5])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, labels)
    x, y = load_mnist(tmp_path, "test")
    assert x.shape == (5, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(images / 255.0).float()) and y.tolist() == labels.tolist()
    assert load_mnist(tmp_path, "test", limit=2)[1].tolist() == [3, 1]
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
        load_mnist(tmp_path, "train")
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2051, labels)
    with pytest.raises(ValueError, match="not an idx1"):
        load_mnist(tmp_path, "test")


def test_real_mnist_label_counts() -> None:
    data_dir = mnist_dir()
    if not (data_dir / "train-labels-idx1-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found in {data_dir} (set DVEMB_MNIST_DIR)")
    x, y = load_mnist(data_dir, "train")
    assert x.shape == (60000, 28, 28) and float(x.max()) == 1.0
    assert torch.bincount(y)[:2].tolist() == [5923, 6742]
    xt, yt = load_mnist(data_dir, "test", limit=1000)
    assert xt.shape == (1000, 28, 28) and yt[:5].tolist() == [7, 2, 1, 0, 4]
