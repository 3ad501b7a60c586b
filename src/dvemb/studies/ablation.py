"""`dvemb evaluate ablation`: where data value embeddings lose fidelity, one approximation at a time.

The fidelity study's run (MLP on MNIST or digits, plain SGD, SGD with momentum or AdamW) is
scored by the first-order adjoint (``dvemb.evaluate.adjoint``) under every combination of

* curvature: the paper's gradient outer product, the one-sample Fisher, the Gauss-Newton
  matrix (= the true Fisher for softmax cross-entropy) and the exact Hessian;
* blocking: per layer or global;
* projection: the Recorder's per-layer Kronecker projection at ``--projection-dim``, or none;
* for AdamW: the second moment's path followed or frozen (``/frozen-v``). Projected layers are whitened
  and follow v through the rank-1 factored model, as the Recorder does (``dvemb.embed.factored``).

The adjoint computes exactly what data value embeddings compute with the same options
(tests/evaluate/test_adjoint.py), so each cell is what that configuration of dvemb would score,
and the exact Hessian, global, unprojected, full-moment cell is the exact first-order ceiling.
Every estimate is compared with the ground truth of replaying training (single-epoch and
all-epoch removal), as in ``dvemb evaluate fidelity``; TracIn-CP is given for reference.
With ``--lm`` the run is the language-model fidelity study's instead (``dvemb.studies.lm_ablation``);
``--cells`` restricts the grid to the named cells.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch.func import vmap

from ..capture.options import DEFAULT_GGN_RANK
from ..evaluate.adjoint import AdjointOptions, adjoint_estimate
from ..evaluate.baselines import Estimator, tracin_cp
from ..evaluate.fidelity import ALL_EPOCH, SINGLE, evaluate_fidelity
from ..evaluate.functions import LayerProjection, RunFunctions, layer_projections
from ..evaluate.replay import Params, Trajectory
from ..cli import positive_int, projection_dim
from .fidelity import SETTING_LABELS, FidelityOptions, StudyRun, build_run, net_description, net_size, summarise
from .fidelity import output_stem as fidelity_stem

CURVATURE_NAMES = {"gradient_outer": "gradient outer product (paper)", "fisher": "Fisher, 1 sampled label",
                   "ggn": "Gauss-Newton", "hessian": "exact Hessian"}
OPTIMIZERS = {  # the runs: plain SGD, SGD with momentum 0.9, AdamW
    "sgd": dict(optimizer="sgd", lr=0.1),
    "momentum": dict(optimizer="sgd", lr=0.01, momentum=0.9),
    "adamw": dict(optimizer="adamw", lr=1e-3, weight_decay=0.01),
}


def variants(projection_dim: int | None, adam: bool, curvatures=tuple(CURVATURE_NAMES)) -> dict[str, AdjointOptions]:
    """Every cell of the ablation: ``curvature/blocking/projection[/frozen]`` -> adjoint options."""
    cells = {}
    for curvature in curvatures:
        for blocking in ("layer", "global"):
            for k in (projection_dim, None):
                name = f"{curvature}/{blocking}/{'exact' if k is None else f'k{k}'}"
                cells[name] = AdjointOptions(curvature, blocking, k, 0, "full")
                if adam:
                    cells[name + "/frozen-v"] = AdjointOptions(curvature, blocking, k, 0, "frozen")
    return cells


def restrict(cells: dict[str, AdjointOptions], names: Sequence[str] | None) -> dict[str, AdjointOptions]:
    """``cells`` limited to ``names`` (in their order; None: all of them); an unknown name is an error."""
    if names is None:
        return cells
    unknown = [n for n in names if n not in cells]
    if unknown:
        raise ValueError(f"unknown cells {unknown}; cells: {', '.join(cells)}")
    return {n: cells[n] for n in names}


def projection_estimators(options: FidelityOptions, curvature: str = "ggn") -> dict[str, Estimator]:
    """Global ``curvature`` under each of :func:`projection_variants` (and none)."""
    names = ["kron 32x32", "pca first batch", "pca first 8 steps", "kfac first batch", "pca first batch + half random",
             "pca first batch + quarter random", "pca all steps"]
    adjoint = AdjointOptions(curvature, "global", options.projection_dim, 0,
                             "frozen" if options.optimizer == "adamw" else "full")

    def estimator(name: str, trajectory: Trajectory, records, target):
        projections = projection_variants(trajectory, options.projection_dim)
        return adjoint_estimate(trajectory, records, target, adjoint, projections=projections[name])

    out: dict[str, Estimator] = {f"{curvature}/global/{n}": partial(estimator, n) for n in names}
    out[f"{curvature}/global/exact"] = partial(adjoint_estimate, options=replace(adjoint, projection_dim=None))
    return out


def run_ablation(options: FidelityOptions, curvatures=tuple(CURVATURE_NAMES), show_progress: bool = False,
                 projections: bool = False, only: Sequence[str] | None = None) -> dict:
    """Every variant (or those named in ``only``) and TracIn-CP on every seed; Spearman/Pearson per setting,
    averaged over seeds.

    With ``projections``, instead: global curvature under each projection of :func:`projection_variants`.
    """
    cells = {} if projections else restrict(variants(options.projection_dim, options.optimizer == "adamw",
                                                     curvatures), only)
    estimators = {name: partial(adjoint_estimate, options=o) for name, o in cells.items()}
    if projections:
        for curvature in curvatures:
            estimators.update(projection_estimators(options, curvature))
    runs = (build_run(options, seed) for seed in range(options.seeds))
    return {"options": options.to_dict(), **score_runs(runs, cells, estimators, options.resamples, show_progress)}


def score_runs(runs: Iterable[StudyRun], cells: Mapping[str, AdjointOptions], estimators: Mapping[str, Estimator],
               resamples: int, show_progress: bool = False) -> dict:
    """``estimators`` plus TracIn-CP against the replayed removals of each run (one per seed, seeded by its
    position); the summary per setting and method, the cells' options and the wall times."""
    start = time.perf_counter()
    estimators = {**estimators, "tracin-cp": tracin_cp}
    results = []
    for seed, run in enumerate(runs):
        print(f"seed {seed}: {run.spec.num_steps} steps, {len(estimators) - 1} variants", flush=True)
        results.append(evaluate_fidelity(run.spec, run.validation, records=run.records, samples=run.samples,
                                         dvemb_configs={}, baselines=estimators, resamples=resamples,
                                         seed=seed, show_progress=show_progress))
    summary = summarise(results, resamples)
    return {"cells": {n: asdict(o) for n, o in cells.items()}, "seconds": time.perf_counter() - start,
            "summary": {s: [m.to_dict() for m in methods] for s, methods in summary.items()},
            "method_seconds": {k: sum(r.seconds.get(k, 0.0) for r in results) for k in estimators}}


def format_table(result: dict, title: str | None = None) -> str:
    """Markdown: one row per variant, Spearman single-epoch / all-epoch (mean over seeds); ``title`` above it
    (default: the run's description)."""
    o = result["options"]
    if title is None:
        net = net_description(o.get("arch", "mlp"), o.get("depth", 1), o["hidden"])
        nesterov = " (Nesterov)" if o.get("nesterov") else ""
        title = (f"{o['dataset']} {net} {o['activation']}, optimizer {o['optimizer']} lr {o['lr']}"
                 f" momentum {o['momentum']}{nesterov} weight decay {o['weight_decay']}; "
                 f"{o['records']} samples x {o['seeds']} seeds")
    by_setting = {s: {m["method"]: m for m in methods} for s, methods in result["summary"].items()}
    lines = [title, "", f"| variant | {SETTING_LABELS[SINGLE]} | {SETTING_LABELS[ALL_EPOCH]} |", "| --- | --- | --- |"]
    for name in by_setting[SINGLE]:
        cells = [by_setting[s][name]["spearman"] for s in (SINGLE, ALL_EPOCH)]
        lines.append(f"| {name} | " + " | ".join(f"{c['value']:.3f} [{c['low']:.3f}, {c['high']:.3f}]"
                                                 for c in cells) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of `dvemb evaluate ablation` to ``parser``."""
    parser.add_argument("--lm", action="store_true",
                        help="the run of `dvemb evaluate lm-fidelity` (GPT-2, AdamW, text; --data) instead of the MLP")
    parser.add_argument("--data", metavar="PATH", default=None,
                        help="with --lm: a .tar.gz of plain-text files, e.g. the Shakespeare plays (default: pydoc topics)")
    parser.add_argument("--dataset", choices=("digits", "mnist"), default="digits")
    parser.add_argument("--data-dir", metavar="PATH", default=None, help="folder with MNIST's idx(.gz) files")
    parser.add_argument("--arch", choices=("mlp", "cnn"), default="mlp",
                        help="the fidelity study's net: the MLP, or its CNN (2 stride-2 3x3 convolutions, a classifier)")
    parser.add_argument("--activation", choices=("relu", "gelu", "tanh"), default="gelu")
    parser.add_argument("--training", choices=sorted(OPTIMIZERS), default="sgd",
                        help="sgd (lr 0.1), momentum (0.9, lr 0.01) or adamw (lr 1e-3, weight decay 0.01); "
                             "--lm: always the LM study's AdamW")
    parser.add_argument("--records", type=positive_int, default=None, metavar="N",
                        help="samples whose removal is scored, per seed (default: 100; --lm: 64)")
    parser.add_argument("--seeds", type=positive_int, default=3, metavar="N")
    parser.add_argument("--hidden", type=positive_int, default=None, metavar="N",
                        help="hidden units (default: 128 on MNIST, 32 on digits); --arch cnn: first channels (8)")
    parser.add_argument("--depth", type=positive_int, default=None, metavar="N",
                        help="hidden layers (default: 1); --arch cnn: convolutions (2)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: --training's)")
    parser.add_argument("--momentum", type=float, default=None, help="SGD momentum (default: --training's)")
    parser.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD with --momentum)")
    parser.add_argument("--projection-dim", type=projection_dim, default=1024, metavar="K")
    parser.add_argument("--curvatures", default=",".join(CURVATURE_NAMES),
                        help=f"comma-separated subset of {', '.join(CURVATURE_NAMES)}")
    parser.add_argument("--cells", default=None, metavar="NAMES",
                        help="comma-separated cells to run, e.g. ggn/global/exact (default: every cell)")
    parser.add_argument("--ggn-rank", type=positive_int, default=DEFAULT_GGN_RANK, metavar="K",
                        help=f"with --lm: passes of the .../sampled cells (default {DEFAULT_GGN_RANK}, the Recorder's)")
    parser.add_argument("--projections", action="store_true",
                        help="compare projections of the first layer at the same budget (global curvature)")
    parser.add_argument("--out", metavar="DIR", default="ablation-results")
    parser.add_argument("--quick", action="store_true", help="a small run for smoke tests")


def main(args: argparse.Namespace) -> int:
    """Runs `dvemb evaluate ablation`; prints the table and writes JSON and Markdown."""
    curvatures = tuple(c.strip() for c in args.curvatures.split(","))
    unknown = set(curvatures) - set(CURVATURE_NAMES)
    if unknown:
        raise ValueError(f"unknown curvatures {sorted(unknown)}")
    only = None if args.cells is None else [c.strip() for c in args.cells.split(",")]
    if args.lm:
        from .lm_ablation import main as lm_main  # it builds on this module

        return lm_main(args, curvatures, only)
    mnist = args.dataset == "mnist"
    hidden, depth = net_size(args.dataset, args.arch, args.hidden, args.depth)
    options = FidelityOptions(dataset=args.dataset, data_dir=args.data_dir, arch=args.arch, activation=args.activation,
                              records=args.records or 100, seeds=args.seeds, train_size=1000 if mnist else 640,
                              val_size=1000 if mnist else 297, hidden=hidden, depth=depth,
                              projection_dim=args.projection_dim, curvature_variant=False,
                              **training_options(args))
    if args.quick:
        options = replace(options, records=12, seeds=1, train_size=96, val_size=64, hidden=8, resamples=100)
    result = run_ablation(options, curvatures, projections=args.projections, only=only)
    write_outputs(result, format_table(result), Path(args.out), output_stem(options, args.training, args.projections))
    return 0


def output_stem(options: FidelityOptions, training: str, projections: bool) -> str:
    """The outputs' name: the fidelity study's (:func:`~dvemb.studies.fidelity.output_stem`) with ``--training``
    and what differs from its preset as the optimizer's part, e.g.
    ``ablation-digits-gelu-momentum-lr0.05-nesterov-depth2-hidden64``."""
    preset = OPTIMIZERS[training]
    optimizer = (f"-{training}" + (f"-lr{options.lr:g}" if options.lr != preset["lr"] else "")
                 + (f"-momentum{options.momentum:g}" if options.momentum != preset.get("momentum", 0.0) else "")
                 + ("-nesterov" if options.nesterov else ""))
    return f"ablation-{fidelity_stem(options, optimizer)}" + ("-projections" if projections else "")


def training_options(args: argparse.Namespace) -> dict:
    """The optimizer's options: ``--training``'s preset with ``--lr``, ``--momentum`` and ``--nesterov`` over it."""
    chosen = {"lr": args.lr, "momentum": args.momentum, "nesterov": args.nesterov or None}
    return {**OPTIMIZERS[args.training], **{k: v for k, v in chosen.items() if v is not None}}


def write_outputs(result: dict, table: str, out: Path, stem: str) -> None:
    """Prints ``table`` and writes ``result`` to ``out/stem.json``, ``table`` to ``out/stem.md``."""
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(table + "\n")
    print(f"\nwall time {result['seconds']:.0f} s; wrote {out / stem}.json and .md")


# -- projections -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DenseProjection:
    """A dense Gaussian map of a layer's whole gradient [W | b] to ``dim`` coordinates (a reference: the
    Kronecker trick cannot compute it without forming per-sample gradients)."""

    weight: str
    bias: str | None
    matrix: torch.Tensor  # [dim, numel(W) + numel(b)]

    @property
    def dim(self) -> int:
        return self.matrix.shape[0]

    def project(self, grads: Params) -> torch.Tensor:
        flat = torch.cat([grads[n].flatten(1) for n in (self.weight, self.bias) if n], 1)
        return flat @ self.matrix.T

    def lift(self, rows: torch.Tensor, like: Params) -> Params:
        flat, out, offset = rows @ self.matrix, {}, 0
        for n in (self.weight, self.bias):
            if n:
                size = like[n].numel()
                out[n] = flat[:, offset: offset + size].reshape(-1, *like[n].shape)
                offset += size
        return out


def _gaussian(k: int, d: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    if k >= d:
        return torch.eye(d, dtype=dtype)
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype) / k ** 0.5


def kronecker_split(base: list[LayerProjection], sides: tuple[int, int], seed: int) -> list[LayerProjection]:
    """The first layer's Kronecker projection with (k_in, k_out) = ``sides`` (Gaussian), the others unchanged."""
    first = base[0]
    d_in, d_out = first.p_in.shape[1], first.p_out.shape[1]
    k_in, k_out = min(sides[0], d_in), min(sides[1], d_out)
    dtype = first.p_in.dtype
    return [replace(first, p_in=_gaussian(k_in, d_in, seed, dtype), p_out=_gaussian(k_out, d_out, seed + 1, dtype)),
            *base[1:]]


def gradient_pca(run: RunFunctions, base: list[LayerProjection], fit: Sequence[tuple[int, list[int]]],
                 factors: str = "gradient", random_share: float = 0.0) -> list[LayerProjection]:
    """Each layer's sides replaced by the top eigenvectors of sum_i G_i^T G_i (input) and sum_i G_i G_i^T
    (output) over per-sample gradients G_i at the ``fit`` (step, samples): a data-fitted Kronecker basis.
    ``factors="kfac"``: of sum_i a_i a_i^T and sum_i ds_i ds_i^T instead (one-token layers with a bias:
    ds_i is G_i's bias column). ``random_share`` of each side's rows are Gaussian directions orthogonal
    to the fitted ones (rows scaled to keep squared norms in expectation)."""
    sums = [[0.0, 0.0] for _ in base]
    for t, ids in fit:
        grads = run.sample_gradients(run.trajectory.params_at(t), ids)
        for k, layer in enumerate(base):
            g = vmap(layer.as_matrix)(grads[layer.weight])
            if layer.bias is not None:
                g = torch.cat([g, grads[layer.bias].unsqueeze(-1)], -1)
            if factors == "kfac":
                ds = g[:, :, -1]
                a = torch.einsum("noi,no->ni", g, ds) / (ds * ds).sum(1, keepdim=True).clamp(min=1e-300)
                sums[k][0] = sums[k][0] + a.T @ a
                sums[k][1] = sums[k][1] + ds.T @ ds
            else:
                sums[k][0] = sums[k][0] + torch.einsum("noi,noj->ij", g, g)
                sums[k][1] = sums[k][1] + torch.einsum("nio,njo->ij", g, g)
    out = []
    for layer, (inner, outer) in zip(base, sums):
        out.append(replace(layer, p_in=_fitted(inner, layer.p_in.shape[0], random_share),
                           p_out=_fitted(outer, layer.p_out.shape[0], random_share)))
    return out


def _fitted(moment: torch.Tensor, k: int, random_share: float) -> torch.Tensor:
    """k rows: the top eigenvectors of ``moment``, the last ``random_share`` of them random in their complement."""
    d = moment.shape[0]
    vectors = torch.linalg.eigh(moment).eigenvectors.flip(1)  # descending
    n_random = int(round(random_share * k)) if k < d else 0
    fitted = vectors[:, : k - n_random].T
    if not n_random:
        return fitted.contiguous()
    rest = vectors[:, k - n_random:]  # the complement's orthonormal basis, d - k + n_random columns
    gauss = torch.randn(n_random, rest.shape[1], generator=torch.Generator().manual_seed(d), dtype=moment.dtype)
    scale = (rest.shape[1] / n_random) ** 0.5  # E[P^T P] = I on the complement
    return torch.cat([fitted, scale * gauss @ rest.T / rest.shape[1] ** 0.5]).contiguous()


def projection_variants(trajectory: Trajectory, k: int, seed: int = 0) -> dict[str, list]:
    """Projections of the first (large) layer to compare at the same budget ``k``: Kronecker splits, data-fitted
    Kronecker bases (first batch at theta_0, or every step: an upper bound), and a dense Gaussian reference."""
    run = RunFunctions(trajectory)
    base = layer_projections(run.model, k, 0, trajectory.spec.dtype)
    side = int(k ** 0.5)
    first = base[0]
    n_first = first.p_in.shape[1] * first.p_out.shape[1]
    spec = trajectory.spec
    out = {f"kron {side}x{side}": base}
    for k_in in (side // 4, side * 4):
        out[f"kron in {k_in} x out {k // k_in}"] = kronecker_split(base, (k_in, k // k_in), seed)
    out["pca first batch"] = gradient_pca(run, base, [(0, spec.batch(0))])
    out["pca first 8 steps"] = gradient_pca(run, base, [(t, spec.batch(t)) for t in range(8)])
    out["kfac first batch"] = gradient_pca(run, base, [(0, spec.batch(0))], "kfac")
    out["pca first batch + half random"] = gradient_pca(run, base, [(0, spec.batch(0))], random_share=0.5)
    out["pca first batch + quarter random"] = gradient_pca(run, base, [(0, spec.batch(0))], random_share=0.25)
    out["pca all steps"] = gradient_pca(run, base, [(t, spec.batch(t)) for t in range(0, spec.num_steps, 4)])
    out["dense"] = [DenseProjection(first.weight, first.bias, _gaussian(k, n_first, seed, spec.dtype)), *base[1:]]
    return out
