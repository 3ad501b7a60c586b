"""`dvemb evaluate fidelity`: the paper's fidelity study of data value embeddings.

A one-hidden-layer MLP (or, with ``--arch cnn``, a small convolutional net) is trained with plain
SGD (or SGD with momentum, or AdamW) for a few epochs in a fixed batch order, on a seeded subset
of MNIST (or scikit-learn's digits). For a random set of training samples the
study compares every method's estimate with the exact trajectory-specific leave-one-out obtained
by replaying training, on the mean validation loss, in two settings:

* single-epoch removal: the sample's record in the last epoch is removed;
* all-epoch removal: every record of the sample is removed.

Methods: DVEmb under named Recorder configurations (``dvemb`` is the library's defaults at the
given projection), TracIn-CP, the gradient dot product, the influence function and the exact
first-order ceiling (see :mod:`dvemb.evaluate.baselines`). Correlations are averaged over seeds;
their 95% intervals resample the removals within each seed. Writes a JSON report, scatter plots
(one panel per method) and, with ``--projection-sweep``, a Spearman-versus-projection curve.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import load_digits_split, load_mnist
from ..evaluate.baselines import standard_baselines
from ..evaluate.fidelity import (
    ALL_EPOCH,
    SINGLE,
    FidelityResult,
    Interval,
    bootstrap_interval,
    evaluate_fidelity,
    jsonable_config,
)
from ..evaluate.metrics import pearson, spearman
from ..evaluate.replay import Record, TrainingSpec
from ..update import SGD, Adam, UpdateRule
from ..projection import DEFAULT_PROJECTION_DIM
from ..cli import positive_int, projection_dim

ACTIVATIONS: Mapping[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
"""The hidden activations the study offers, by name."""
SWEEP_DIMS = tuple(2**k for k in range(5, 13))
"""Per-layer projected sizes of ``--projection-sweep``: 32 .. 4096."""
UNPROJECTED_LIMIT = 4096
"""Largest per-layer gradient size for which unprojected DVEmb (a p x p matrix per layer) is added."""
CURVATURE_VARIANT = "dvemb-paper"
CURVATURE_VARIANT_OPTIONS = {"curvature": "gradient_outer", "projection": "gaussian", "blocking": "layer"}
"""The study's second DVEmb: the paper's configuration (gradient outer product, seeded projections, one K per layer)."""
MNIST_POOL = 10000
"""The training subset is drawn from the first MNIST_POOL training images."""
SETTING_LABELS = {SINGLE: "single-epoch removal", ALL_EPOCH: "all-epoch removal"}


@dataclass(frozen=True)
class FidelityOptions:
    """Everything that defines a fidelity study; stored with its results."""

    dataset: str = "digits"
    data_dir: str | None = None
    arch: str = "mlp"
    activation: str = "relu"
    records: int = 100
    seeds: int = 3
    train_size: int = 1000
    val_size: int = 1000
    hidden: int = 128
    depth: int = 1
    epochs: int = 3
    batch_size: int = 32
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    projection_dim: int | None = DEFAULT_PROJECTION_DIM
    projection_sweep: bool = False
    curvature_variant: bool = True
    extra_configs: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    resamples: int = 1000

    def __post_init__(self) -> None:
        """Checks the options."""
        if self.dataset not in ("digits", "mnist"):
            raise ValueError(f"dataset must be 'digits' or 'mnist', got {self.dataset!r}")
        if self.dataset == "mnist" and self.data_dir is None:
            raise ValueError("--dataset mnist needs --data-dir: the folder with MNIST's idx files")
        if self.arch not in ("mlp", "cnn"):
            raise ValueError(f"arch must be 'mlp' or 'cnn', got {self.arch!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.optimizer == "adamw" and (self.momentum or self.nesterov):
            raise ValueError("--momentum and --nesterov are SGD options; AdamW uses its default betas")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if min(self.records, self.seeds, self.train_size, self.val_size, self.hidden, self.epochs,
               self.batch_size, self.resamples) < 1:
            raise ValueError("records, seeds, sizes, epochs and resamples must be positive")
        if self.records > self.train_size:
            raise ValueError(f"{self.records} records asked from {self.train_size} training samples")

    @property
    def update(self) -> UpdateRule:
        """The run's update rule: torch.optim.SGD's, or AdamW's (default betas and eps)."""
        if self.optimizer == "adamw":
            return Adam(weight_decay=self.weight_decay, decoupled=True)
        return SGD(self.momentum, 0.0, self.nesterov, self.weight_decay)

    def to_dict(self) -> dict[str, object]:
        """JSON form."""
        return {**asdict(self), "extra_configs": {n: jsonable_config(c) for n, c in self.extra_configs.items()}}


@dataclass(frozen=True)
class MethodSummary:
    """A method's correlations averaged over seeds, with intervals, and the value of each seed."""

    method: str
    spearman: Interval
    pearson: Interval
    seed_spearman: tuple[float, ...]
    seed_pearson: tuple[float, ...]

    def to_dict(self) -> dict[str, object]:
        """JSON form."""
        return {"method": self.method, "spearman": self.spearman.to_dict(), "pearson": self.pearson.to_dict(),
                "seed_spearman": list(self.seed_spearman), "seed_pearson": list(self.seed_pearson)}


@dataclass(frozen=True)
class FidelityStudy:
    """A study's options, the result of each seed and the summary per setting and method."""

    options: FidelityOptions
    results: tuple[FidelityResult, ...]
    summary: Mapping[str, tuple[MethodSummary, ...]]
    seconds: float

    def to_dict(self) -> dict[str, object]:
        """JSON form."""
        return {"options": self.options.to_dict(), "seconds": self.seconds,
                "summary": {s: [m.to_dict() for m in methods] for s, methods in self.summary.items()},
                "seeds": [r.to_dict() for r in self.results]}


@dataclass(frozen=True)
class StudyRun:
    """One seed's training run, validation data and the removals to evaluate."""

    spec: TrainingSpec
    validation: tuple[torch.Tensor, torch.Tensor]
    records: list[Record]
    samples: list[int]


def run_study(options: FidelityOptions, *, show_progress: bool = True) -> FidelityStudy:
    """Runs every seed of the study and summarises it."""
    start = time.perf_counter()
    results = []
    for seed in range(options.seeds):
        run = build_run(options, seed)
        configs = dvemb_configs(options, run.spec)
        print(f"seed {seed}: {run.spec.num_steps} steps, {len(run.samples)} samples, "
              f"DVEmb configurations {list(configs)}", flush=True)
        results.append(evaluate_fidelity(
            run.spec, run.validation, records=run.records, samples=run.samples, dvemb_configs=configs,
            baselines=standard_baselines(projection_dim=options.projection_dim),
            resamples=options.resamples, seed=seed, show_progress=show_progress))
    return FidelityStudy(options, tuple(results), summarise(results, options.resamples),
                         time.perf_counter() - start)


def build_run(options: FidelityOptions, seed: int) -> StudyRun:
    """The seed's data subset, model, batch order and removals."""
    x_train, y_train, x_val, y_val = _load(options, seed)
    generator = torch.Generator().manual_seed(seed)
    n = len(y_train)
    per_epoch = [torch.randperm(n, generator=generator).split(options.batch_size) for _ in range(options.epochs)]
    batches = [b.tolist() for epoch in per_epoch for b in epoch]
    classes = int(y_train.max()) + 1
    if options.arch == "cnn":
        factory = _cnn_factory(x_train.shape[1], options.hidden, options.depth, classes, options.activation, seed)
    else:
        factory = _mlp_factory(x_train.shape[1], [options.hidden] * options.depth, classes, options.activation, seed)
    spec = TrainingSpec(factory, x_train, y_train, batches, options.lr, update=options.update)
    samples = sorted(np.random.default_rng(seed).choice(n, options.records, replace=False).tolist())
    last_epoch = range(len(batches) - len(per_epoch[-1]), len(batches))
    step_of = {i: t for t in last_epoch for i in spec.batch(t)}
    return StudyRun(spec, (x_val, y_val), [(step_of[i], i) for i in samples], samples)


def dvemb_configs(options: FidelityOptions, spec: TrainingSpec) -> dict[str, Mapping[str, object]]:
    """The study's DVEmb configurations: ``dvemb``, unprojected when affordable, sweep, GGN variant, extras.

    Extra configurations use the study's projection unless they set ``projection_dim``.
    """
    configs: dict[str, Mapping[str, object]] = {"dvemb": {"projection_dim": options.projection_dim}}
    sizes = [sum(p.numel() for p in m.parameters(recurse=False)) for m in spec.build_model().modules()
             if isinstance(m, (nn.Linear, nn.Conv2d))]
    if options.projection_dim is not None and options.projection_dim < max(sizes) <= UNPROJECTED_LIMIT:
        configs["dvemb-unprojected"] = {"projection_dim": None, "dtype": torch.float64}
    if options.projection_sweep:
        configs.update({f"dvemb-k{k}": {"projection_dim": k} for k in SWEEP_DIMS})
    if options.curvature_variant:
        configs[CURVATURE_VARIANT] = {"projection_dim": options.projection_dim, **CURVATURE_VARIANT_OPTIONS}
    return with_extras(configs, options.extra_configs, options.projection_dim)


def with_extras(configs: Mapping[str, Mapping[str, object]], extras: Mapping[str, Mapping[str, object]],
                projection_dim: int | None) -> dict[str, Mapping[str, object]]:
    """A study's configurations followed by the user's extra ones (``--config``), which use the study's
    projection unless they set ``projection_dim``; their names must be new."""
    clash = set(configs) & set(extras)
    if clash:
        raise ValueError(f"configuration names already used by the study: {sorted(clash)}")
    return {**configs, **{name: {"projection_dim": projection_dim, **c} for name, c in extras.items()}}


def summarise(results: Sequence[FidelityResult], resamples: int) -> dict[str, tuple[MethodSummary, ...]]:
    """Per setting and method: correlations averaged over seeds, intervals resampling within seeds."""
    summary = {}
    for first in results[0].settings:
        per_seed = [r.setting(first.setting) for r in results]
        methods = []
        for method in results[0].methods:
            groups = [(s.method(method).estimates, s.truth) for s in per_seed]
            methods.append(MethodSummary(
                method, bootstrap_interval(groups, spearman, resamples=resamples),
                bootstrap_interval(groups, pearson, resamples=resamples),
                tuple(s.method(method).spearman.value for s in per_seed),
                tuple(s.method(method).pearson.value for s in per_seed)))
        summary[first.setting] = tuple(methods)
    return summary


def net_description(arch: str, depth: int, hidden: int) -> str:
    """The study's net in words, e.g. ``MLP 1 x 128 hidden``."""
    return (f"CNN {depth} stride-2 3x3 convolutions from {hidden} channels" if arch == "cnn"
            else f"MLP {depth} x {hidden} hidden")


def format_table(study: FidelityStudy) -> str:
    """The summary as a text table: method x setting, Spearman and Pearson with 95% intervals."""
    o = study.options
    net = net_description(o.arch, o.depth, o.hidden)
    lines = [f"{o.dataset} {net} {o.activation}, {o.train_size} training samples, "
             f"{o.update.describe()} lr {o.lr}, "
             f"batch {o.batch_size}, {o.epochs} epochs; {o.records} samples x {o.seeds} seeds; "
             f"mean over seeds [95% bootstrap interval]"]
    for setting, methods in study.summary.items():
        lines += ["", f"{SETTING_LABELS[setting]:<24}{'Spearman':<26}Pearson"]
        lines += [f"{m.method:<24}{str(m.spearman):<26}{m.pearson}" for m in methods]
    return "\n".join(lines)


def plot_scatter(study: FidelityStudy, path: Path) -> None:
    """Estimate against ground truth, one panel per method (sweep configurations left out), one row per setting."""
    from matplotlib.figure import Figure

    methods = [m for m in study.results[0].methods if not m.startswith("dvemb-k")]
    settings = list(study.summary)
    fig = Figure(figsize=(2.7 * len(methods), 2.7 * len(settings)), layout="constrained")
    axes = fig.subplots(len(settings), len(methods), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for row, setting in zip(axes, settings):
        summaries = {m.method: m for m in study.summary[setting]}
        for ax, method in zip(row, methods):
            for k, result in enumerate(study.results):
                s = result.setting(setting)
                ax.scatter(s.truth, s.method(method).estimates, s=6, alpha=0.6, color=colors[k % len(colors)])
            low, high = ax.get_xlim()
            ax.axline((low, low), (high, high), color="grey", lw=0.7, ls="--")
            ax.set_title(f"{method}\nSpearman {summaries[method].spearman.value:.2f}", fontsize=9)
            ax.tick_params(labelsize=7)
        row[0].set_ylabel(f"{SETTING_LABELS[setting]}\nestimate", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("ground-truth TSLOO", fontsize=8)
    fig.savefig(path, dpi=110)


def plot_sweep(study: FidelityStudy, path: Path) -> None:
    """Spearman of DVEmb against the per-layer projected size, with the unprojected and exact references."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for k, ((setting, methods), color) in enumerate(zip(study.summary.items(), ["tab:blue", "tab:orange"])):
        by_name = {m.method: m.spearman for m in methods}
        points = [by_name[f"dvemb-k{d}"] for d in SWEEP_DIMS]
        ax.errorbar([d * 1.04**k for d in SWEEP_DIMS], [p.value for p in points], capsize=3, color=color, marker="o",
                    yerr=[[p.value - p.low for p in points], [p.high - p.value for p in points]],
                    label=f"DVEmb, {SETTING_LABELS[setting]}")
        for reference, style in (("dvemb-unprojected", ":"), ("exact-first-order", "--")):
            if reference in by_name:
                ax.axhline(by_name[reference].value, color=color, ls=style, lw=1,
                           label=f"{reference}, {SETTING_LABELS[setting]}")
    o = study.options
    ax.set_title(f"{o.dataset} MLP, {o.activation}: mean over {o.seeds} seeds, 95% intervals", fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("projected size per layer")
    ax.set_ylabel("Spearman vs ground-truth TSLOO")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of `dvemb evaluate fidelity` to ``parser``."""
    parser.add_argument("--dataset", choices=("digits", "mnist"), default="digits",
                        help="scikit-learn's 8x8 digits (bundled) or MNIST (needs --data-dir; default: digits)")
    parser.add_argument("--data-dir", metavar="PATH", default=None, help="folder with MNIST's idx(.gz) files")
    parser.add_argument("--arch", choices=("mlp", "cnn"), default="mlp",
                        help="mlp: Linear layers; cnn: --depth stride-2 3x3 convolutions (channels doubling from "
                             "--hidden), then a Linear classifier (default: mlp)")
    parser.add_argument("--activation", choices=sorted(ACTIVATIONS), default="relu",
                        help="hidden activation (default: relu)")
    parser.add_argument("--records", type=positive_int, default=100, metavar="N",
                        help="training samples whose removal is evaluated, per seed (default: 100)")
    parser.add_argument("--seeds", type=positive_int, default=3, metavar="N",
                        help="independent runs: data subset, init, batch order, samples (default: 3)")
    parser.add_argument("--out", metavar="DIR", default="fidelity-results", help="output folder")
    parser.add_argument("--quick", action="store_true",
                        help="a small run for smoke tests: few samples, one seed, 200 resamples")
    parser.add_argument("--projection-sweep", action="store_true",
                        help=f"also run DVEmb at per-layer projected sizes {SWEEP_DIMS[0]}..{SWEEP_DIMS[-1]}")
    parser.add_argument("--no-curvature-variant", action="store_true",
                        help=f"skip {CURVATURE_VARIANT} (DVEmb with the paper's configuration "
                             f"{CURVATURE_VARIANT_OPTIONS}), run by default")
    parser.add_argument("--train-size", type=positive_int, default=None, metavar="N",
                        help="training samples (default: 1000 on MNIST, 640 on digits)")
    parser.add_argument("--val-size", type=positive_int, default=None, metavar="N",
                        help="validation samples of the target loss (default: 1000 on MNIST, 297 on digits)")
    parser.add_argument("--hidden", type=positive_int, default=None, metavar="N",
                        help="hidden units (default: 128 on MNIST, 32 on digits); --arch cnn: the first "
                             "convolution's channels (default: 8)")
    parser.add_argument("--depth", type=positive_int, default=None, metavar="N",
                        help="hidden layers (default: 1), or convolutions (default: 2)")
    parser.add_argument("--epochs", type=positive_int, default=3, metavar="N", help="epochs (default: 3)")
    parser.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="batch size (default: 32)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default: 0.1)")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                        help="torch.optim.SGD or AdamW (betas 0.9/0.999, eps 1e-8; --lr, --weight-decay apply); "
                             "DVEmb, the replay and the exact adjoint follow it (default: sgd)")
    parser.add_argument("--momentum", type=float, default=0.0,
                        help="SGD momentum (default: 0); DVEmb, the replay and the exact adjoint follow it")
    parser.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    parser.add_argument("--weight-decay", type=float, default=0.0,
                        help="weight decay: SGD's, or AdamW's decoupled one (default: 0)")
    parser.add_argument("--projection-dim", type=projection_dim, default=DEFAULT_PROJECTION_DIM, metavar="K|none",
                        help="per-layer projected size of DVEmb and the influence function "
                             f"(default: {DEFAULT_PROJECTION_DIM})")
    parser.add_argument("--config", action="append", default=[], metavar="NAME=JSON", type=config_argument,
                        help="an extra DVEmb configuration: Recorder keyword arguments (and compute_embeddings' "
                             "blocking, step_rank, second_moment, memory, precision) as a JSON object, e.g. "
                             "'full={\"step_rank\": null}', with --projection-dim unless it sets projection_dim; "
                             "dtypes by name (repeatable)")
    parser.add_argument("--resamples", type=positive_int, default=1000, metavar="N",
                        help="bootstrap resamples of the intervals (default: 1000)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def main(args: argparse.Namespace) -> int:
    """Runs `dvemb evaluate fidelity` with parsed ``args``; prints the table and writes the outputs."""
    options = options_from(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    study = run_study(options, show_progress=not args.no_progress)
    print(format_table(study))
    stem = output_stem(options)
    written = [out / f"fidelity-{stem}.json", out / f"scatter-{stem}.png"]
    written[0].write_text(json.dumps(study.to_dict(), indent=1))
    plot_scatter(study, written[1])
    if options.projection_sweep:
        written.append(out / f"projection-sweep-{stem}.png")
        plot_sweep(study, written[-1])
    print(f"\nwall time {study.seconds:.0f} s; wrote " + ", ".join(str(p) for p in written))
    return 0


def output_stem(options: FidelityOptions, optimizer: str | None = None) -> str:
    """The outputs' name: data, activation, the optimizer's part (``optimizer``; default: what differs from plain
    SGD) and what differs from the study's net, e.g. ``digits-gelu-momentum0.9-nesterov-depth2-hidden64``."""
    if optimizer is None:
        optimizer = ((f"-momentum{options.momentum:g}" if options.momentum else "")
                     + ("-nesterov" if options.nesterov else "") + ("-adamw" if options.optimizer == "adamw" else ""))
    hidden, depth = net_size(options.dataset, options.arch)
    return (f"{options.dataset}-{options.activation}" + ("-cnn" if options.arch == "cnn" else "") + optimizer
            + (f"-depth{options.depth}" if options.depth != depth else "")
            + (f"-hidden{options.hidden}" if options.hidden != hidden else ""))


def net_size(dataset: str, arch: str, hidden: int | None = None, depth: int | None = None) -> tuple[int, int]:
    """(hidden, depth) with the study's defaults for what is None: 8 channels and 2 convolutions for the CNN;
    128 (MNIST) or 32 (digits) units and 1 hidden layer for the MLP."""
    cnn = arch == "cnn"
    return hidden or (8 if cnn else 128 if dataset == "mnist" else 32), depth or (2 if cnn else 1)


def options_from(args: argparse.Namespace) -> FidelityOptions:
    """Study options from parsed arguments, with the dataset's defaults and ``--quick``'s limits."""
    mnist = args.dataset == "mnist"
    hidden, depth = net_size(args.dataset, args.arch, args.hidden, args.depth)
    options = FidelityOptions(
        dataset=args.dataset, data_dir=args.data_dir, arch=args.arch, activation=args.activation,
        records=args.records, seeds=args.seeds, train_size=args.train_size or (1000 if mnist else 640),
        val_size=args.val_size or (1000 if mnist else 297),
        hidden=hidden, depth=depth,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer, momentum=args.momentum,
        nesterov=args.nesterov,
        weight_decay=args.weight_decay, projection_dim=args.projection_dim,
        projection_sweep=args.projection_sweep, curvature_variant=not args.no_curvature_variant,
        extra_configs=dict(args.config), resamples=args.resamples)
    if not args.quick:
        return options
    return replace(options, records=min(options.records, 24), seeds=1, train_size=min(options.train_size, 192),
                   val_size=min(options.val_size, 200), hidden=min(options.hidden, 16),
                   resamples=min(options.resamples, 200))


def _load(options: FidelityOptions, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training subset and validation data of a seed, images flattened."""
    if options.dataset == "digits":
        x, y, x_val, y_val = load_digits_split(seed=seed)
        if options.train_size > len(y):
            raise ValueError(f"digits has {len(y)} training images, {options.train_size} asked")
        return x[: options.train_size], y[: options.train_size], x_val[: options.val_size], y_val[: options.val_size]
    x, y = load_mnist(options.data_dir, "train", limit=MNIST_POOL)
    if options.train_size > len(y):
        raise ValueError(f"the MNIST pool has {len(y)} training images, {options.train_size} asked")
    chosen = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[: options.train_size]
    x_val, y_val = load_mnist(options.data_dir, "test", limit=options.val_size)
    return x[chosen].flatten(1), y[chosen], x_val.flatten(1), y_val


def _mlp_factory(d_in: int, hidden: Sequence[int], classes: int, activation: str, seed: int) -> Callable[[], nn.Module]:
    """A factory of the seed's MLP ``d_in-hidden...-classes``, identical on every call."""

    def factory() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sizes = [d_in, *hidden]
            layers = [m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), ACTIVATIONS[activation]())]
            return nn.Sequential(*layers, nn.Linear(sizes[-1], classes))

    return factory


def _cnn_factory(d_in: int, channels: int, depth: int, classes: int, activation: str, seed: int
                 ) -> Callable[[], nn.Module]:
    """A factory of the seed's CNN on square images flattened to ``d_in`` values: ``depth`` 3x3 convolutions of
    stride 2 (``channels``, doubling), then a Linear classifier; identical on every call."""
    side = math.isqrt(d_in)
    if side * side != d_in:
        raise ValueError(f"--arch cnn needs square images; got {d_in} values per sample")

    def factory() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers: list[nn.Module] = [nn.Unflatten(1, (1, side, side))]
            width, size = 1, side
            for i in range(depth):
                layers += [nn.Conv2d(width, channels << i, 3, stride=2, padding=1), ACTIVATIONS[activation]()]
                width, size = channels << i, (size - 1) // 2 + 1
            return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * size * size, classes))

    return factory


def config_argument(text: str) -> tuple[str, dict[str, object]]:
    """``NAME=JSON`` as (name, Recorder keyword arguments), ``"dtype"`` turned into a torch dtype."""
    name, sep, body = text.partition("=")
    try:
        config = json.loads(body) if sep else None
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    if not name or not isinstance(config, dict):
        raise argparse.ArgumentTypeError(f"expected NAME=JSON-object, got {text!r}")
    if "dtype" in config:
        dtype = getattr(torch, str(config["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise argparse.ArgumentTypeError(f"{text!r}: unknown dtype {config['dtype']!r}")
        config["dtype"] = dtype
    return name, config


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m dvemb.studies.fidelity", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(main(_parser.parse_args()))
