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
