"""Pieces shared by the studies: data splits, a small MLP, plain SGD, sample streams, options, outputs, figures."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Iterator, TypeVar

import torch
from torch import nn

from .data import load_digits_split, load_mnist

DATASETS = ("digits", "mnist")
N_CLASSES = 10


def show_image(ax, image: torch.Tensor, shape: tuple[int, int], title: str, color: str) -> None:
    """Draw one grey-scale image with a coloured frame and title."""
    ax.imshow(image.reshape(shape).numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=7, color=color)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(1.5)


@dataclass(frozen=True)
class Split:
    """Flattened images in [0, 1] with labels: training pool, validation set, held-out test images."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    image_shape: tuple[int, int]


def load_split(dataset: str, data_dir: str | Path | None, n_val: int, seed: int = 0) -> Split:
    """Digits (bundled) or MNIST (read from ``data_dir``); validation = the first ``n_val`` test images."""
    if dataset == "digits":
        x, y, x_held, y_held = load_digits_split(seed=seed)
        shape = (8, 8)
    elif dataset == "mnist":
        if data_dir is None:
            raise ValueError("--dataset mnist needs --data-dir DIR with the four MNIST idx files "
                             "(or use --dataset digits)")
        x, y = load_mnist(data_dir, "train")
        x_held, y_held = load_mnist(data_dir, "test")
        x, x_held, shape = x.flatten(1), x_held.flatten(1), (28, 28)
    else:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if not 0 < n_val < len(y_held):
        raise ValueError(f"n_val must lie in [1, {len(y_held) - 1}] for {dataset}, got {n_val}")
    return Split(x, y, x_held[:n_val], y_held[:n_val], x_held[n_val:], y_held[n_val:], shape)


def make_mlp(d_in: int, hidden: int, seed: int) -> nn.Sequential:
    """A one-hidden-layer ReLU classifier, initialised from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, N_CLASSES))


def sgd_step(model: nn.Module, lr: float) -> None:
    """theta <- theta - lr * grad for every parameter, then clear the gradients (plain SGD)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=-lr)
            p.grad = None


def sample_stream(n: int, per_step: int, steps: int, seed: int) -> torch.Tensor:
    """[steps, per_step] sample indices: consecutive seeded permutations of range(n), cut into steps."""
    gen = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps * per_step / n)
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(epochs)])[: steps * per_step].view(steps, -1)


def add_common_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """Options shared by the studies: data set, seed, output directory, quick mode, progress."""
    parser.add_argument("--dataset", choices=DATASETS, default=None,
                        help="training data (default: mnist, which needs --data-dir; digits with --quick)")
    parser.add_argument("--data-dir", metavar="DIR", default=None,
                        help="directory with the four MNIST idx files (train-images-idx3-ubyte.gz, ...)")
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="base seed of init, data order and split")
    parser.add_argument("--out", metavar="DIR", default=default_out, help=f"output directory (default: {default_out})")
    parser.add_argument("--quick", action="store_true", help="small sizes for a run of a few seconds (CI)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch threads (default: 1, fastest for these small models on a busy machine)")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, restoring the previous number afterwards."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


Config = TypeVar("Config")


def config_from_args(full: Config, quick: Config, args: argparse.Namespace) -> Config:
    """The full or quick preset, with every option the user gave (not None) overriding its field."""
    base = quick if args.quick else full
    given = {f.name: getattr(args, f.name) for f in fields(base) if getattr(args, f.name, None) is not None}
    return replace(base, **given)


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON."""
    path.write_text(json.dumps(data, indent=1) + "\n")


def new_figure(figsize: tuple[float, float]):
    """A matplotlib Figure (no pyplot state), with a clear error if matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the study figures need matplotlib: pip install 'dvemb[demo]'") from None
    return Figure(figsize=figsize, layout="constrained")
