"""Which propagators the recursion keeps: the blocks of its coordinates, sized by a memory budget.

Dropping the curvature between layers (one K per layer, the paper's choice) loses most of the
fidelity on nonlinear nets: on MNIST with AdamW, unprojected, Spearman 0.64 against 0.99 with one
K over all layers (docs/results.md). One global K costs (sum of dims)^2 values, so it is kept
whenever it fits the memory budget. Beyond it the plan is *hierarchical*: one K per layer for
each layer's full space, plus one global K over a coarse space (each layer's rows sketched to
``q`` coordinates by a seeded Gaussian S_l), from which the same coarse space's per-layer K is
subtracted, so the global K contributes only the cross-layer curvature::

    e_l = e_l[fine, per layer] + S_l^T (e_l[coarse, global] - e_l[coarse, per layer])

(On MNIST with AdamW, 2 x 1024 values: 0.94 / 0.92 Spearman with q = 256 against 0.96 / 0.92 for
one global K and 0.63 / 0.70 for one per layer; sketching to each layer's leading fitted
coordinates instead: 0.70 / 0.72.) A plan is a list of *parts* (a layer's rows, whole or
sketched, with a sign) and blocks of parts; the recursion runs one K per block, and a layer's
embedding is the signed sum of its parts'.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..projection import derive_seed
from ..store import Store

Blocking = Literal["auto", "layer", "global", "hierarchical"]
BLOCKINGS = ("auto", "layer", "global", "hierarchical")
SecondMoment = Literal["followed", "frozen"]
SECOND_MOMENTS = ("followed", "frozen")
"""Adam's second moment in the recursion: its first-order path followed where the store allows (exactly in exact
layers, through factored operators in projected layers whose store has second factors), or held fixed."""
DEFAULT_MEMORY = 768 << 20
"""Default budget (bytes) for the propagators beyond one per layer."""
TIME_BUDGET = 3.0
"""``"auto"`` keeps the recursion within this multiple of the per-layer plan's arithmetic: a global plan's
propagator, or a hierarchical plan's with the paper's per-layer plan (gradient rows only) as the unit."""
UNCOUNTED = 1.0
"""Share of TIME_BUDGET a hierarchical plan leaves to what its arithmetic count omits (reading the curvature
rows, sketching them, each step's eigendecompositions). Measured on a 3-pass GGN store of 49 layers x 1024
(benchmarks/embedding_scale.py, 1 thread, 2026-12-06): the per-layer plan takes 1.6-1.8x the paper's time
against a count of 1.5x, and the coarse global propagator about 1.5x its count."""
MIN_COARSE = 16
"""Fewest coarse coordinates per layer worth a hierarchical plan."""
STEP_RANK = 1.0
"""Each step's curvature is cut to its top eigenvectors, as many as this share of the step's records, so
that folding it costs what the paper's B gradient rows cost. Measured on MNIST (``dvemb evaluate
fidelity``, 3 seeds x 100, 2026-12-06), single-epoch Spearman with B / B/2 / all 3B rows of the leading
rank-3 GGN factors: ReLU SGD 0.835 / 0.781 / 0.837, GELU SGD 0.925 / 0.893 / 0.922, GELU AdamW 0.903 / 0.901 / 0.903."""


@dataclass(frozen=True)
class Part:
    """A layer's rows, whole or sketched to ``sketch`` coordinates (seeded Gaussian), with a sign."""

    layer: int
    sketch: int | None  # None: every coordinate of the layer
    seed: int
    sign: float
    name: str  # file stem of the part's embeddings

    def width(self, store: Store) -> int:
        """Coordinates in the part."""
        return store.layers[self.layer].dim if self.sketch is None else self.sketch

    def matrix(self, dim: int, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
        """The sketch S [sketch, dim] with N(0, 1/sketch) entries (E[S^T S] = I), on ``device`` (None: the CPU)."""
        return _sketch_on(self.sketch, dim, self.seed, dtype, torch.device("cpu") if device is None else device)

    def coordinates(self, rows: torch.Tensor) -> torch.Tensor:
        """The part's coordinates of a layer's rows (last dimension): the rows, or rows S^T."""
        return rows if self.sketch is None else rows @ self.matrix(rows.shape[-1], rows.dtype, rows.device).T

    def to_dict(self) -> dict:
        """JSON form for the embeddings manifest."""
        return {"layer": self.layer, "sketch": self.sketch, "seed": self.seed, "sign": self.sign, "name": self.name}

    @classmethod
    def from_dict(cls, d: dict) -> "Part":
        """Inverse of :meth:`to_dict`."""
        return cls(int(d["layer"]), d["sketch"], int(d["seed"]), float(d["sign"]), str(d["name"]))


@functools.lru_cache(maxsize=256)
def _sketch(rows: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=generator, dtype=torch.float64) / math.sqrt(rows)


@functools.lru_cache(maxsize=256)
def _sketch_on(rows: int, dim: int, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The sketch in ``dtype`` on ``device``, drawn on the CPU (the same S on every device), kept per device."""
    return _sketch(rows, dim, seed).to(dtype=dtype, device=device)


@dataclass(frozen=True)
class Plan:
    """Parts, the blocks (tuples of part indices) that share one propagator, the share of each step's
    records to which its curvature rows are cut (None: kept whole), and how Adam's second moment is read
    (:data:`SECOND_MOMENTS`)."""

    kind: str
    parts: tuple[Part, ...]
    blocks: tuple[tuple[int, ...], ...]
    step_rank: float | None = STEP_RANK
    second_moment: SecondMoment = "followed"

    @property
    def trivial(self) -> bool:
        """Each part is a whole layer, once, with sign +1: parts are the layers themselves."""
        return all(p.sketch is None and p.sign == 1.0 for p in self.parts) and \
            sorted(p.layer for p in self.parts) == list(range(len(self.parts)))

    def to_dict(self) -> dict:
        """JSON form for the embeddings manifest."""
        return {"kind": self.kind, "parts": [p.to_dict() for p in self.parts], "blocks": [list(b) for b in self.blocks],
                "step_rank": self.step_rank, "second_moment": self.second_moment}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """Inverse of :meth:`to_dict`."""
        return cls(d["kind"], tuple(Part.from_dict(p) for p in d["parts"]), tuple(tuple(b) for b in d["blocks"]),
                   d.get("step_rank"), d.get("second_moment", "followed"))


def make_plan(store: Store, blocking: Blocking = "auto", memory: int = DEFAULT_MEMORY, matrices: int = 1,
              itemsize: int = 4, step_rank: float | None = STEP_RANK) -> Plan:
    """The plan for ``blocking``. ``"auto"`` is global when its propagators fit ``memory`` bytes beyond one per
    layer (``matrices`` per block: the update rule's parts; ``itemsize``: the recursion's float size) and its
    arithmetic TIME_BUDGET times the per-layer plan's; else hierarchical with the largest coarse space that
    fits both, or per layer when that space would be tiny. Layers that follow Adam elementwise join a
    hierarchical plan's global propagator whole; where they leave it too little coarse space, ``"auto"`` keeps
    one global propagator if it fits ``memory``, and else joins only the smallest of them (:func:`joinable`),
    leaving the others a propagator of their own."""
    if blocking not in BLOCKINGS:
        raise ValueError(f"blocking must be one of {BLOCKINGS}, got {blocking!r}")
    if step_rank is not None and not 0 < step_rank <= 1:
        raise ValueError(f"step_rank must lie in (0, 1] or be None, got {step_rank}")
    dims = [s.dim for s in store.layers]
    whole = tuple(Part(i, None, 0, 1.0, s.name) for i, s in enumerate(store.layers))
    per_layer = Plan("layer", whole, tuple((i,) for i in range(len(dims))), step_rank)
    if blocking == "layer" or len(dims) == 1:
        return per_layer
    squares = sum(d * d for d in dims)
    in_memory = matrices * itemsize * (sum(dims) ** 2 - squares) <= memory
    global_plan = Plan("global", whole, (tuple(range(len(dims))),), step_rank)
    if blocking == "global" or (blocking == "auto" and in_memory and sum(dims) ** 2 <= TIME_BUDGET * squares):
        return global_plan
    elementwise = [i for i in range(len(dims)) if store.config.elementwise(i)]
    if len(elementwise) == len(dims):
        if blocking == "auto":
            return per_layer
        raise ValueError("Adam with exact gradients follows per-parameter preconditioners, which a hierarchical "
                         "plan's sketches cannot carry: use blocking='global' or 'layer', or projected gradients")
    factor = _rows_factor(store, step_rank)
    values = min(memory // (matrices * itemsize), int(max(0.0, (TIME_BUDGET - UNCOUNTED) / factor - 1) * squares))
    sketched = [d for i, d in enumerate(dims) if i not in elementwise]
    q = coarse_size(sketched, values, sum(dims[i] for i in elementwise))
    if blocking != "auto" or q >= MIN_COARSE:
        return hierarchical(store, max(1, q), step_rank)
    if elementwise and in_memory:
        # exact Adam layers, kept whole, crowd the coarse space out: one global propagator past the time budget
        # keeps the coupling between layers, whose loss costs the most (see the module's docstring)
        return global_plan
    order = sorted(elementwise, key=lambda i: (dims[i], i))
    joined = order[:joinable([dims[i] for i in order], values)]
    q = coarse_size(sketched, values, sum(dims[i] for i in joined))
    return hierarchical(store, q, step_rank, frozenset(joined)) if q >= MIN_COARSE else per_layer


def _rows_factor(store: Store, step_rank: float | None) -> float:
    """Arithmetic per propagator coordinate of a step, relative to the paper's (B gradient rows: a product of B
    rows and a rank-B update, 4 B): with r curvature rows, one product of B + r rows and a rank-r update."""
    if not store.curvature_passes:
        return 1.0
    rows = store.curvature_passes if step_rank is None else min(step_rank, store.curvature_passes)
    return (2 + 4 * rows) / 4  # per record: (2 (1 + rows) + 2 rows) / 4


def coarse_size(dims: list[int], values: int, whole: int = 0) -> int:
    """The coarse coordinates per layer of ``dims`` whose global propagator (plus its per-layer twins) fits
    ``values``, beside ``whole`` coordinates that join the global propagator unsketched: the largest q with
    (whole + n q)^2 + n q^2 <= values (0 when nothing fits)."""
    n = len(dims)
    low, high = 0, math.isqrt(max(0, values) // (n * n + n))  # (n^2 + n) q^2 <= values bounds q
    while low < high:
        q = (low + high + 1) // 2
        if (whole + n * q) ** 2 + n * q * q <= values:
            low = q
        else:
            high = q - 1
    return min(low, max(dims))


def joinable(whole: list[int], values: int) -> int:
    """How many of the layers of ``whole`` coordinates (ascending), smallest first, join a global propagator of
    ``values`` whole: as many as fill at most half of its side, so that the sketched layers keep the other half."""
    side, total, count = math.isqrt(max(0, values)) // 2, 0, 0
    for d in whole:
        if total + d > side:
            break
        total, count = total + d, count + 1
    return count


def hierarchical(store: Store, q: int, step_rank: float | None = STEP_RANK, joined: frozenset[int] | None = None
                 ) -> Plan:
    """Fine parts (whole layers, one K each), coarse parts (each layer sketched to q coordinates) in one global
    K, and the same coarse parts again, one K each, subtracted. A layer that follows Adam elementwise (its
    per-parameter scalings cannot pass a sketch) joins the global K whole instead, with no part of its own,
    if it is in ``joined`` (None: all of them); else it keeps a K of its own and no coupling."""
    fine, coarse_global, coarse_layer = [], [], []
    for i, spec in enumerate(store.layers):
        elementwise = store.config.elementwise(i)
        if elementwise and (joined is None or i in joined):
            coarse_global.append(Part(i, None, 0, 1.0, f"{spec.name}.global"))
            continue
        fine.append(Part(i, None, 0, 1.0, f"{spec.name}.fine"))
        if elementwise:
            continue
        size, seed = min(q, spec.dim), derive_seed(store.config.seed, spec.name, "coarse")
        coarse_global.append(Part(i, size, seed, 1.0, f"{spec.name}.coarse-global"))
        coarse_layer.append(Part(i, size, seed, -1.0, f"{spec.name}.coarse-layer"))
    n, m = len(fine), len(coarse_global)
    blocks = [(i,) for i in range(n)] + [tuple(range(n, n + m))] + [(n + m + i,) for i in range(len(coarse_layer))]
    return Plan("hierarchical", tuple(fine + coarse_global + coarse_layer), tuple(blocks), step_rank)
