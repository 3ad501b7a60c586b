"""The `dvemb demo`: attribute a digit classifier's test predictions to individual training records.

Trains a small MLP with plain SGD on scikit-learn's 8x8 digits under a
:class:`dvemb.Recorder`, computes the data value embeddings, and for a few test
images reports the training records (step, sample) whose removal would most raise
(helpful) or lower (harmful) the test loss. Writes a figure with the images and
each record's influence against the step it was used at.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import Influence, Recorder, compute_embeddings, influence
from .data import load_digits_split
from ..progress import ProgressBar
from ..store import MANIFEST
from ..projection import DEFAULT_PROJECTION_DIM
from .common import show_image

QUICK_TRAIN_SAMPLES = 320
TOP_K = 3


@dataclass(frozen=True)
class TopRecord:
    """One training record ranked for a test image; score = estimated test-loss increase if removed."""

    step: int
    epoch: int
    sample_id: int
    label: int
    score: float


@dataclass(frozen=True)
class TestAttribution:
    """A scored test image with its most helpful and most harmful training records."""

    test_index: int
    label: int
    prediction: int
    loss: float
    helpful: tuple[TopRecord, ...]
    harmful: tuple[TopRecord, ...]


@dataclass(frozen=True)
class DemoResult:
    """What `run_demo` produced: the store, the figure, timing and the per-test-point top records."""

    store_path: Path
    png_path: Path
    wall_time_s: float
    test_accuracy: float
    tests: tuple[TestAttribution, ...]


def run_demo(
    out_dir: str | Path,
    *,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = 0.5,
    hidden: int = 64,
    projection_dim: int | None = DEFAULT_PROJECTION_DIM,
    n_test: int = 4,
    seed: int = 0,
    quick: bool = False,
    show_progress: bool = True,
) -> DemoResult:
    """Train, record, embed and score a digits MLP; print the top records and save a PNG in ``out_dir``.

    ``quick`` trains on the first few hundred training images only (a few seconds, for CI).
    A store left in ``out_dir/store`` by an earlier demo run is replaced.
    """
    if epochs < 1 or batch_size < 1 or n_test < 1:
        raise ValueError("epochs, batch_size and n_test must be positive")
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store_path = out / "store"
    if (store_path / MANIFEST).is_file():
        shutil.rmtree(store_path)

    x_train, y_train, x_test, y_test = load_digits_split(seed=seed)
    if quick:
        x_train, y_train = x_train[:QUICK_TRAIN_SAMPLES], y_train[:QUICK_TRAIN_SAMPLES]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(x_train.shape[1], hidden), nn.Tanh(), nn.Linear(hidden, 10))
    steps_per_epoch = math.ceil(len(y_train) / batch_size)
    projection = "none (exact per-sample gradients)" if projection_dim is None else f"projection_dim={projection_dim} per layer"
    print(f"digits: {len(y_train)} training / {len(y_test)} test images; MLP {x_train.shape[1]}-{hidden}-10, "
          f"SGD lr={lr}, batch {batch_size}, {epochs} epochs = {epochs * steps_per_epoch} steps; "
          f"projection: {projection}")

    phase = time.perf_counter()
    _train(model, store_path, x_train, y_train, epochs=epochs, batch_size=batch_size, lr=lr,
           projection_dim=projection_dim, seed=seed, show_progress=show_progress)
    print(f"trained and recorded in {time.perf_counter() - phase:.1f} s")
    info = compute_embeddings(store_path, show_progress=show_progress)
    print(f"data value embeddings computed in {info.seconds:.1f} s")

    accuracy, predictions, picked, inf, tests = _attribute(store_path, model, x_test, y_test, y_train, n_test,
                                                           steps_per_epoch)
    print(f"test accuracy {accuracy:.1%}\n")
    print(format_table(tests))
    png_path = out / "demo.png"
    plot_demo(png_path, tests, inf, x_train, x_test, steps_per_epoch)
    wall = time.perf_counter() - start
    print(f"\nstore  {store_path}  (inspect with: dvemb info {store_path})\nfigure {png_path}")
    print(f"total wall time {wall:.1f} s")
    return DemoResult(store_path, png_path, wall, accuracy, tests)


def _attribute(store_path: Path, model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor,
               y_train: torch.Tensor, n_test: int, steps_per_epoch: int):
    """Test accuracy, predictions, the picked test points, their influence and top records."""
    model.eval()
    with torch.no_grad():
        predictions = model(x_test).argmax(1)
    accuracy = (predictions == y_test).float().mean().item()
    picked = _pick_test_points(y_test.tolist(), predictions.tolist(), n_test)
    x_q, y_q = x_test[picked], y_test[picked]
    inf = influence(store_path, model, lambda: F.cross_entropy(model(x_q), y_q, reduction="none"))
    with torch.no_grad():
        losses = F.cross_entropy(model(x_q), y_q, reduction="none").tolist()
    tests = _attributions(inf, picked, y_test, predictions, losses, y_train, steps_per_epoch)
    return accuracy, predictions, picked, inf, tests


def _train(model: nn.Module, store_path: Path, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int,
           lr: float, projection_dim: int | None, seed: int, show_progress: bool) -> None:
    """Plain SGD over a seeded shuffle per epoch, every step recorded with dataset indices as ids."""
    # SGD by hand: constructing a torch.optim optimizer imports torch._dynamo, about 1 s on CPU
    params = list(model.parameters())
    order = torch.Generator().manual_seed(seed)
    n_steps = math.ceil(len(y) / batch_size)
    with Recorder(model, store_path, projection_dim=projection_dim, seed=seed) as rec:
        for epoch in range(epochs):
            perm = torch.randperm(len(y), generator=order)
            bar = ProgressBar(total=n_steps, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                              disable=not show_progress)
            for b in range(n_steps):
                ids = perm[b * batch_size:(b + 1) * batch_size]
                with rec.step(ids, lr=lr):
                    loss = F.cross_entropy(model(x[ids]), y[ids])
                    loss.backward()
                with torch.no_grad():
                    for p in params:
                        p.add_(p.grad, alpha=-lr)
                        p.grad = None
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update(1)
            bar.close()


def _pick_test_points(labels: Sequence[int], predictions: Sequence[int], n: int) -> list[int]:
    """First test images with distinct labels, plus the first misclassified one (shown last) if any."""
    if n > len(labels):
        raise ValueError(f"n_test={n} exceeds the {len(labels)} test images")
    wrong = [i for i, (y, p) in enumerate(zip(labels, predictions)) if y != p][:1]
    seen = {labels[i] for i in wrong}
    picked: list[int] = []
    for i, y in enumerate(labels):
        if len(picked) + len(wrong) < n and y not in seen and i not in wrong:
            picked.append(i)
            seen.add(y)
    rest = (i for i in range(len(labels)) if i not in picked and i not in wrong)
    while len(picked) + len(wrong) < n:
        picked.append(next(rest))
    return (picked + wrong)[:n]


def _attributions(inf: Influence, picked: list[int], y_test: torch.Tensor, predictions: torch.Tensor,
                  losses: list[float], y_train: torch.Tensor, steps_per_epoch: int) -> tuple[TestAttribution, ...]:
    top = inf.top_k(TOP_K)

    def records(ranking, row: int) -> tuple[TopRecord, ...]:
        return tuple(TopRecord(int(t), int(t) // steps_per_epoch + 1, int(i), int(y_train[int(i)]), float(s))
                     for t, i, s in zip(ranking.step[row], ranking.sample_id[row], ranking.score[row]))

    return tuple(
        TestAttribution(idx, int(y_test[idx]), int(predictions[idx]), losses[row],
                        records(top.helpful, row), records(top.harmful, row))
        for row, idx in enumerate(picked))


def format_table(tests: Sequence[TestAttribution]) -> str:
    """The most helpful and most harmful training records of each test image as a text table."""
    lines = ["score = estimated change of the test loss if that one record (step, sample) is removed from training;",
             "        positive = the record helped (removing it raises the loss), negative = it hurt."]
    header = f"  {'':<8} {'rank':>4} {'step':>5} {'epoch':>5} {'sample':>6} {'label':>5} {'score':>11}"
    for t in tests:
        mark = "" if t.label == t.prediction else "   <- misclassified"
        lines += ["", f"test image {t.test_index}: label {t.label}, predicted {t.prediction}, "
                      f"loss {t.loss:.4f}{mark}", header]
        for kind, recs in (("helpful", t.helpful), ("harmful", t.harmful)):
            for rank, r in enumerate(recs, 1):
                lines.append(f"  {kind if rank == 1 else '':<8} {rank:>4} {r.step:>5} {r.epoch:>5} "
                             f"{r.sample_id:>6} {r.label:>5} {r.score:>+11.3e}")
    return "\n".join(lines)


def plot_demo(path: Path, tests: Sequence[TestAttribution], inf: Influence, x_train: torch.Tensor,
              x_test: torch.Tensor, steps_per_epoch: int) -> None:
    """Save the figure: each test image, its top helpful/harmful training images, and influence vs step."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the demo figure needs matplotlib: pip install 'dvemb[demo]'") from None
    side = int(round(math.sqrt(x_train.shape[1])))
    n_img = 1 + 2 * TOP_K
    fig = Figure(figsize=(17, 2.1 * len(tests) + 0.9), layout="constrained")
    grid = fig.add_gridspec(len(tests), n_img + 1, width_ratios=[1] * n_img + [4.5])
    n_steps = int(inf.steps.max()) + 1
    step_sums = np.zeros((len(tests), n_steps))
    np.add.at(step_sums.T, inf.steps, inf.scores.T)
    for row, t in enumerate(tests):
        ax = fig.add_subplot(grid[row, 0])
        show_image(ax, x_test[t.test_index], (side, side), f"test #{t.test_index}\nlabel {t.label}, pred {t.prediction}",
              "tab:red" if t.label != t.prediction else "black")
        for col, (kind, recs, color) in enumerate((("helpful", t.helpful, "tab:green"),
                                                   ("harmful", t.harmful, "tab:red"))):
            for k, r in enumerate(recs):
                ax = fig.add_subplot(grid[row, 1 + col * TOP_K + k])
                show_image(ax, x_train[r.sample_id], (side, side),
                      f"{kind} #{k + 1}: label {r.label}\nid {r.sample_id}, step {r.step}\n{r.score:+.2e}", color)
        ax = fig.add_subplot(grid[row, n_img])
        ax.scatter(inf.steps, inf.scores[row], s=3, color="0.6", alpha=0.5, lw=0, label="one record")
        ax.plot(np.arange(n_steps), step_sums[row], color="tab:blue", lw=1, label="sum over the step's batch")
        for recs, color in ((t.helpful, "tab:green"), (t.harmful, "tab:red")):
            ax.scatter([r.step for r in recs], [r.score for r in recs], s=18, color=color, zorder=3)
        for e in range(steps_per_epoch, n_steps, steps_per_epoch):
            ax.axvline(e - 0.5, color="0.3", ls=":", lw=0.8)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_ylabel("score", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_title(f"test #{t.test_index}: influence of each training record vs its step "
                     "(dotted: epochs)", fontsize=8)
        if row == len(tests) - 1:
            ax.set_xlabel("training step", fontsize=8)
        if row == 0:
            ax.legend(fontsize=7, loc="upper left", markerscale=2)
    fig.suptitle("dvemb demo: the most helpful (green) and harmful (red) training records per test image; "
                 "score = estimated test-loss increase if the record were removed", fontsize=10)
    fig.savefig(path, dpi=100)
