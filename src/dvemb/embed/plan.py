"""Which propagators the recursion keeps: the blocks of its coordinates, sized by a memory budget.

Dropping the curvature between layers (one K per layer, the paper's choice) loses most of the
fidelity on nonlinear nets: on MNIST with AdamW, unprojected, Spearman 0.64 against 0.99 with one
K over all layers (docs/results.md). One global K costs (sum of dims)^2 values, so it is kept
whenever it fits the memory budget. Beyond it the plan is *hierarchical*: one K per layer for
each layer's full space, plus one global K over a coarse space (each layer's leading ``q``
coordinates: on fitted bases, its highest-energy directions), from which the same coarse space's
per-layer K is subtracted, so the global K contributes only the cross-layer curvature::

    e_l = e_l[fine, per layer] + S_l^T (e_l[coarse, global] - e_l[coarse, per layer])

A plan is a list of *parts* (columns of a layer's rows, with a sign) and blocks of parts; the
recursion runs one K per block, and a layer's embedding is the signed sum of its parts'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..store import Store

Blocking = Literal["auto", "layer", "global", "hierarchical"]
BLOCKINGS = ("auto", "layer", "global", "hierarchical")
DEFAULT_MEMORY = 768 << 20
"""Default budget (bytes) for the propagators beyond one per layer."""
MIN_COARSE = 16
"""Fewest coarse coordinates per layer worth a hierarchical plan."""


@dataclass(frozen=True)
class Part:
    """Some coordinates (``columns`` of the flat k_out x k_in rows, or all) of one layer, with a sign."""

    layer: int
    columns: tuple[int, ...] | None  # None: every coordinate of the layer
    sign: float
    name: str  # file stem of the part's embeddings

    def width(self, store: Store) -> int:
        """Coordinates in the part."""
        return store.layers[self.layer].dim if self.columns is None else len(self.columns)

    def to_dict(self) -> dict:
        """JSON form for the embeddings manifest."""
        return {"layer": self.layer, "columns": None if self.columns is None else list(self.columns),
                "sign": self.sign, "name": self.name}

    @classmethod
    def from_dict(cls, d: dict) -> "Part":
        """Inverse of :meth:`to_dict`."""
        return cls(int(d["layer"]), None if d["columns"] is None else tuple(d["columns"]), float(d["sign"]),
                   str(d["name"]))


@dataclass(frozen=True)
class Plan:
    """Parts and the blocks (tuples of part indices) that share one propagator."""

    kind: str
    parts: tuple[Part, ...]
    blocks: tuple[tuple[int, ...], ...]

    @property
    def trivial(self) -> bool:
        """Each part is a whole layer, once, with sign +1: parts are the layers themselves."""
        return all(p.columns is None and p.sign == 1.0 for p in self.parts) and \
            sorted(p.layer for p in self.parts) == list(range(len(self.parts)))

    def to_dict(self) -> dict:
        """JSON form for the embeddings manifest."""
        return {"kind": self.kind, "parts": [p.to_dict() for p in self.parts], "blocks": [list(b) for b in self.blocks]}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """Inverse of :meth:`to_dict`."""
        return cls(d["kind"], tuple(Part.from_dict(p) for p in d["parts"]), tuple(tuple(b) for b in d["blocks"]))


def make_plan(store: Store, blocking: Blocking = "auto", memory: int = DEFAULT_MEMORY, matrices: int = 1,
              itemsize: int = 4) -> Plan:
    """The plan for ``blocking``: ``"auto"`` is global when its propagators fit ``memory`` bytes beyond one per
    layer (``matrices`` per block: the update rule's parts; ``itemsize``: the recursion's float size), else
    hierarchical with the largest coarse space that fits."""
    if blocking not in BLOCKINGS:
        raise ValueError(f"blocking must be one of {BLOCKINGS}, got {blocking!r}")
    dims = [s.dim for s in store.layers]
    whole = [Part(i, None, 1.0, s.name) for i, s in enumerate(store.layers)]
    if blocking == "layer" or len(dims) == 1:
        return Plan("layer", tuple(whole), tuple((i,) for i in range(len(dims))))
    extra = matrices * itemsize * (sum(dims) ** 2 - sum(d * d for d in dims))
    if blocking == "global" or (blocking == "auto" and extra <= memory):
        return Plan("global", tuple(whole), (tuple(range(len(dims))),))
    q = coarse_size(dims, memory // (matrices * itemsize))
    if blocking == "auto" and q < MIN_COARSE:
        return Plan("layer", tuple(whole), tuple((i,) for i in range(len(dims))))
    return hierarchical(store, max(1, q))


def coarse_size(dims: list[int], values: int) -> int:
    """The coarse coordinates per layer whose global propagator (plus its per-layer twins) fits ``values``."""
    n = len(dims)
    q = int(math.isqrt(max(0, values) // (n * n + n)))
    return min(q, max(dims))


def hierarchical(store: Store, q: int) -> Plan:
    """Fine parts (whole layers, one K each), coarse parts (each layer's leading q coordinates) in one global K,
    and the same coarse parts again, one K each, subtracted."""
    fine, coarse_global, coarse_layer = [], [], []
    for i, spec in enumerate(store.layers):
        fine.append(Part(i, None, 1.0, f"{spec.name}.fine"))
        columns = leading_columns(spec.proj_out.k, spec.proj_in.k, min(q, spec.dim))
        coarse_global.append(Part(i, columns, 1.0, f"{spec.name}.coarse-global"))
        coarse_layer.append(Part(i, columns, -1.0, f"{spec.name}.coarse-layer"))
    n = len(fine)
    blocks = [(i,) for i in range(n)] + [tuple(range(n, 2 * n))] + [(2 * n + i,) for i in range(n)]
    return Plan("hierarchical", tuple(fine + coarse_global + coarse_layer), tuple(blocks))


def leading_columns(k_out: int, k_in: int, q: int) -> tuple[int, ...]:
    """The q flat coordinates (o * k_in + i) with the smallest (o, i): the leading directions of fitted bases,
    a (q_out x q_in) corner in the layer's proportions."""
    q_out = max(1, min(k_out, round(math.sqrt(q * k_out / k_in))))
    q_in = max(1, min(k_in, q // q_out))
    return tuple(o * k_in + i for o in range(q_out) for i in range(q_in))
