"""Seeded random projections of the two Kronecker factors of a layer gradient.

A layer gradient G (d_out x d_in) is projected as P_out G P_in^T, computed from the
factors (P_out ds)(P_in a)^T so the full per-sample gradient is never formed.
Every factor of every layer has its own seed, stored in the manifest, so the exact
same matrices are rebuilt at query time. A factor is never projected *up*: when the
budget for a side reaches its dimension the identity is used instead.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

ProjectionKind = Literal["gaussian", "rademacher", "identity"]


def derive_seed(seed: int, *parts: str) -> int:
    """Return a stable 63-bit seed for (seed, parts), independent of Python's hash salt."""
    digest = hashlib.sha256("/".join((str(seed), *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def split_budget(d_in: int, d_out: int, budget: int | None) -> tuple[int, int]:
    """Split a per-layer budget into (k_in, k_out) with k_in * k_out <= budget.

    Both sides are compressed by the same ratio sqrt(budget / (d_in d_out)), so
    neither factor is favoured; a side whose share would reach its dimension is kept
    exact and the remainder goes to the other side. ``None`` means no projection.
    """
    if budget is None or d_in * d_out <= budget:
        return d_in, d_out
    if budget < 1:
        raise ValueError(f"projection_dim must be >= 1, got {budget}")
    ratio = math.sqrt(budget / (d_in * d_out))
    k_out = max(1, min(d_out, round(d_out * ratio)))
    k_in = max(1, min(d_in, budget // k_out))
    if k_in == d_in:  # input side saturated: give the rest of the budget to the output side
        k_out = max(1, min(d_out, budget // d_in))
    return k_in, k_out


@dataclass(frozen=True)
class FactorProjection:
    """A seeded k x d projection of one gradient factor (identity when k == d)."""

    dim: int
    k: int
    seed: int
    kind: ProjectionKind

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.dim:
            raise ValueError(f"projection size {self.k} must lie in [1, {self.dim}]")
        if self.kind not in ("gaussian", "rademacher", "identity"):
            raise ValueError(f"unknown projection kind {self.kind!r}")

    @property
    def is_identity(self) -> bool:
        """Whether this factor is kept exact."""
        return self.k == self.dim

    def matrix(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """Build the k x d matrix: N(0, 1/k) entries, or +-1/sqrt(k) for Rademacher."""
        if self.is_identity:
            return torch.eye(self.dim, dtype=dtype, device=device)
        gen = torch.Generator().manual_seed(self.seed)
        if self.kind == "rademacher":
            signs = torch.randint(0, 2, (self.k, self.dim), generator=gen, dtype=torch.int8)
            mat = (signs.to(torch.float64) * 2 - 1) / math.sqrt(self.k)
        else:
            mat = torch.randn(self.k, self.dim, generator=gen, dtype=torch.float64) / math.sqrt(self.k)
        return mat.to(dtype=dtype, device=device)

    def to_dict(self) -> dict:
        """JSON-serialisable description for the manifest."""
        return asdict(self)


def layer_projections(
    name: str, d_in: int, d_out: int, budget: int | None, seed: int, kind: ProjectionKind
) -> tuple[FactorProjection, FactorProjection]:
    """Projections (input side, output side) for one layer, each with its own seed."""
    k_in, k_out = split_budget(d_in, d_out, budget)
    make = lambda dim, k, side: FactorProjection(  # noqa: E731
        dim, k, derive_seed(seed, name, side), "identity" if k == dim else kind
    )
    return make(d_in, k_in, "in"), make(d_out, k_out, "out")
