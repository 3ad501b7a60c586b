"""Adam's second-moment path on projected coordinates: per step, Kronecker operators from factored rows.

A store with ``second_factors`` holds, per projected layer and step, a rank-1 fit x y^T of
sqrt(|r_t d_t|) and a sign (capture/whitening.py), next to the whitening factors R_t = exp(r) exp(c)^T.
:class:`~dvemb.update.adam.WhitenedAdam` (``factored``) reads them through two operators on
the layer's projected coordinates (rows P_out G P_in^T, k_out-major)::

    "second"   = s_t sign_t (P_out diag(e^r x) P_out^+) (x) (P_in diag(e^c y) P_in^+)
    "gradient" =            (P_out diag(x / e^r) P_out^+) (x) (P_in diag(y / e^c) P_in^+)

P^+ = P^T (P P^T)^-1 maps projected coordinates back (P^T for fitted bases, whose rows are
orthonormal; seeded projections have P P^T ~ (d / k) I, which P^T alone would count in). A row u,
as a k_out x k_in matrix U, becomes u (A (x) B) = A^T U B.

Parts that sketch a layer (a hierarchical plan's coarse parts, plan.py) get no operators: their
coordinates hold v fixed. Conjugated by the sketch (S M S^T) the operators followed the wrong
structure: on the GPT-2 study (``dvemb evaluate lm-fidelity --data plays.tar.gz``, 2026-12-07) the
defaults scored -0.138 all-epoch Spearman (Pearson -0.474) with them, 0.102 (Pearson 0.162) without,
and 0.101 with v frozen on every projected coordinate (docs/results.md, "Language model").
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..store import Store, second_moment_factors, whitening_factors
from .plan import Part


class KroneckerBlock:
    """One layer's place among a block's coordinates, and its projections P_out [k_out, d_out] and
    P_in [k_in, d_in (+1)] with their pseudo-inverses."""

    def __init__(self, columns: slice, p_out: torch.Tensor, p_in: torch.Tensor) -> None:
        self.columns, self.p_out, self.p_in = columns, p_out, p_in
        self._back_out, self._back_in = _back(p_out), _back(p_in)

    def sides(self, row: torch.Tensor, column: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_out diag(row) P_out^+, P_in diag(column) P_in^+): A (x) B is P diag(row column^T) P^+."""
        return _side(self.p_out, row, self._back_out), _side(self.p_in, column, self._back_in)


def _side(p: torch.Tensor, scale: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
    return (p * scale.to(device=p.device, dtype=p.dtype)) @ back


def second_moment_operators(blocks: Sequence[tuple[KroneckerBlock, Sequence[torch.Tensor], float]], s: float
                            ) -> dict[str, "KroneckerBlocks"]:
    """A step's ``"second"`` and ``"gradient"`` operators from each block's (r, c, x, y) (log whitening factors,
    second-moment factors) and sign, with s_t = lr / (1 - beta1^(t+1))."""
    second, gradient = [], []
    for block, (r, c, x, y), sign in blocks:
        second.append((block, s * sign, *block.sides(x * r.exp(), y * c.exp())))
        gradient.append((block, 1.0, *block.sides(x / r.exp(), y / c.exp())))
    return {"second": KroneckerBlocks(second), "gradient": KroneckerBlocks(gradient)}


def has_operators(store: Store, part: Part) -> bool:
    """Whether a part's coordinates get v's operators: a whole layer that Adam does not follow elementwise."""
    return part.sketch is None and not store.config.elementwise(part.layer)


class FactoredSecondMoment:
    """The operators of each step for one block of parts (parts of layers that follow Adam elementwise, sketched
    parts, and parts of stores without second factors get none: zero there)."""

    def __init__(self, store: Store, parts: Sequence[Part], dtype: torch.dtype, device: torch.device | None) -> None:
        self._dtype = dtype
        self._specs, self._rows, self._blocks = [], [], []
        offset = 0
        for part in parts:
            spec = store.layers[part.layer]
            width = part.width(store)
            if has_operators(store, part):
                self._blocks.append(KroneckerBlock(slice(offset, offset + width), spec.proj_out.matrix(dtype, device),
                                                   spec.proj_in.matrix(dtype, device)))
                self._specs.append(spec)
                self._rows.append(store.second_factors(part.layer))
            offset += width

    def at(self, t: int, s: float) -> dict[str, "KroneckerBlocks"]:
        """Step t's ``"second"`` and ``"gradient"`` operators."""
        factors = []
        for block, spec, rows in zip(self._blocks, self._specs, self._rows):
            x, y, sign = second_moment_factors(rows[t], spec)
            vectors = [*whitening_factors(rows[t], spec), x, y]
            factors.append((block, [v.to(self._dtype) for v in vectors], sign))
        return second_moment_operators(factors, s)

    def __bool__(self) -> bool:
        return bool(self._blocks)


def _back(p: torch.Tensor) -> torch.Tensor:
    """P^+ of a projection [k, d] with full row rank: P^T (P P^T)^-1 (P^T for orthonormal rows, up to round-off)."""
    return torch.linalg.solve(p @ p.T, p).T


class KroneckerBlocks:
    """The operator M that is coefficient * A (x) B on each part's columns, zero elsewhere (:class:`Operator`)."""

    def __init__(self, terms: list[tuple[KroneckerBlock, float, torch.Tensor, torch.Tensor]]) -> None:
        self._terms = terms

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x M: A^T X B per part."""
        return self._apply(x, transposed=False)

    def transposed(self, x: torch.Tensor) -> torch.Tensor:
        """x M^T: A X B^T per part."""
        return self._apply(x, transposed=True)

    def _apply(self, x: torch.Tensor, transposed: bool) -> torch.Tensor:
        out = torch.zeros_like(x)
        for block, coefficient, a, b in self._terms:
            left, right = (a, b.T) if transposed else (a.T, b)
            z = x[:, block.columns]
            y = torch.matmul(torch.matmul(left, z.reshape(-1, a.shape[0], b.shape[0])), right).reshape(z.shape)
            out[:, block.columns] = y.mul_(coefficient)
        return out

