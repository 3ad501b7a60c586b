"""Ground truth for evaluating attribution: exact TSLOO by replaying training."""

from dvemb.evaluate.replay import (
    Params,
    Record,
    Trajectory,
    TrainingSpec,
    all_epoch_removal,
    per_example_cross_entropy,
    records_of,
    single_records,
    train,
    tsloo,
)

__all__ = [
    "Params",
    "Record",
    "Trajectory",
    "TrainingSpec",
    "all_epoch_removal",
    "per_example_cross_entropy",
    "records_of",
    "single_records",
    "train",
    "tsloo",
]

from dvemb.evaluate.metrics import pearson, spearman
from dvemb.evaluate.recorded import record_run

__all__ += ["pearson", "spearman", "record_run"]

from dvemb.evaluate.baselines import (
    Estimator,
    exact_first_order,
    grad_dot,
    influence_function,
    standard_baselines,
    tracin_cp,
)
from dvemb.evaluate.fidelity import FidelityResult, Interval, bootstrap_interval, evaluate_fidelity

__all__ += [
    "Estimator",
    "exact_first_order",
    "grad_dot",
    "influence_function",
    "standard_baselines",
    "tracin_cp",
    "FidelityResult",
    "Interval",
    "bootstrap_interval",
    "evaluate_fidelity",
]
