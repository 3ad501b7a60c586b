"""`dvemb evaluate ablation --lm`: the ablation's cells on the language-model fidelity study's run.

The run is `dvemb evaluate lm-fidelity`'s (a small GPT-2 trained from scratch with AdamW on windows of
a corpus, float64, sequence loss = a window's mean next-token cross-entropy), with its defaults;
each seed's run comes from :func:`dvemb.studies.lm_fidelity.build_run`. The cells are those of
:func:`dvemb.studies.ablation.variants` (curvature x blocking x projection x Adam's second moment),
plus, for every projected cell, its twin on the Recorder's own fitted bases (``.../fitted``: the run
recorded by the Recorder with its defaults at ``--projection-dim``, the bases read back from the
store), which is the projection `dvemb`'s defaults use, and for every Gauss-Newton cell its twin on the
Recorder's sampled curvature (``.../sampled``: each token's rank-3 part, summed over a window's tokens
with random signs, as ``curvature_samples=3`` records it). Cells that cannot be computed on a sequence
loss are skipped, each with its reason in the table and the JSON.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np

from ..capture.options import DEFAULT_GGN_RANK
from ..evaluate.adjoint import AdjointOptions, adjoint_estimate
from ..evaluate.baselines import Estimator
from ..evaluate.functions import LayerProjection, Target, spec_projections
from ..evaluate.recorded import record_run
from ..evaluate.replay import Record, TrainingSpec, Trajectory
from ..store import Store
from .ablation import format_table, restrict, score_runs, variants, write_outputs
from .fidelity import StudyRun
from .lm_fidelity import LMFidelityOptions, build_run
from .text import corpus_name, tokenized_windows

UNSUPPORTED = {"fisher": "the one-sample Fisher draws one class label per sample from the model; a window's "
                         "next-token labels (shifted by one position) are not sampled by the adjoint"}
"""Curvatures the adjoint cannot apply to a sequence loss, with the reason."""

QUICK = dict(vocab_size=260, seq_len=12, n_train=32, n_val=8, records=6, seeds=1, n_embd=16, n_head=2, n_layer=1,
             resamples=100, projection_dim=32)
"""``--quick``: a GPT-2 small enough for a smoke test."""


class FittedBases:
    """The Recorder's fitted projections of a run at ``projection_dim``: recorded once per run, then reused."""

    def __init__(self, projection_dim: int) -> None:
        self.projection_dim = projection_dim
        self._last: tuple[TrainingSpec, list[LayerProjection]] | None = None

    def __call__(self, trajectory: Trajectory) -> list[LayerProjection]:
        """Projections of the tracked layers on the bases the Recorder fits on ``trajectory``'s run."""
        spec = trajectory.spec
        if self._last is None or self._last[0] is not spec:
            with tempfile.TemporaryDirectory(prefix="dvemb-ablation-") as directory:
                store = Path(directory) / "store"
                model = record_run(spec, store, projection_dim=self.projection_dim)
                self._last = (spec, spec_projections(model, Store(store).layers, spec.dtype))
        return self._last[1]


def fitted_estimate(bases: FittedBases, options: AdjointOptions, trajectory: Trajectory, records: Sequence[Record],
                    target: Target) -> np.ndarray:
    """:func:`adjoint_estimate` under ``options`` in the space of the Recorder's fitted bases."""
    return adjoint_estimate(trajectory, records, target, options, projections=bases(trajectory))


def lm_cells(options: LMFidelityOptions, curvatures: Sequence[str], only: Sequence[str] | None = None,
             ggn_rank: int = DEFAULT_GGN_RANK
             ) -> tuple[dict[str, AdjointOptions], dict[str, Estimator], dict[str, str]]:
    """The cells to run (``only``: those named), their estimators, and the skipped cells with their reasons;
    ``ggn_rank``: the sampled cells' passes (the Recorder's ``curvature_samples``)."""
    cells: dict[str, AdjointOptions] = {}
    for name, cell in variants(options.projection_dim, True, curvatures).items():
        twins = [name] + ([f"{name}/fitted"] if cell.projection_dim is not None else [])
        cells.update((twin, cell) for twin in twins)
        if cell.curvature == "ggn":  # the Recorder's sampled rows instead of exact GGN products
            cells.update((f"{twin}/sampled", replace(cell, ggn_rank=ggn_rank)) for twin in twins)
    skipped = {f"{c}/*": UNSUPPORTED[c] for c in curvatures if c in UNSUPPORTED}
    cells = restrict({n: c for n, c in cells.items() if c.curvature not in UNSUPPORTED},
                     None if only is None else [n for n in only if n.split("/")[0] not in UNSUPPORTED])
    bases = FittedBases(options.projection_dim)
    estimators = {name: partial(fitted_estimate, bases, c) if "/fitted" in name
                  else partial(adjoint_estimate, options=c) for name, c in cells.items()}
    return cells, estimators, skipped


def run_lm_ablation(options: LMFidelityOptions, curvatures: Sequence[str], only: Sequence[str] | None = None,
                    ggn_rank: int = DEFAULT_GGN_RANK,
                    show_progress: bool = False) -> dict:
    """Every cell (or those in ``only``) and TracIn-CP on each seed's LM run, against replayed training."""
    cells, estimators, skipped = lm_cells(options, curvatures, only, ggn_rank)
    _, tokens = tokenized_windows(options.data, options.vocab_size, options.seq_len)
    runs = (StudyRun(*build_run(options, tokens, seed)) for seed in range(options.seeds))
    result = score_runs(runs, cells, estimators, options.resamples, show_progress)
    return {"options": asdict(options), "restricted": only is not None,
            "source": corpus_name(options.data),
            "skipped": skipped, **result}


def title(result: dict) -> str:
    """The table's heading: the run, the grid (complete or restricted) and the skipped cells with their reasons."""
    o = result["options"]
    lines = [f"GPT-2 {o['n_layer']} layers x {o['n_embd']}, {o['n_train']} windows of {o['seq_len']} tokens "
             f"({result['source']}), AdamW lr {o['lr']} weight decay {o['weight_decay']}, {o['epochs']} epochs, "
             f"projection {o['projection_dim']} per layer; {o['records']} windows x {o['seeds']} seeds; "
             f"Spearman, mean over seeds [95% bootstrap interval]; wall time {result['seconds']:.0f} s"]
    if result["restricted"]:
        lines.append("Grid restricted (--cells) to the cells below.")
    reasons: dict[str, list[str]] = {}
    for name, reason in result["skipped"].items():
        reasons.setdefault(reason, []).append(name)
    lines += [f"Skipped {', '.join(names)}: {reason}." for reason, names in reasons.items()]
    return "\n".join(lines)


def main(args: argparse.Namespace, curvatures: Sequence[str], only: Sequence[str] | None) -> int:
    """Runs `dvemb evaluate ablation --lm` with parsed ``args``; prints the table and writes JSON and Markdown."""
    options = LMFidelityOptions(data=args.data, seeds=args.seeds, records=args.records or 64,
                                projection_dim=args.projection_dim)
    if args.quick:
        options = replace(options, **QUICK)
    result = run_lm_ablation(options, curvatures, only, args.ggn_rank)
    write_outputs(result, format_table(result, title(result)), Path(args.out), "ablation-lm-adamw")
    return 0
