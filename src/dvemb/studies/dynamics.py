"""The `dvemb experiment dynamics` study: how a record's influence depends on when it was used.

Trains an MLP with plain SGD under a warm-up + cosine-decay learning rate, records every
step, and computes data value embeddings with influence checkpoints (Algorithm 2). It
writes three figures and ``dynamics.json`` to the output directory:

- ``regimes.png``: the mean |influence| of each step's records on a validation set,
  divided by that step's learning rate (as in the paper), with its median and quantile
  bands, and the three regimes found by :func:`detect_regimes` (high-impact warm-up,
  low-impact basin, ascent towards the end). The shaded regimes are those of the per-step
  median, which is robust to the one or two records that dominate a step's mean; the
  mean's regimes are reported beside them.
- ``decay.png``: the influence of the records used before the first checkpoint,
  measured relative to every later checkpoint (Algorithm 2), next to the similarity
  term that erodes it: later records g_s whose gradients align with the early record's
  g_t remove the part eta_s w (g_s . g_t) g_s of its embedding at each later step.
- ``topk.png``: the three most helpful training records of one test image relative to
  each checkpoint (the paper's Figure 5).

The data set, model and SGD helpers here are shared with the selection study.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import Influence, Recorder, Store, checkpoint_steps, compute_embeddings, influence, load_checkpoint
from ..evaluate.metrics import spearman
from ..progress import ProgressBar
from .common import (Split, add_common_arguments, config_from_args, load_split, make_mlp,
                     new_figure, sample_stream, sgd_step, show_image, torch_threads, write_json)
from ..store import MANIFEST, to_torch
from .schedules import WarmupCosine

TOP_K = 3
REGIME_NAMES = ("warm-up", "basin", "ascent")
REGIME_COLORS = {"warm-up": "tab:orange", "basin": "tab:green", "ascent": "tab:red"}
# Regime rule (see detect_regimes): a boundary is where the smoothed log-curve comes within
# ALPHA of its log-rise of the minimum; a side rising less than MIN_RISE has no regime.
ALPHA = 0.2
MIN_RISE = math.log(1.5)


# ---------------------------------------------------------------- configuration
@dataclass(frozen=True)
class DynamicsConfig:
    """Sizes of the dynamics study; serialised into dynamics.json."""

    dataset: str = "mnist"
    steps: int = 4000
    batch_size: int = 32
    hidden: int = 128
    lr: float = 0.08  # larger peaks (0.1 with a second hidden layer) made some segment propagators expand
    warmup_fraction: float = 0.1
    projection_dim: int = 1024
    checkpoints: int = 10
    n_val: int = 200
    n_probe: int = 256
    test_index: int = 0
    smooth_fraction: float = 0.03
    seed: int = 0


FULL = DynamicsConfig()
QUICK = DynamicsConfig(dataset="digits", steps=120, batch_size=16, hidden=32, lr=0.3, projection_dim=64,
                       checkpoints=4, n_val=40, n_probe=64)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dvemb experiment dynamics`."""
    add_common_arguments(parser, "results/dynamics")
    parser.add_argument("--steps", type=int, default=None, help=f"SGD steps (default: {FULL.steps})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"batch size (default: {FULL.batch_size})")
    parser.add_argument("--hidden", type=int, default=None, help=f"hidden units (default: {FULL.hidden})")
    parser.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default: {FULL.lr})")
    parser.add_argument("--warmup-fraction", type=float, default=None,
                        help=f"fraction of steps in the linear warm-up (default: {FULL.warmup_fraction})")
    parser.add_argument("--projection-dim", type=int, default=None,
                        help=f"projected gradient size per layer (default: {FULL.projection_dim})")
    parser.add_argument("--checkpoints", type=int, default=None,
                        help=f"evenly spaced influence checkpoints, the last at T (default: {FULL.checkpoints})")
    parser.add_argument("--n-val", type=int, default=None, help=f"validation images (default: {FULL.n_val})")
    parser.add_argument("--test-index", type=int, default=None,
                        help="held-out test image whose top records are tracked (default: 0)")
    parser.add_argument("--store", metavar="DIR", default=None,
                        help="keep the dvemb store here (replaced if present; default: a deleted temp directory)")


def main(args: argparse.Namespace) -> int:
    """Run the dynamics study from parsed arguments; returns the exit status."""
    config = config_from_args(FULL, QUICK, args)
    with torch_threads(args.threads):
        run_dynamics(config, Path(args.out), data_dir=args.data_dir, store=args.store,
                     show_progress=not args.no_progress)
    return 0


# ---------------------------------------------------------------- regimes
@dataclass(frozen=True)
class Regime:
    """Steps [start, stop) of a regime and its extreme on the smoothed curve: the peak, or the floor of the basin."""

    name: str
    start: int
    stop: int
    extreme: float


def smooth_log(curve: np.ndarray, window: int) -> np.ndarray:
    """Running median of log(curve) over 2 * (window // 2) + 1 steps, mirrored at the ends."""
    half = min(window // 2, len(curve) - 1)
    padded = np.pad(np.log(curve), half, mode="reflect")
    return np.median(np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1), axis=1)


def detect_regimes(curve: np.ndarray, window: int, alpha: float = ALPHA, min_rise: float = MIN_RISE) -> list[Regime]:
    """Warm-up, basin and ascent of a positive per-step curve; absent regimes are left out.

    Rule: y = running median of log(curve) over ``window`` steps; y_min at step m. On each
    side of m, the rise is the largest y there minus y_min. The basin is the steps from
    the first one with y <= y_min + alpha * left rise to the last one with
    y <= y_min + alpha * right rise; the warm-up is what precedes it, the ascent what
    follows. A side whose rise is below ``min_rise`` (log units) has no regime there.
    """
    y = smooth_log(curve, window)
    m = int(np.argmin(y))
    left_rise, right_rise = y[: m + 1].max() - y[m], y[m:].max() - y[m]
    start = int(np.argmax(y <= y[m] + alpha * left_rise)) if left_rise >= min_rise else 0
    stop = m + 1 + int(np.flatnonzero(y[m:] <= y[m] + alpha * right_rise)[-1]) if right_rise >= min_rise else len(y)
    extremes = (y[:max(start, 1)].max(), y[m], y[min(stop, len(y) - 1):].max())
    spans = zip(REGIME_NAMES, (0, start, stop), (start, stop, len(y)), extremes)
    return [Regime(name, a, b, float(np.exp(e))) for name, a, b, e in spans if b > a]


# ---------------------------------------------------------------- training and scoring
@contextlib.contextmanager
def store_directory(store: str | Path | None) -> Iterator[Path]:
    """The store path: ``store`` (an old store there is removed) or a temporary directory deleted afterwards."""
    if store is None:
        with tempfile.TemporaryDirectory(prefix="dvemb-dynamics-") as tmp:
            yield Path(tmp) / "store"
    else:
        path = Path(store)
        if (path / MANIFEST).is_file():
            shutil.rmtree(path)
        yield path


def even_checkpoints(steps: int, count: int) -> list[int]:
    """The interior boundaries of ``count`` evenly spaced segments of ``steps`` steps."""
    if not 2 <= count <= steps:
        raise ValueError(f"checkpoints must lie in [2, {steps}], got {count}")
    return sorted({round(j * steps / count) for j in range(1, count)})


def record_training(model: nn.Module, split: Split, schedule: WarmupCosine, config: DynamicsConfig, path: Path,
                    save_at: Sequence[int], show_progress: bool) -> np.ndarray:
    """Train with plain SGD under the schedule, recording every step; returns the per-step training loss."""
    batches = sample_stream(len(split.y_train), config.batch_size, config.steps, config.seed)
    losses = np.zeros(config.steps)
    with Recorder(model, path, projection_dim=config.projection_dim, seed=config.seed,
                  save_checkpoints=list(save_at)) as rec:
        for t in ProgressBar(range(config.steps), desc="training", unit="step", disable=not show_progress):
            ids, lr = batches[t], schedule(t)
            with rec.step(ids, lr=lr):
                loss = F.cross_entropy(model(split.x_train[ids]), split.y_train[ids])
                loss.backward()
            sgd_step(model, lr)
            losses[t] = loss.item()
    return losses


@dataclass(frozen=True)
class CheckpointScores:
    """Influence relative to each checkpoint; |influence| is averaged over the validation images."""

    steps: list[int]                 # checkpoint steps; the last is T
    early: np.ndarray                # [n_checkpoints, n_early]: records used before the first checkpoint
    val_loss: list[float]            # validation loss of the model at each checkpoint
    final: np.ndarray                # [n_records]: every record relative to T
    record_steps: np.ndarray         # [n_records]
    top: list[Influence]             # per checkpoint: the test image's TOP_K most helpful records


def score_checkpoints(path: Path, model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_val: int) -> CheckpointScores:
    """Score the first ``n_val`` rows of (x, y) (validation) and the last row (test image) at every checkpoint."""
    steps = checkpoint_steps(path)
    n_early = int(Store(path).step_starts[steps[0]])
    at_step = copy.deepcopy(model)
    early, val_loss, top = [], [], []
    for l, step in enumerate(steps):
        load_checkpoint(path, at_step, step)
        inf = influence(path, at_step, lambda: F.cross_entropy(at_step(x), y, reduction="none"), checkpoint=l)
        mean_abs = np.abs(inf.scores[:n_val]).mean(axis=0)
        early.append(mean_abs[:n_early])
        with torch.no_grad():
            val_loss.append(F.cross_entropy(at_step(x[:n_val]), y[:n_val]).item())
        best = np.argsort(-inf.scores[n_val])[:TOP_K]
        top.append(Influence(inf.scores[n_val:, best], inf.steps[best], inf.sample_ids[best]))
    # the last checkpoint is T, relative to which every record is scored
    return CheckpointScores(steps, np.stack(early), val_loss, mean_abs, inf.steps, top)


def stacked_grads(store: Store, rows: np.ndarray | slice) -> torch.Tensor:
    """The stored per-sample gradients of ``rows``, all tracked layers side by side, as float32."""
    return torch.cat([to_torch(store.grads(i)[rows], store.dtype).float() for i in range(len(store.layers))], dim=1)


@dataclass(frozen=True)
class Absorbed:
    """Per probe record and step bin: summed first-order shares and record counts ([n_probes, n_bins, 2]).

    [..., 0] counts later records with the probe's label, [..., 1] those with other labels.
    """

    share: np.ndarray
    count: np.ndarray


def absorbed_terms(path: Path, probes: np.ndarray, labels: torch.Tensor, edges: np.ndarray,
                   chunk_rows: int = 8192) -> Absorbed:
    """First-order share of each probe record's gradient removed by later steps, per bin of steps.

    For probe record r with stored gradient g_r and each later record i (step s in
    [edges[0], T), weight w, lr eta_s), the recursion removes eta_s w (g_i . g_r) g_i; its
    component along g_r, relative to |g_r|, is eta_s w (g_i . g_r)^2 / |g_r|^2 (dot
    products summed over the tracked layers). Bins are [edges[b], edges[b+1]).
    """
    store = Store(path)
    records = store.records
    g_probe = stacked_grads(store, probes)
    norm2 = (g_probe ** 2).sum(1, keepdim=True)
    probe_labels = labels[torch.from_numpy(np.array(records["sample_id"][probes]))]
    share = torch.zeros(len(probes), len(edges) - 1, 2, dtype=torch.float64)
    count = torch.zeros_like(share)
    for r0 in range(int(store.step_starts[edges[0]]), store.n_records, chunk_rows):
        r1 = min(r0 + chunk_rows, store.n_records)
        chunk = np.array(records[r0:r1])
        scale = torch.from_numpy(chunk["lr"] * chunk["weight"]).float()
        part = (g_probe @ stacked_grads(store, slice(r0, r1)).T) ** 2 * scale / norm2
        chunk_labels = labels[torch.from_numpy(np.ascontiguousarray(chunk["sample_id"]))]
        other = (chunk_labels[None, :] != probe_labels[:, None]).long()
        bins = torch.from_numpy(np.searchsorted(edges, chunk["step"], side="right") - 1)
        index = bins[None, :] * 2 + other
        share.view(len(probes), -1).scatter_add_(1, index, part.double())
        count.view(len(probes), -1).scatter_add_(1, index, torch.ones_like(part, dtype=torch.float64))
    return Absorbed(share.numpy(), count.numpy())


# ---------------------------------------------------------------- the study
def run_dynamics(config: DynamicsConfig, out: Path, *, data_dir: str | Path | None = None,
                 store: str | Path | None = None, show_progress: bool = True) -> dict:
    """Train, record, embed and score; write regimes.png, decay.png, topk.png and dynamics.json to ``out``."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    split = load_split(config.dataset, data_dir, config.n_val, config.seed)
    if not 0 <= config.test_index < len(split.y_test):
        raise ValueError(f"test_index must lie in [0, {len(split.y_test) - 1}], got {config.test_index}")
    schedule = WarmupCosine(config.lr, config.steps, round(config.warmup_fraction * config.steps))
    model = make_mlp(split.x_train.shape[1], config.hidden, config.seed)
    interior = even_checkpoints(config.steps, config.checkpoints)
    print(f"{config.dataset}: {len(split.y_train)} training images, MLP {split.x_train.shape[1]}-{config.hidden}-10, "
          f"{config.steps} SGD steps of {config.batch_size}, peak lr {config.lr} "
          f"({schedule.warmup} warm-up steps, cosine decay), projection {config.projection_dim} per layer, "
          f"checkpoints at {interior + [config.steps]}")
    x_query = torch.cat([split.x_val, split.x_test[config.test_index, None]])
    y_query = torch.cat([split.y_val, split.y_test[config.test_index, None]])
    with store_directory(store) as path:
        train_loss = record_training(model, split, schedule, config, path, interior, show_progress)
        compute_embeddings(path, checkpoints=interior, show_progress=show_progress)
        scores = score_checkpoints(path, model, x_query, y_query, config.n_val)
        probes = np.sort(np.random.default_rng(config.seed).choice(
            scores.early.shape[1], min(config.n_probe, scores.early.shape[1]), replace=False))
        edges = np.unique(np.r_[np.linspace(scores.steps[0], config.steps, 41).round().astype(np.int64), scores.steps])
        absorbed = absorbed_terms(path, probes, split.y_train, edges)
    result = summarise(config, schedule, split, model, scores, probes, absorbed, edges, train_loss)
    result["wall_time_s"] = round(time.perf_counter() - start, 1)
    plot_regimes(out / "regimes.png", result, scores, schedule, train_loss)
    plot_decay(out / "decay.png", result, absorbed, scores, probes)
    plot_topk(out / "topk.png", result, split)
    write_json(out / "dynamics.json", result)
    print(format_summary(result))
    print(f"figures {out / 'regimes.png'}, {out / 'decay.png'}, {out / 'topk.png'}; data {out / 'dynamics.json'}")
    print(f"total wall time {result['wall_time_s']:.1f} s")
    return result


@dataclass(frozen=True)
class StepCurves:
    """Per record: |influence| / lr of its step; per step: the mean and the median of that over its records."""

    normalised: np.ndarray
    mean: np.ndarray
    median: np.ndarray


def per_step_curves(scores: CheckpointScores, lrs: np.ndarray) -> StepCurves:
    """The lr-normalised influence of every record, and its mean and median per step (records sorted by step)."""
    normalised = scores.final / lrs[scores.record_steps]
    counts = np.bincount(scores.record_steps, minlength=len(lrs))
    mean = np.bincount(scores.record_steps, normalised, minlength=len(lrs)) / counts
    median = np.array([np.median(v) for v in np.split(normalised, np.cumsum(counts)[:-1])])
    return StepCurves(normalised, mean, median)


def regimes_json(regimes: Sequence[Regime]) -> list[dict]:
    """Regimes as JSON, each with its extreme relative to the basin's floor."""
    floor = next((r.extreme for r in regimes if r.name == "basin"), None)
    return [{**asdict(r), "ratio_to_floor": None if floor is None else r.extreme / floor} for r in regimes]


def rounded(values: np.ndarray, digits: int = 4) -> list[float]:
    """Values as a JSON list, to ``digits`` significant digits."""
    return [float(f"{v:.{digits}g}") for v in values]


def quartiles(values: np.ndarray, axis: int = -1) -> dict[str, list[float]]:
    """Median and quartiles along ``axis`` as JSON lists."""
    q = np.quantile(values, [0.25, 0.5, 0.75], axis=axis)
    return {"q25": q[0].tolist(), "median": q[1].tolist(), "q75": q[2].tolist()}


def summarise(config: DynamicsConfig, schedule: WarmupCosine, split: Split, model: nn.Module,
              scores: CheckpointScores, probes: np.ndarray, absorbed: Absorbed, edges: np.ndarray,
              train_loss: np.ndarray) -> dict:
    """Everything dynamics.json holds: settings, curves, regimes, decay and top-k evolution."""
    curves = per_step_curves(scores, schedule.values())
    window = max(3, round(config.smooth_fraction * config.steps))
    with torch.no_grad():
        logits = model(split.x_val)
    return {
        "config": asdict(config),
        "schedule": schedule.to_dict(),
        "validation": {"loss": F.cross_entropy(logits, split.y_val).item(),
                       "accuracy": (logits.argmax(1) == split.y_val).float().mean().item(),
                       "final_train_loss_mean_last_5pct": float(train_loss[-max(1, len(train_loss) // 20):].mean())},
        "curve": {"definition": "per step: mean (and median) over its records of (mean over the validation "
                                "images of |influence|) / lr of the step; smoothed: running median of the log",
                  "smooth_window": window,
                  "mean": rounded(curves.mean), "mean_smoothed": rounded(np.exp(smooth_log(curves.mean, window))),
                  "median": rounded(curves.median),
                  "median_smoothed": rounded(np.exp(smooth_log(curves.median, window)))},
        "regimes": {"median": regimes_json(detect_regimes(curves.median, window)),
                    "mean": regimes_json(detect_regimes(curves.mean, window))},
        "regime_rule": {"alpha": ALPHA, "min_rise_log": MIN_RISE, "shaded_in_figure": "median"},
        "checkpoint_steps": scores.steps,
        "decay": decay_json(scores, probes, absorbed, edges),
        "topk": topk_json(scores, split, config.test_index),
    }


def decay_json(scores: CheckpointScores, probes: np.ndarray, absorbed: Absorbed, edges: np.ndarray) -> dict:
    """Early records' influence per checkpoint, the similarity term (same vs other labels) and their relation."""
    total = absorbed.share.sum(axis=(1, 2))
    retention = scores.early[-1, probes] / scores.early[0, probes]
    cumulative = np.cumsum(absorbed.share, axis=1)
    same_share = absorbed.share[:, :, 0].sum(1) / total
    same_count = absorbed.count[:, :, 0].sum(1) / absorbed.count.sum((1, 2))
    return {
        "early_records": int(scores.early.shape[1]), "probe_records": len(probes),
        "early_influence": quartiles(scores.early, axis=1),
        "validation_loss_at_checkpoint": scores.val_loss,
        "absorbed_steps": edges[1:].tolist(),
        "absorbed_same_label": quartiles(cumulative[:, :, 0], axis=0),
        "absorbed_other_labels": quartiles(cumulative[:, :, 1], axis=0),
        "same_label_share_of_absorbed": float(np.median(same_share)),
        "same_label_share_of_later_records": float(np.median(same_count)),
        "same_label_per_record_ratio": float(np.median(same_share / same_count * (1 - same_count) / (1 - same_share))),
        "retention_final_over_first": quartiles(retention),
        "spearman_retention_vs_absorbed": spearman(retention, total),
    }


def topk_json(scores: CheckpointScores, split: Split, test_index: int) -> dict:
    """The test image's most helpful records (step, sample id, label, score) relative to each checkpoint."""
    return {"test_index": test_index, "label": int(split.y_test[test_index]),
            "checkpoints": [{"step": step, "top": [
                {"step": int(t), "sample_id": int(i), "label": int(split.y_train[int(i)]), "score": float(v)}
                for t, i, v in zip(inf.steps, inf.sample_ids, inf.scores[0])]}
                for step, inf in zip(scores.steps, scores.top)]}


# ---------------------------------------------------------------- figures and text
def binned_quantiles(steps: np.ndarray, values: np.ndarray, edges: np.ndarray,
                     qs: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(bin centres, [len(qs), n_bins] quantiles of ``values`` per bin of ``steps``, which must be sorted)."""
    cuts = np.searchsorted(steps, edges)
    keep = [b for b in range(len(edges) - 1) if cuts[b + 1] > cuts[b]]
    q = np.array([np.quantile(values[cuts[b]:cuts[b + 1]], qs) for b in keep]).T
    return (edges[:-1][keep] + edges[1:][keep]) / 2, q


def plot_regimes(path: Path, result: dict, scores: CheckpointScores, schedule: WarmupCosine,
                 train_loss: np.ndarray) -> None:
    """Save regimes.png: lr-normalised |influence| per step with quantile bands and regimes; lr and loss below."""
    lrs = schedule.values()
    curves = per_step_curves(scores, lrs)
    curve = result["curve"]
    steps = np.arange(len(lrs))
    fig = new_figure((11, 7.5))
    ax, low = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    edges = np.unique(np.linspace(0, len(lrs), 61).round())
    centres, q = binned_quantiles(scores.record_steps, curves.normalised, edges, (0.1, 0.25, 0.75, 0.9))
    ax.fill_between(centres, q[0], q[3], color="tab:blue", alpha=0.10, lw=0, label="10-90% of records")
    ax.fill_between(centres, q[1], q[2], color="tab:blue", alpha=0.22, lw=0, label="25-75% of records")
    ax.plot(steps, curves.mean, color="0.45", lw=0.4, alpha=0.5, label="mean over the step's records")
    ax.plot(steps, curve["mean_smoothed"], color="tab:blue", lw=2.2, label="mean, smoothed: regimes in the box")
    ax.plot(steps, curve["median_smoothed"], color="black", lw=2.2, label="median, smoothed: regimes shaded")
    ax.set_yscale("log")
    top = ax.get_ylim()[1]
    for r in result["regimes"]["median"]:
        ax.axvspan(r["start"], r["stop"], color=REGIME_COLORS[r["name"]], alpha=0.10, lw=0)
        ax.text((r["start"] + r["stop"]) / 2, top, f"{r['name']}\nsteps {r['start']}-{r['stop'] - 1}"
                f"{regime_height(r)}", ha="center", va="top", fontsize=9, color=REGIME_COLORS[r["name"]],
                fontweight="bold")
        if r["start"] > 0:
            for a in (ax, low):
                a.axvline(r["start"], color="0.3", ls="--", lw=0.8)
    mean_text = "\n".join(f"{r['name']}: steps {r['start']}-{r['stop'] - 1}{regime_height(r, ', ')}"
                           for r in result["regimes"]["mean"])
    ax.text(0.01, 0.02, "regimes of the mean:\n" + mean_text, transform=ax.transAxes, fontsize=8,
            color="tab:blue", va="bottom", bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "tab:blue"})
    ax.set_ylabel("|influence on val. loss| / lr of the step")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("How much each step's training records change the final validation loss, per unit learning rate",
                 fontsize=11)
    low.plot(steps, lrs, color="black", lw=1.2, label="learning rate")
    low.set_ylabel("learning rate")
    low.set_xlabel("training step")
    twin = low.twinx()
    window = max(1, len(train_loss) // 60)
    twin.plot(steps[window - 1:], np.convolve(train_loss, np.ones(window) / window, mode="valid"),
              color="tab:purple", lw=1, label=f"training loss ({window}-step mean)")
    twin.set_ylabel("training loss", color="tab:purple")
    twin.set_yscale("log")
    twin.tick_params(which="minor", labelright=False)
    low.legend(loc="upper center", fontsize=8)
    twin.legend(loc="upper right", fontsize=8)
    fig.savefig(path, dpi=110)


def regime_height(regime: dict, sep: str = "\n") -> str:
    """' peak Nx floor' text for the warm-up and ascent regimes; empty for the basin."""
    if regime["name"] == "basin" or regime["ratio_to_floor"] is None:
        return ""
    return f"{sep}peak {regime['ratio_to_floor']:.3g}x floor"


def plot_decay(path: Path, result: dict, absorbed: Absorbed, scores: CheckpointScores, probes: np.ndarray) -> None:
    """Save decay.png: early records' influence per checkpoint, the absorbed similarity term, and their relation."""
    decay = result["decay"]
    fig = new_figure((17.5, 5.2))
    a, b, c = fig.subplots(1, 3)
    steps = result["checkpoint_steps"]
    early = decay["early_influence"]
    a.fill_between(steps, early["q25"], early["q75"], color="tab:blue", alpha=0.2, lw=0)
    a.plot(steps, early["median"], "o-", color="tab:blue",
           label=f"{decay['early_records']} records of steps < {steps[0]}: median, 25-75%")
    a.set_yscale("log")
    a.set_xlabel("checkpoint step t_l (influence on the model at t_l)")
    a.set_ylabel("mean |influence| on val. loss at t_l")
    a.set_title(f"(a) influence of early records relative to successive checkpoints\n"
                f"(Algorithm 2): it falls {early['median'][0] / early['median'][-1]:.0f}x from step {steps[0]} to T",
                fontsize=10)
    twin = a.twinx()
    twin.plot(steps, decay["validation_loss_at_checkpoint"], "s--", color="0.5", ms=4, label="validation loss at t_l")
    twin.set_ylabel("validation loss at t_l", color="0.4")
    twin.set_yscale("log")
    a.legend(loc="upper right", fontsize=8)
    twin.legend(loc="lower left", fontsize=8)
    x = decay["absorbed_steps"]
    same = (f"\n({decay['same_label_share_of_later_records']:.0%} of the records, "
            f"{decay['same_label_share_of_absorbed']:.0%} of the term: "
            f"{decay['same_label_per_record_ratio']:.1f}x more per record)")
    for key, color, label in (("absorbed_same_label", "tab:green", "later records with the same label" + same),
                              ("absorbed_other_labels", "tab:red", "later records with other labels")):
        b.fill_between(x, decay[key]["q25"], decay[key]["q75"], color=color, alpha=0.2, lw=0)
        b.plot(x, decay[key]["median"], color=color, lw=2, label=label)
    b.axhline(1, color="0.3", ls=":", lw=1)
    b.set_yscale("log")
    b.set_xlabel(f"training step (from the first checkpoint, {steps[0]})")
    b.set_ylabel("cumulative sum of eta_s w (g_s . g_t)^2 / |g_t|^2")
    b.set_title(f"(b) similarity term of early record t with later records s\n"
                f"(median and 25-75% over {decay['probe_records']} early records)", fontsize=10)
    b.legend(fontsize=8)
    total = absorbed.share.sum(axis=(1, 2))
    retention = scores.early[-1, probes] / scores.early[0, probes]
    c.scatter(total, retention, s=8, alpha=0.6, color="tab:blue", lw=0)
    c.set_xscale("log")
    c.set_yscale("log")
    c.tick_params(which="minor", labelbottom=False, labelleft=False)
    c.set_xlabel(f"similarity term from step {steps[0]} to T (panel b, both curves)")
    c.set_ylabel(f"|influence| at T / |influence| at step {steps[0]}")
    c.set_title(f"(c) retention of influence vs similarity term\n"
                f"Spearman = {decay['spearman_retention_vs_absorbed']:+.2f} over {len(probes)} early records",
                fontsize=10)
    fig.savefig(path, dpi=110)


def plot_topk(path: Path, result: dict, split: Split) -> None:
    """Save topk.png: the test image and its most helpful training records relative to each checkpoint."""
    topk = result["topk"]
    columns = topk["checkpoints"]
    fig = new_figure((1.35 * (len(columns) + 1), 1.75 * TOP_K + 1.0))
    grid = fig.add_gridspec(TOP_K + 1, len(columns) + 1, height_ratios=[0.12] + [1] * TOP_K)
    ax = fig.add_subplot(grid[1:, 0])
    show_image(ax, split.x_test[topk["test_index"]], split.image_shape,
               f"test image #{topk['test_index']}\nlabel {topk['label']}", "black")
    for col, entry in enumerate(columns, start=1):
        header = fig.add_subplot(grid[0, col])
        header.axis("off")
        header.text(0.5, 0.0, f"checkpoint {entry['step']}", ha="center", va="bottom", fontsize=8, fontweight="bold")
        for rank, rec in enumerate(entry["top"]):
            ax = fig.add_subplot(grid[rank + 1, col])
            color = "tab:green" if rec["label"] == topk["label"] else "tab:red"
            show_image(ax, split.x_train[rec["sample_id"]], split.image_shape,
                       f"#{rank + 1}: step {rec['step']}\nlabel {rec['label']}, {rec['score']:+.1e}", color)
    fig.suptitle("Most helpful training records (rows: rank) relative to each checkpoint (columns)\n"
                 "green: same label as the test image, red: another label", fontsize=10)
    fig.savefig(path, dpi=110)


def format_summary(result: dict) -> str:
    """Regimes, decay and top-k evolution as text."""
    val, decay = result["validation"], result["decay"]
    lines = [f"validation loss {val['loss']:.4f}, accuracy {val['accuracy']:.1%}"]
    for what, regimes in result["regimes"].items():
        lines += ["", f"regimes of the {what} lr-normalised |influence| per step (steps [start, stop); "
                      "peak or floor of the smoothed curve):"]
        for r in regimes:
            ratio = "" if r["ratio_to_floor"] is None else f"  = {r['ratio_to_floor']:6.2f}x floor"
            lines.append(f"  {r['name']:<8} {r['start']:>6} - {r['stop']:<6} "
                         f"{'floor' if r['name'] == 'basin' else 'peak '} {r['extreme']:.3e}{ratio}")
    early = decay["early_influence"]["median"]
    lines += ["", f"early records (steps < {result['checkpoint_steps'][0]}): median |influence| "
                  f"{early[0]:.2e} at step {result['checkpoint_steps'][0]} -> {early[-1]:.2e} at T; "
                  f"same-label records give {decay['same_label_share_of_absorbed']:.0%} of the similarity term "
                  f"({decay['same_label_share_of_later_records']:.0%} of the records); Spearman(retention, term) "
                  f"{decay['spearman_retention_vs_absorbed']:+.2f}", "",
              f"top-{TOP_K} helpful records of test image #{result['topk']['test_index']} "
              f"(label {result['topk']['label']}) per checkpoint (step/label/score):"]
    for entry in result["topk"]["checkpoints"]:
        cells = "   ".join(f"{r['step']:>5}/{r['label']}/{r['score']:+.2e}" for r in entry["top"])
        lines.append(f"  ckpt {entry['step']:>6}:  {cells}")
    return "\n".join(lines)
