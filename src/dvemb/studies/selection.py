"""The `dvemb experiment selection` study: online data selection, and when in training it pays.

Every SGD step draws a candidate pool of ``pool_factor * batch_size`` training samples.
In the steps of the selection window the batch keeps the ``batch_size`` candidates whose
last-layer gradient best aligns with the mean last-layer gradient of a freshly drawn
validation batch; in the other steps it is the pool's first ``batch_size`` candidates, a
uniform random batch. Pools, initialisation and learning rates are identical across
windows for a seed, so the windows differ only in where selection happens:

- ``none``, ``all``;
- ``early`` (the first ``window_fraction`` of steps), ``late`` (the last), ``early+late``;
- ``middle``: the central ``2 * window_fraction``, a control with the cost of early+late.

The paper's claim under test: selecting only early and late is close to selecting in every
step, at a fraction of the selection cost. Writes ``selection.png`` and ``selection.json``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..progress import ProgressBar
from .common import (N_CLASSES, Split, add_common_arguments, config_from_args, load_split, make_mlp, new_figure,
                     sample_stream, sgd_step, torch_threads, write_json)
from .schedules import WarmupCosine

WINDOWS = ("none", "all", "early", "late", "early+late", "middle")
WINDOW_COLORS = {"none": "0.4", "all": "black", "early": "tab:orange", "late": "tab:purple",
                 "early+late": "tab:red", "middle": "tab:cyan"}
# The claim counts as confirmed when early+late recovers at least this share of the
# final-loss improvement that selecting in all steps brings over no selection.
CLAIM_RECOVERY = 0.8


@dataclass(frozen=True)
class SelectionConfig:
    """Sizes of the selection study; serialised into selection.json."""

    dataset: str = "mnist"
    steps: int = 2000
    batch_size: int = 32
    pool_factor: int = 2
    hidden: int = 128
    lr: float = 0.08
    warmup_fraction: float = 0.1
    window_fraction: float = 0.2
    label_noise: float = 0.0
    n_val: int = 1000
    val_batch: int = 128
    seeds: int = 5
    eval_points: int = 41
    seed: int = 0


FULL = SelectionConfig()
QUICK = SelectionConfig(dataset="digits", steps=90, batch_size=16, hidden=32, lr=0.3, n_val=60, val_batch=32,
                        seeds=3, eval_points=4)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dvemb experiment selection`."""
    add_common_arguments(parser, "results/selection")
    parser.add_argument("--steps", type=int, default=None, help=f"SGD steps per run (default: {FULL.steps})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"batch size (default: {FULL.batch_size})")
    parser.add_argument("--pool-factor", type=int, default=None,
                        help=f"candidates per step = pool factor x batch size (default: {FULL.pool_factor})")
    parser.add_argument("--hidden", type=int, default=None, help=f"hidden units (default: {FULL.hidden})")
    parser.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default: {FULL.lr})")
    parser.add_argument("--window-fraction", type=float, default=None,
                        help=f"length of the early and of the late window, as a fraction of the steps "
                             f"(default: {FULL.window_fraction})")
    parser.add_argument("--label-noise", type=float, default=None,
                        help=f"fraction of training labels replaced by another class (default: {FULL.label_noise})")
    parser.add_argument("--n-val", type=int, default=None,
                        help=f"validation images that selection aligns with (default: {FULL.n_val}); the rest "
                             "of the held-out images give the reported loss")
    parser.add_argument("--seeds", type=int, default=None, help=f"runs per window (default: {FULL.seeds})")


def main(args: argparse.Namespace) -> int:
    """Run the selection study from parsed arguments; returns the exit status."""
    with torch_threads(args.threads):
        run_selection(config_from_args(FULL, QUICK, args), Path(args.out), data_dir=args.data_dir,
                      show_progress=not args.no_progress)
    return 0


# ---------------------------------------------------------------- the selection rule
def window_mask(window: str, steps: int, fraction: float) -> np.ndarray:
    """Boolean [steps]: the steps in which ``window`` selects."""
    t = np.arange(steps)
    span = round(fraction * steps)
    early, late = t < span, t >= steps - span
    masks = {"none": np.zeros(steps, bool), "all": np.ones(steps, bool), "early": early, "late": late,
             "early+late": early | late, "middle": np.abs(t - (steps - 1) / 2) < span}
    if window not in masks:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    return masks[window]


def last_layer_factors(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input of the last linear layer with a 1 appended for the bias, d loss / d logits = softmax - one-hot).

    A sample's cross-entropy gradient for the last layer's [weight | bias] is the outer
    product of the two factors' rows.
    """
    h = model[:-1](x)
    delta = torch.softmax(model[-1](h), dim=1) - F.one_hot(y, N_CLASSES).to(h.dtype)
    return torch.cat([h, torch.ones_like(h[:, :1])], dim=1), delta


def alignment_scores(h: torch.Tensor, delta: torch.Tensor, h_val: torch.Tensor,
                     delta_val: torch.Tensor) -> torch.Tensor:
    """Each candidate's last-layer gradient dotted with the validation batch's mean last-layer gradient.

    With g_i = delta_i h_i^T and G = mean_v delta_v h_v^T, g_i . G = delta_i^T G h_i, so
    no per-sample gradient is ever formed.
    """
    g_val = delta_val.T @ h_val / len(h_val)
    return ((delta @ g_val) * h).sum(dim=1)


def select_aligned(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor,
                   y_val: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` candidates whose gradients best align with the validation batch's (descending)."""
    with torch.no_grad():
        scores = alignment_scores(*last_layer_factors(model, x, y), *last_layer_factors(model, x_val, y_val))
    return torch.topk(scores, k).indices


def flip_labels(y: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A copy of ``y`` in which a random ``fraction`` of labels is replaced by a different random class."""
    gen = torch.Generator().manual_seed(seed)
    noisy = y.clone()
    flipped = torch.randperm(len(y), generator=gen)[: round(fraction * len(y))]
    noisy[flipped] = (y[flipped] + torch.randint(1, N_CLASSES, (len(flipped),), generator=gen)) % N_CLASSES
    return noisy


# ---------------------------------------------------------------- training runs
@dataclass(frozen=True)
class Run:
    """One training run: held-out loss at the evaluation steps, final loss and accuracy, selection time."""

    window: str
    seed: int
    eval_steps: list[int]
    losses: list[float]
    final_accuracy: float
    selection_seconds: float


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on (x, y)."""
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train_run(split: Split, labels: torch.Tensor, mask: np.ndarray, config: SelectionConfig, window: str,
              seed: int) -> Run:
    """Train one model with selection in the steps where ``mask`` is true; labels are the (noisy) training labels."""
    schedule = WarmupCosine(config.lr, config.steps, round(config.warmup_fraction * config.steps))
    model = make_mlp(split.x_train.shape[1], config.hidden, seed)
    pools = sample_stream(len(labels), config.pool_factor * config.batch_size, config.steps, seed)
    val_gen = torch.Generator().manual_seed(seed + 1)
    eval_at = set(np.linspace(0, config.steps, config.eval_points).round().astype(int).tolist())
    losses, selecting = [], 0.0
    for t in range(config.steps + 1):
        if t in eval_at:
            losses.append(evaluate(model, split.x_test, split.y_test)[0])
        if t == config.steps:
            break
        batch = pools[t, : config.batch_size]
        if mask[t]:
            started = time.perf_counter()
            v = torch.randint(len(split.y_val), (config.val_batch,), generator=val_gen)
            batch = pools[t, select_aligned(model, split.x_train[pools[t]], labels[pools[t]],
                                            split.x_val[v], split.y_val[v], config.batch_size)]
            selecting += time.perf_counter() - started
        F.cross_entropy(model(split.x_train[batch]), labels[batch]).backward()
        sgd_step(model, schedule(t))
    accuracy = evaluate(model, split.x_test, split.y_test)[1]
    return Run(window, seed, sorted(eval_at), losses, accuracy, selecting)


# ---------------------------------------------------------------- the study
def run_selection(config: SelectionConfig, out: Path, *, data_dir: str | Path | None = None,
                  show_progress: bool = True) -> dict:
    """Train every window with every seed; write selection.png and selection.json to ``out``."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if config.pool_factor < 1 or config.seeds < 1 or not 0 < config.window_fraction <= 0.25:
        raise ValueError("need pool_factor >= 1, seeds >= 1 and 0 < window_fraction <= 0.25")
    split = load_split(config.dataset, data_dir, config.n_val, config.seed)
    labels = flip_labels(split.y_train, config.label_noise, config.seed)
    print(f"{config.dataset}: {len(labels)} training images ({config.label_noise:.0%} labels flipped), "
          f"MLP {split.x_train.shape[1]}-{config.hidden}-10, {config.steps} SGD steps of {config.batch_size} "
          f"from pools of {config.pool_factor * config.batch_size}, peak lr {config.lr}; "
          f"{len(WINDOWS)} windows x {config.seeds} seeds; loss on {len(split.y_test)} held-out images")
    jobs = [(w, config.seed + s) for w in WINDOWS for s in range(config.seeds)]
    runs = [train_run(split, labels, window_mask(w, config.steps, config.window_fraction), config, w, s)
            for w, s in ProgressBar(jobs, desc="runs", unit="run", disable=not show_progress)]
    result = summarise(config, runs)
    result["wall_time_s"] = round(time.perf_counter() - start, 1)
    plot_selection(out / "selection.png", result)
    write_json(out / "selection.json", result)
    print(format_table(result))
    print(f"figure {out / 'selection.png'}; data {out / 'selection.json'}; total wall time {result['wall_time_s']} s")
    return result


def summarise(config: SelectionConfig, runs: list[Run]) -> dict:
    """Per window: cost, final loss and accuracy (mean, std over seeds), curves; and the verdict on the claim."""
    windows = {}
    for w in WINDOWS:
        mine = [r for r in runs if r.window == w]
        curves = np.array([r.losses for r in mine])
        accuracy = np.array([r.final_accuracy for r in mine])
        windows[w] = {
            "cost": float(window_mask(w, config.steps, config.window_fraction).mean()),
            "final_loss_mean": float(curves[:, -1].mean()), "final_loss_std": float(spread(curves[:, -1])),
            "final_accuracy_mean": float(accuracy.mean()), "final_accuracy_std": float(spread(accuracy)),
            "selection_seconds_mean": float(np.mean([r.selection_seconds for r in mine])),
            "final_losses": curves[:, -1].tolist(),
            "curve_mean": curves.mean(0).tolist(), "curve_std": spread(curves).tolist(),
        }
    return {"config": asdict(config), "eval_steps": runs[0].eval_steps, "windows": windows,
            "claim": verdict(windows)}


def spread(values: np.ndarray) -> np.ndarray:
    """Sample standard deviation over seeds (axis 0); zero for a single seed."""
    return values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros_like(values[0])


def verdict(windows: dict) -> dict:
    """How much of all-steps selection's gain over none each window recovers, and whether early+late is close."""
    none, full = windows["none"]["final_loss_mean"], windows["all"]["final_loss_mean"]
    gain = none - full
    noise = windows["none"]["final_loss_std"] + windows["all"]["final_loss_std"]
    recovered = {w: (none - v["final_loss_mean"]) / gain if gain else None for w, v in windows.items()}
    none_per_seed = np.array(windows["none"]["final_losses"])
    gain_per_seed = none_per_seed - np.array(windows["all"]["final_losses"])
    spread_per_seed = {w: float(spread((none_per_seed - v["final_losses"]) / gain_per_seed))
                       if np.all(gain_per_seed != 0) else None for w, v in windows.items()}
    ok = gain > noise and recovered["early+late"] >= CLAIM_RECOVERY
    if gain <= noise:
        text = (f"not testable: selecting in all steps changes the final loss by {gain:+.4f}, within the seed "
                f"spread ({noise:.4f})")
    else:
        text = (f"{'agrees' if ok else 'disagrees'}: early+late recovers {recovered['early+late']:.0%} of the "
                f"all-steps gain ({gain:.4f}) at {windows['early+late']['cost']:.0%} of the selection cost "
                f"(threshold {CLAIM_RECOVERY:.0%}); the same-cost middle window recovers "
                f"{recovered['middle']:.0%}, early alone {recovered['early']:.0%}, late alone {recovered['late']:.0%}")
    return {"holds": bool(ok), "statement": text, "all_steps_gain": gain, "recovered_share": recovered,
            "recovered_share_std_over_seeds": spread_per_seed,
            "threshold": CLAIM_RECOVERY}


def format_table(result: dict) -> str:
    """The per-window results as a text table, and the verdict."""
    claim = result["claim"]
    lines = [f"{'window':<11} {'cost':>5}  {'final held-out loss':>21}  {'accuracy':>15}  {'gain recovered':>15}",
             "-" * 76]
    for w, v in result["windows"].items():
        share, std = claim["recovered_share"][w], claim["recovered_share_std_over_seeds"][w]
        recovered = "" if share is None else f"{share:.0%}" + ("" if std is None else f" ± {std:.0%}")
        lines.append(f"{w:<11} {v['cost']:>5.0%}  {v['final_loss_mean']:>10.4f} ± {v['final_loss_std']:<8.4f}  "
                     f"{v['final_accuracy_mean']:>7.2%} ± {v['final_accuracy_std']:<5.2%}  {recovered:>15}")
    return "\n".join(lines + ["", "paper's claim (early+late close to all steps): " + result["claim"]["statement"]])


def plot_selection(path: Path, result: dict) -> None:
    """Save selection.png: held-out loss curves per window, their second half, and the final loss per window."""
    fig = new_figure((16, 5))
    full, tail, final = fig.subplots(1, 3)
    steps = np.array(result["eval_steps"])
    late = steps >= steps[-1] * 0.5
    shares = result["claim"]["recovered_share"]
    for row, (w, v) in enumerate(result["windows"].items()):
        mean, std = np.array(v["curve_mean"]), np.array(v["curve_std"])
        for ax, keep in ((full, slice(None)), (tail, late)):
            ax.fill_between(steps[keep], (mean - std)[keep], (mean + std)[keep], color=WINDOW_COLORS[w],
                            alpha=0.12, lw=0)
            ax.plot(steps[keep], mean[keep], color=WINDOW_COLORS[w], lw=1.6, label=f"{w} ({v['cost']:.0%})")
        final.errorbar(v["final_loss_mean"], row, xerr=v["final_loss_std"], fmt="o", capsize=4, ms=7,
                       color=WINDOW_COLORS[w])
        if shares[w] is not None:
            final.annotate(f"{shares[w]:.0%}", (v["final_loss_mean"], row), textcoords="offset points",
                           xytext=(0, 7), ha="center", fontsize=9)
    seeds = result["config"]["seeds"]
    full.set_yscale("log")
    full.set_title(f"(a) held-out loss, mean ± std over {seeds} seeds (legend: selection cost)", fontsize=10)
    tail.set_title("(b) the second half of training", fontsize=10)
    for ax in (full, tail):
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out cross-entropy")
    full.legend(fontsize=8)
    final.set_yticks(range(len(result["windows"])),
                     [f"{w}\ncost {v['cost']:.0%}" for w, v in result["windows"].items()], fontsize=9)
    final.set_ylim(len(result["windows"]) - 0.4, -0.6)
    final.set_xlabel("final held-out loss (mean ± std over seeds)")
    final.set_title("(c) final loss per selection window; number: share of the\n"
                    "gain of selecting in all steps over none that the window recovers", fontsize=10)
    fig.savefig(path, dpi=110)
