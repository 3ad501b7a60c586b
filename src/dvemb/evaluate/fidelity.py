"""Fidelity: how well attribution estimates agree with the ground-truth TSLOO of one run.

:func:`evaluate_fidelity` trains a :class:`~dvemb.evaluate.TrainingSpec` once, replays it to get
the exact TSLOO of every removal on the mean validation loss, records the same run with the
:class:`~dvemb.Recorder` under each named configuration to score it with DVEmb, runs every
baseline on the same trajectory, and reports Spearman and Pearson correlations with bootstrap
95% intervals per method.

Two removal settings are evaluated:

* ``single-record``: each given record ``(step, sample_id)`` removed on its own (records of the
  last epoch give the paper's single-epoch removal);
* ``all-epoch``: every record of each given sample removed. Each method's estimate is the sum of
  its per-record estimates (first order), which for DVEmb equals ``Influence.by_sample()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..embed.compute import compute_embeddings
from ..query import influence
from .baselines import Estimator, Target, standard_baselines
from .metrics import pearson, spearman
from .recorded import record_run
from .replay import Record, TrainingSpec, Trajectory, all_epoch_removal, single_records, train, tsloo

SINGLE = "single-record"
"""Setting name: each record removed on its own."""

ALL_EPOCH = "all-epoch"
"""Setting name: every record of a sample removed."""

DEFAULT_DVEMB_CONFIGS: Mapping[str, Mapping[str, object]] = {"dvemb": {}}
"""DVEmb under the Recorder's defaults."""

Metric = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class Interval:
    """A statistic with its bootstrap confidence interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        """``value [low, high]`` with three decimals."""
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def to_dict(self) -> dict[str, float]:
        """JSON form."""
        return {"value": self.value, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class MethodFidelity:
    """One method's estimates in one setting and their agreement with the ground truth."""

    method: str
    estimates: np.ndarray
    spearman: Interval
    pearson: Interval

    def to_dict(self) -> dict[str, object]:
        """JSON form."""
        return {"method": self.method, "estimates": self.estimates.tolist(),
                "spearman": self.spearman.to_dict(), "pearson": self.pearson.to_dict()}


@dataclass(frozen=True)
class SettingFidelity:
    """Ground truth and every method's agreement with it for one removal setting."""

    setting: str
    removals: tuple[tuple[Record, ...], ...]
    truth: np.ndarray
    methods: tuple[MethodFidelity, ...]

    def method(self, name: str) -> MethodFidelity:
        """The result of the method called ``name``."""
        for result in self.methods:
            if result.method == name:
                return result
        raise KeyError(f"no method {name!r}; methods: {[m.method for m in self.methods]}")

    def to_dict(self) -> dict[str, object]:
        """JSON form."""
        return {"setting": self.setting, "removals": [[list(r) for r in removal] for removal in self.removals],
                "truth": self.truth.tolist(), "methods": [m.to_dict() for m in self.methods]}


@dataclass(frozen=True)
class FidelityResult:
    """Every setting's results, the DVEmb configurations, and the wall time of each stage."""

    settings: tuple[SettingFidelity, ...]
    dvemb_configs: Mapping[str, Mapping[str, object]]
    baselines: tuple[str, ...]
    seconds: Mapping[str, float]
    resamples: int

    @property
    def methods(self) -> tuple[str, ...]:
        """Method names in report order: DVEmb configurations, then baselines."""
        return (*self.dvemb_configs, *self.baselines)

    def setting(self, name: str) -> SettingFidelity:
        """The results of the setting called ``name`` (:data:`SINGLE` or :data:`ALL_EPOCH`)."""
        for result in self.settings:
            if result.setting == name:
                return result
        raise KeyError(f"no setting {name!r}; settings: {[s.setting for s in self.settings]}")

    def to_dict(self) -> dict[str, object]:
        """JSON form."""
        return {
            "settings": [s.to_dict() for s in self.settings],
            "dvemb_configs": {name: jsonable_config(c) for name, c in self.dvemb_configs.items()},
            "baselines": list(self.baselines),
            "seconds": dict(self.seconds),
            "resamples": self.resamples,
        }

    def to_json(self) -> str:
        """The result as a JSON document."""
        return json.dumps(self.to_dict(), indent=1)


def evaluate_fidelity(
    spec: TrainingSpec,
    validation: tuple[torch.Tensor, torch.Tensor],
    *,
    records: Sequence[Record] = (),
    samples: Sequence[int] = (),
    dvemb_configs: Mapping[str, Mapping[str, object]] = DEFAULT_DVEMB_CONFIGS,
    baselines: Mapping[str, Estimator] | None = None,
    resamples: int = 1000,
    seed: int = 0,
    workdir: str | os.PathLike | None = None,
    show_progress: bool = False,
) -> FidelityResult:
    """Scores single-record removal of ``records`` and all-epoch removal of ``samples`` by every method.

    The target is the mean validation loss ``spec.loss(model(x_val), y_val).mean()``.
    ``dvemb_configs`` maps names to Recorder keyword arguments (``projection_dim``, ``dtype``,
    ``curvature``, ...) plus optionally ``compute_embeddings`` options (:data:`EMBEDDING_OPTIONS`); each
    records the run into ``workdir/NAME`` (a temporary directory when omitted) and is scored on the mean of the per-example validation losses. ``baselines`` maps
    names to estimators (default: :func:`~dvemb.evaluate.baselines.standard_baselines`).
    Intervals resample removals ``resamples`` times with generator seed ``seed``.
    """
    estimators = standard_baselines() if baselines is None else dict(baselines)
    clash = set(dvemb_configs) & set(estimators)
    if clash:
        raise ValueError(f"method names used by both a DVEmb configuration and a baseline: {sorted(clash)}")
    removals = {SINGLE: single_records(records), ALL_EPOCH: all_epoch_removal(spec, samples)}
    removals = {name: group for name, group in removals.items() if group}
    if not removals:
        raise ValueError("give records (single-record removal) or samples (all-epoch removal) to evaluate")
    x_val, y_val = (t.to(spec.inputs.device) for t in validation)
    validation = (x_val.to(spec.dtype) if x_val.is_floating_point() else x_val, y_val)
    seconds: dict[str, float] = {}
    with _timed(seconds, "train"):
        trajectory = train(spec, keep_steps=range(spec.num_steps), show_progress=show_progress)
    everything = [removal for group in removals.values() for removal in group]
    with _timed(seconds, "ground truth"):
        truth = tsloo(spec, everything, _mean_loss(spec, validation), trajectory=trajectory,
                      show_progress=show_progress)[0]
    pool = sorted({record for removal in everything for record in removal})
    estimates = _estimates(trajectory, validation, pool, dvemb_configs, estimators, workdir, seconds)
    settings, offset = [], 0
    for name, group in removals.items():
        part, offset = truth[offset : offset + len(group)], offset + len(group)
        methods = tuple(method_fidelity(m, _sum_over(group, pool, e), part, resamples, seed)
                        for m, e in estimates.items())
        settings.append(SettingFidelity(name, tuple(tuple(r) for r in group), part, methods))
    return FidelityResult(tuple(settings), dict(dvemb_configs), tuple(estimators), seconds, resamples)


def method_fidelity(method: str, estimates: np.ndarray, truth: np.ndarray, resamples: int, seed: int) -> MethodFidelity:
    """Spearman and Pearson of one method's estimates against the truth, with bootstrap intervals."""
    groups = [(estimates, truth)]
    return MethodFidelity(method, estimates, bootstrap_interval(groups, spearman, resamples=resamples, seed=seed),
                          bootstrap_interval(groups, pearson, resamples=resamples, seed=seed))


def bootstrap_interval(
    groups: Sequence[tuple[np.ndarray, np.ndarray]],
    metric: Metric,
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Mean over groups of ``metric(estimate, truth)`` with a percentile bootstrap interval.

    Each resample draws the pairs of every group with replacement, within the group (groups are,
    for instance, independent seeds of a study); one group gives the ordinary bootstrap.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}")
    rng = np.random.default_rng(seed)
    with np.errstate(invalid="ignore", divide="ignore"):  # a degenerate resample gives NaN, left out
        value = float(np.mean([metric(e, t) for e, t in groups]))
        draws = [np.mean([metric(e[index], t[index]) for e, t in groups
                          for index in [rng.integers(0, len(t), len(t))]]) for _ in range(resamples)]
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(draws, [tail, 100 - tail])
    return Interval(value, float(low), float(high))


def jsonable_config(config: Mapping[str, object]) -> dict[str, object]:
    """Recorder keyword arguments with torch dtypes written as their names (``"float64"``)."""
    return {k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v for k, v in config.items()}


EMBEDDING_OPTIONS = ("blocking", "step_rank", "second_moment", "memory", "precision")
"""Keys of a DVEmb configuration that go to ``compute_embeddings``; the others go to the Recorder."""


def _dvemb_estimates(
    spec: TrainingSpec,
    validation: tuple[torch.Tensor, torch.Tensor],
    pool: Sequence[Record],
    config: Mapping[str, object],
    path: Path,
) -> np.ndarray:
    """DVEmb's estimate of each pooled record on the mean validation loss, under one configuration."""
    if path.exists():
        raise FileExistsError(f"{path} already exists: give evaluate_fidelity an empty workdir")
    model = record_run(spec, path, **{k: v for k, v in config.items() if k not in EMBEDDING_OPTIONS})
    embedding = {k: v for k, v in config.items() if k in EMBEDDING_OPTIONS}
    if embedding:
        compute_embeddings(path, show_progress=False, **embedding)  # type: ignore[arg-type]
    x_val, y_val = validation
    result = influence(path, model, lambda: spec.loss(model(x_val), y_val))
    scores = result.scores.mean(axis=0)
    position = {record: k for k, record in enumerate(pool)}
    estimates = np.zeros(len(pool))
    for k, record in enumerate(zip(result.steps.tolist(), result.sample_ids.tolist())):
        if record in position:  # a sample twice in one batch has two rows: they add up
            estimates[position[record]] += scores[k]
    return estimates


def _estimates(
    trajectory: Trajectory,
    validation: tuple[torch.Tensor, torch.Tensor],
    pool: Sequence[Record],
    dvemb_configs: Mapping[str, Mapping[str, object]],
    estimators: Mapping[str, Estimator],
    workdir: str | os.PathLike | None,
    seconds: dict[str, float],
) -> dict[str, np.ndarray]:
    """Every method's estimate of each pooled record; each method's wall time goes into ``seconds``."""
    estimates = {}
    with _workspace(workdir) as directory:
        for name, config in dvemb_configs.items():
            with _timed(seconds, name):
                estimates[name] = _dvemb_estimates(trajectory.spec, validation, pool, config, directory / name)
    target = _mean_loss(trajectory.spec, validation)
    for name, estimator in estimators.items():
        with _timed(seconds, name):
            estimates[name] = estimator(trajectory, pool, target)[0]
    return estimates


def _mean_loss(spec: TrainingSpec, validation: tuple[torch.Tensor, torch.Tensor]) -> Target:
    """The target: ``model -> spec.loss(model(x_val), y_val).mean()``."""
    x_val, y_val = validation
    return lambda model: spec.loss(model(x_val), y_val).mean()


def _sum_over(removals: Sequence[Sequence[Record]], pool: Sequence[Record], estimates: np.ndarray) -> np.ndarray:
    """Each removal's estimate: the sum of its records' estimates (first order)."""
    position = {record: k for k, record in enumerate(pool)}
    return np.array([sum(estimates[position[r]] for r in removal) for removal in removals], dtype=np.float64)


@contextlib.contextmanager
def _timed(seconds: dict[str, float], key: str) -> Iterator[None]:
    """Adds the wall time of the block to ``seconds[key]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def _workspace(workdir: str | os.PathLike | None) -> Iterator[Path]:
    """``workdir`` (created if needed), or a temporary directory removed afterwards."""
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        yield Path(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="dvemb-fidelity-") as directory:
        yield Path(directory)
