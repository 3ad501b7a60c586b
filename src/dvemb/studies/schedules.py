"""Learning-rate schedules for the studies: linear warm-up, then cosine decay."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``peak * final_fraction``.

    Step t < warmup has lr ``peak * (t + 1) / warmup``; the last step (``total - 1``)
    has exactly ``peak * final_fraction``, which stays positive so that influence
    can be normalised by the step's learning rate.
    """

    peak: float
    total: int
    warmup: int
    final_fraction: float = 0.01

    def __post_init__(self) -> None:
        if self.peak <= 0 or not 0 < self.final_fraction <= 1:
            raise ValueError(f"need peak > 0 and 0 < final_fraction <= 1, got {self.peak}, {self.final_fraction}")
        if not 0 <= self.warmup < self.total:
            raise ValueError(f"need 0 <= warmup < total, got warmup={self.warmup}, total={self.total}")

    def __call__(self, step: int) -> float:
        """Learning rate of ``step`` (0-based)."""
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - 1 - self.warmup)
        return self.peak * (self.final_fraction + (1 - self.final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))

    def values(self) -> np.ndarray:
        """Learning rates of all ``total`` steps."""
        return np.array([self(t) for t in range(self.total)])

    def to_dict(self) -> dict:
        """JSON form, with the schedule's name."""
        return {"kind": "linear warm-up + cosine decay", **asdict(self)}
