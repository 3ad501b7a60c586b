"""What a Recorder records: its options, validated once and stored with the run in the manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import torch

from .curvature import CURVATURES, Curvature
from ..projection import DEFAULT_PROJECTION_DIM, PROJECTIONS, ProjectionKind

Reduction = Literal["mean", "sum"]
DEFAULT_GGN_RANK = 3
"""Gauss-Newton passes per sample by default: the output curvature's 2 leading factors and a random-sign sum of
the others (unbiased; see capture/curvature.py and docs/results.md)."""


@dataclass(frozen=True)
class RecorderOptions:
    """The Recorder's settings (see :class:`~dvemb.Recorder` for their meaning).

    The defaults are the most faithful configuration that scales: fitted projections of 1024 values
    per layer, and the Gauss-Newton curvature in 3 passes per sample (2 leading factors, the rest by random signs).
    """

    projection_dim: int | None = DEFAULT_PROJECTION_DIM
    seed: int = 0
    dtype: str = "float32"
    modules: None | str | tuple[str, ...] = None
    reduction: Reduction = "mean"
    projection: ProjectionKind = "fitted"
    curvature: Curvature = "ggn"
    curvature_samples: int | None = DEFAULT_GGN_RANK
    save_checkpoints: int | tuple[int, ...] | None = None
    fit_steps: int | None = None
    fsync: bool = False

    def __post_init__(self) -> None:
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {self.reduction!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if self.curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {self.curvature!r}")
        if self.curvature_samples is not None and self.curvature_samples < 1:
            raise ValueError(f"curvature_samples must be >= 1, got {self.curvature_samples}")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError(f"projection_dim must be a positive int or None, got {self.projection_dim}")
        if self.fit_steps is not None and self.fit_steps < 1:
            raise ValueError(f"fit_steps must be a positive int or None, got {self.fit_steps}")
        every = self.save_checkpoints
        if isinstance(every, int) and every < 1:
            raise ValueError(f"save_checkpoints must be a positive interval or a list of steps, got {every}")

    @classmethod
    def of(cls, dtype: torch.dtype | str, modules: None | str | Sequence[str],
           save_checkpoints: int | Sequence[int] | None, **others: object) -> "RecorderOptions":
        """Options from the Recorder's keyword arguments (torch dtype, lists) in their stored form."""
        name = str(dtype).removeprefix("torch.")
        steps = save_checkpoints if save_checkpoints is None or isinstance(save_checkpoints, int) else tuple(
            int(s) for s in save_checkpoints)
        chosen = modules if modules is None or isinstance(modules, str) else tuple(modules)
        return cls(dtype=name, modules=chosen, save_checkpoints=steps, **others)  # type: ignore[arg-type]

    @property
    def torch_dtype(self) -> torch.dtype:
        """The storage dtype as a torch dtype."""
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        """JSON form for the manifest."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
