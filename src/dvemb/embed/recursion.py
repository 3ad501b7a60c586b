"""Algorithm 1: data value embeddings by a backward recursion over the recorded steps.

With H_k ~ sum_i w_ki g_ki g_ki^T (or separately captured curvature rows, see
capture/curvature.py), the propagator K = prod_{k>t} (I - eta_k H_k) is
kept per block of layers and updated from the last step backwards (plain SGD)::

    K = I
    for t = T-1 .. 0:
        e_ti = eta_t w_ti K g_ti                 (row form: E = eta w G K^T)
        K   -= sum_i e_ti g_ti^T                  (K -= E^T G)

so DVEmb(t, i) = e_ti = eta_t w_ti K g_ti. Optimizers with buffers (momentum, Adam) carry one
matrix per buffer too, stepped by their update rule (``dvemb.update``). Memory is
O(sum_l dim_l^2) per matrix plus two chunks of records (CHUNK_BYTES each by default), read from
the store backwards in time.
``blocking="global"`` keeps one M over all layers instead (O((sum_l dim_l)^2)), which keeps
the cross-layer curvature.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import torch

from .. import gemm
from ..devices import HostCopies, to_device
from ..store import RowFile, Store, to_torch
from ..update import StepCoefficients, UpdateRule
from .coefficients import block_rule, step_coefficients
from .plan import Part, Plan

Precision = Literal["float32", "float64"]
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
CPU = torch.device("cpu")
CHUNK_BYTES = 96 << 20  # records read per chunk (two are alive while the next is read); 8,200 rows of 3 x 1024 fp32


def rows_per_chunk(row_bytes: int, chunk_rows: int | None) -> int:
    """``chunk_rows`` if given, else as many rows as fit in CHUNK_BYTES (at least one)."""
    return chunk_rows if chunk_rows is not None else max(1, CHUNK_BYTES // max(1, row_bytes))


def default_precision(store: Store) -> Precision:
    """float64 for float64 stores, else float32 (shown accurate to ~1e-5 by the tests)."""
    return "float64" if store.dtype == "float64" else "float32"


class _State:
    """The adjoints of one block: per output, [U, V_1, ...] mapping a change of (theta_t, buffers_{t-1}) to it.

    The outputs are theta at the end of the segment, and with ``buffers`` also the optimizer's
    buffers there (Algorithm 2 composes segments through all of them). Going back one step
    (``dvemb.update``): gamma = rule.mix(...), a record's embedding is -w gamma g (its output's
    change when its gradient is dropped), then U = (the rule's) U + gamma H with
    H = sum_i w_i h_i h_i^T over the curvature rows h (the gradients themselves by default).
    Plain SGD starts at U = I and gives U = K = prod (I - eta H): the paper's recursion.
    """

    def __init__(self, dim: int, dtype: torch.dtype, rule: UpdateRule, buffers: bool, device: torch.device) -> None:
        parts = rule.parts
        outputs = parts if buffers else 1
        kw = {"dtype": dtype, "device": device}
        self.maps = [[torch.eye(dim, **kw) if part == out else torch.zeros(dim, dim, **kw)
                      for part in range(parts)] for out in range(outputs)]
        self.rule = rule

    def step(self, g: torch.Tensor, w: torch.Tensor, c: torch.Tensor | None, c_w: torch.Tensor | None,
             coefficients: StepCoefficients) -> list[torch.Tensor]:
        """Embeddings [B, dim] of step t's records (rows g, weights w) for each output, then go back one step."""
        out = []
        for adjoints in self.maps:
            gamma = self.rule.mix(adjoints, coefficients)
            if c is None:
                e = gamma.rows(g, gemm.rows_product).mul_(-w)  # -w gamma g, rows
                h, h_e = g, e
            else:  # one product for the gradients and the curvature rows
                both = gamma.rows(torch.cat([g, c]), gemm.rows_product)
                e, h, h_e = both[:g.shape[0]].mul_(-w), c, both[g.shape[0]:].mul_(-c_w)
            self.rule.settle(adjoints, gamma, coefficients)
            gemm.add_outer(adjoints[0], h_e.neg(), h)  # U += sum_i w_i (gamma h_i) h_i^T
            self.rule.finish(adjoints, coefficients)
            out.append(e)
        return out

    def propagator(self) -> torch.Tensor:
        """The map of a change of theta (and of the buffers) at the segment's start to the outputs."""
        if len(self.maps) == 1:
            return self.maps[0][0]
        return torch.cat([torch.cat(adjoints, 1) for adjoints in self.maps], 0)


def leading_rows(c: torch.Tensor, c_w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows z [rank, dim] (weights 1) with z^T z the top-``rank`` part of sum_i c_w_i c_i c_i^T (the step's curvature)."""
    if c.shape[0] <= rank:
        return c, c_w
    m = c * c_w.sqrt()
    _, vectors = torch.linalg.eigh(m @ m.T)  # ascending; m^T m's leading eigenvectors are m^T v / |m^T v|
    return vectors[:, -rank:].T @ m, torch.ones(rank, 1, dtype=c.dtype, device=c.device)


def run_recursion(
    store: Store,
    plan: Plan,
    blocks: Sequence[int],
    sinks: Mapping[int, RowFile],
    start: int,
    stop: int,
    precision: Precision,
    chunk_rows: int | None,
    on_step: Callable[[], None] = lambda: None,
    buffer: bool = False,
    device: torch.device = CPU,
) -> list[torch.Tensor]:
    """Run the recursion over steps [start, stop) from K = I for the given blocks of the plan.

    Each block (parts of one or more layers) has one K over its parts' concatenated coordinates:
    one layer per block is the layer-wise approximation, all layers in one block a global K (see
    plan.py). Writes each record's embedding relative to step ``stop`` into ``sinks`` (row writers
    by part index, rows indexed like the store) and returns the segment's propagators, one per
    block. Records are read in chunks of ``chunk_rows`` rows, by default as many as fit in
    CHUNK_BYTES. A store whose update rule keeps buffers (momentum, Adam's moments) keeps one
    matrix per buffer too; with ``buffer`` (Algorithm 2) also the records' effects on the buffers
    at ``stop``, written to ``sinks[part + k * number of parts]`` for buffer k, and the
    propagators map (theta, buffers) to (theta, buffers). The propagators stay on ``device``, where the
    records are copied to (see ``dvemb.devices``); the embeddings come back to the host.
    """
    dtype = TORCH_DTYPES[precision]
    w_all = np.ascontiguousarray(store.records["weight"], dtype=np.float64)
    parts = [[plan.parts[i] for i in plan.blocks[b]] for b in blocks]
    layers = sorted({p.layer for block in parts for p in block})
    passes = store.curvature_passes
    arrays = [store.grads(i) for i in layers] + ([store.curvature(i) for i in layers] if passes else [])
    rules = [block_rule(store, plan, plan.blocks[b]) for b in blocks]
    coefficients = [step_coefficients(store, rule, block, start, stop, dtype, device)
                    for rule, block in zip(rules, parts)]
    states = [_State(sum(p.width(store) for p in block), dtype, rule, buffer and rule.parts > 1, device)
              for rule, block in zip(rules, parts)]
    copies = HostCopies(device)
    chunk_rows = rows_per_chunk(sum(a.dtype.itemsize * a.shape[1] for a in arrays), chunk_rows)
    for t, r0, r1, rows in store.iter_steps_backward(arrays, chunk_rows, start, stop):
        grads = {i: to_device(to_torch(r, store.dtype), device, dtype) for i, r in zip(layers, rows)}
        curv = {i: to_device(to_torch(r, store.dtype), device, dtype).reshape(r1 - r0, passes, -1)
                for i, r in zip(layers, rows[len(layers):])}
        w = to_device(w_all[r0:r1], device, dtype).unsqueeze(1)
        rank = None if plan.step_rank is None else math.ceil(plan.step_rank * (r1 - r0))
        cut = _StepCurvature(curv, w, passes, rank) if passes else None  # None: the gradients are the curvature
        for b, block, state, at in zip(blocks, parts, states, coefficients):
            g = torch.cat([p.coordinates(grads[p.layer]) for p in block], 1)
            c, c_w = (None, None) if cut is None else cut.rows(block)
            for k, e in enumerate(state.step(g, w, c, c_w, at(t))):
                offset = k * len(plan.parts)
                for i, rows_i in zip(plan.blocks[b], e.split([p.width(store) for p in block], dim=1)):
                    copies.put(functools.partial(_write_rows, sinks[i + offset], r0, r1), rows_i)
        on_step()
    copies.finish()
    return [state.propagator() for state in states]


class _StepCurvature:
    """One step's curvature rows for each block, cut to their top ``rank`` eigenvectors (None: whole).

    A block of several parts is cut over its concatenated coordinates. A block of one part takes its
    layer's cut rows, computed once per step for all the blocks of that layer (sketched by the part):
    the hierarchical plan's coarse per-layer parts then cost no eigendecomposition of their own.
    """

    def __init__(self, curv: dict[int, torch.Tensor], w: torch.Tensor, passes: int, rank: int | None) -> None:
        self._curv, self._w, self._passes, self._rank = curv, w.repeat_interleave(passes, dim=0), passes, rank
        self._layer_cut: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rows(self, block: Sequence[Part]) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [n, width], weights [n, 1]) with sum_i w_i c_i c_i^T the block's (cut) curvature."""
        if len(block) == 1 and self._rank is not None:
            layer = block[0].layer
            if layer not in self._layer_cut:
                rows = self._curv[layer]
                self._layer_cut[layer] = leading_rows(rows.reshape(-1, rows.shape[-1]), self._w, self._rank)
            z, z_w = self._layer_cut[layer]
            return block[0].coordinates(z), z_w
        c = torch.cat([p.coordinates(self._curv[p.layer]) for p in block], 2)
        c = c.reshape(-1, c.shape[-1])
        return (c, self._w) if self._rank is None else leading_rows(c, self._w, self._rank)


def _write_rows(sink: RowFile, r0: int, r1: int, rows: np.ndarray) -> None:
    sink[r0:r1] = rows
