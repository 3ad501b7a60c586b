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
from dataclasses import dataclass, field
from typing import Literal

import torch

DEFAULT_PROJECTION_DIM = 1024
"""Projected size per layer: the Recorder's default (``projection_dim=None`` keeps gradients exact)."""

ProjectionKind = Literal["fitted", "gaussian", "rademacher", "orthogonal", "identity"]
PROJECTIONS = ("fitted", "gaussian", "rademacher", "orthogonal")
"""Projections a Recorder can use: data-fitted bases (see fitting.py) or seeded random matrices."""


def derive_seed(seed: int, *parts: str) -> int:
    """Return a stable 63-bit seed for (seed, parts), independent of Python's hash salt."""
    digest = hashlib.sha256("/".join((str(seed), *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


EXACT_WITHIN = 2
"""A layer of at most EXACT_WITHIN x budget values is kept exact: projecting it would save at most half of
its storage, at the largest cost in fidelity per value saved. Measured (`dvemb evaluate fidelity`, 3 seeds x
100, 2026-12-07, docs/results.md): MNIST 784-128-10 with its 1,290-value output layer exact instead of
projected to 1,024, single / all-epoch Spearman: GELU AdamW 0.932 / 0.805 -> 0.950 / 0.866, ReLU AdamW
0.902 / 0.631 -> 0.899 / 0.667, plain SGD within 0.004, for 13% more stored values."""


def split_budget(d_in: int, d_out: int, budget: int | None) -> tuple[int, int]:
    """Split a per-layer budget into (k_in, k_out) with k_in * k_out <= budget, k_in <= d_in, k_out <= d_out,
    or keep the layer exact when it holds at most EXACT_WITHIN x budget values.

    Projecting a d-dim factor to k dims adds relative variance ~ 1/k - 1/d to inner
    products, so the Kronecker pair's error ~ (1/k_in - 1/d_in) + (1/k_out - 1/d_out) is
    smallest for a balanced split k_in = k_out = sqrt(budget). A side smaller than that
    is kept exact and the rest of the budget goes to the other side. ``None``: no projection.
    """
    if budget is None or d_in * d_out <= EXACT_WITHIN * budget:
        return d_in, d_out
    if budget < 1:
        raise ValueError(f"projection_dim must be >= 1, got {budget}")
    side = math.isqrt(budget)
    if d_out <= side:
        return min(d_in, budget // d_out), d_out
    if d_in <= side:
        return d_in, min(d_out, budget // d_in)
    return side, side


@dataclass(frozen=True)
class FactorProjection:
    """A k x d projection of one gradient factor: seeded random, fitted to data, or the identity (k == d).

    A fitted basis's rows (``values``, orthonormal) are stored beside the manifest; the spec compares
    and hashes by their ``fingerprint``. Before its fit a fitted side has no values (``unfitted``).
    """

    dim: int
    k: int
    seed: int
    kind: ProjectionKind
    fingerprint: str = ""
    values: torch.Tensor | None = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.dim:
            raise ValueError(f"projection size {self.k} must lie in [1, {self.dim}]")
        if self.kind not in ("fitted", "gaussian", "rademacher", "orthogonal", "identity"):
            raise ValueError(f"unknown projection kind {self.kind!r}")
        if self.values is not None and tuple(self.values.shape) != (self.k, self.dim):
            raise ValueError(f"fitted projection of shape {tuple(self.values.shape)}, expected {(self.k, self.dim)}")

    @property
    def is_identity(self) -> bool:
        """Whether this factor is kept exact."""
        return self.k == self.dim

    @property
    def unfitted(self) -> bool:
        """A fitted side whose basis is not known yet."""
        return self.kind == "fitted" and self.values is None

    def matrix(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """Build the k x d matrix: N(0, 1/k) entries, +-1/sqrt(k) for Rademacher, or orthogonal rows.

        Orthogonal rows have norm sqrt(d/k), so that E[P^T P] = I as for the others.
        """
        if self.is_identity:
            return torch.eye(self.dim, dtype=dtype, device=device)
        if self.kind == "fitted":
            if self.values is None:
                raise RuntimeError("the fitted projection is used before its basis was fitted")
            return self.values.to(dtype=dtype, device=device)
        gen = torch.Generator().manual_seed(self.seed)
        if self.kind == "rademacher":
            signs = torch.randint(0, 2, (self.k, self.dim), generator=gen, dtype=torch.int8)
            mat = (signs.to(torch.float64) * 2 - 1) / math.sqrt(self.k)
        elif self.kind == "orthogonal":
            q, _ = torch.linalg.qr(torch.randn(self.dim, self.k, generator=gen, dtype=torch.float64))
            mat = q.t() * math.sqrt(self.dim / self.k)
        else:
            mat = torch.randn(self.k, self.dim, generator=gen, dtype=torch.float64) / math.sqrt(self.k)
        return mat.to(dtype=dtype, device=device)

    def to_dict(self) -> dict:
        """JSON-serialisable description for the manifest (a fitted basis's values are stored apart)."""
        out = {"dim": self.dim, "k": self.k, "seed": self.seed, "kind": self.kind}
        return {**out, "fingerprint": self.fingerprint} if self.kind == "fitted" else out


def fingerprint(values: torch.Tensor) -> str:
    """A fitted basis's identity: SHA-256 of its float64 values."""
    return hashlib.sha256(values.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()).hexdigest()


def fitted_projection(side: FactorProjection, moment: torch.Tensor) -> FactorProjection:
    """``side`` with its basis: the top-k eigenvectors of the symmetric ``moment`` [dim, dim], as rows, leading first.

    Each eigenvector's sign is fixed (largest entry positive), so equal moments give equal bases.
    """
    values, vectors = torch.linalg.eigh(moment.to(torch.float64))
    top = vectors[:, values.argsort(descending=True)[: side.k]].T
    signs = torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))
    top = (top * torch.where(signs == 0, 1.0, signs)).contiguous()
    return FactorProjection(side.dim, side.k, side.seed, "fitted", fingerprint(top), top)


def layer_projections(
    name: str, d_in: int, d_out: int, budget: int | None, seed: int, kind: ProjectionKind
) -> tuple[FactorProjection, FactorProjection]:
    """Projections (input side, output side) for one layer, each with its own seed."""
    k_in, k_out = split_budget(d_in, d_out, budget)
    make = lambda dim, k, side: FactorProjection(  # noqa: E731
        dim, k, derive_seed(seed, name, side), "identity" if k == dim else kind
    )
    return make(d_in, k_in, "in"), make(d_out, k_out, "out")


def from_dict(data: dict, values: torch.Tensor | None = None) -> FactorProjection:
    """A side from the manifest, with a fitted basis's stored ``values`` (checked against its fingerprint)."""
    side = FactorProjection(data["dim"], data["k"], data["seed"], data["kind"], data.get("fingerprint", ""))
    if side.kind != "fitted" or not side.fingerprint:  # not fitted yet: a store without steps
        return side
    if values is None or fingerprint(values) != side.fingerprint:
        raise ValueError("the fitted projection's stored values are missing or do not match their fingerprint")
    return FactorProjection(side.dim, side.k, side.seed, "fitted", side.fingerprint, values)
