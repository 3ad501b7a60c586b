"""Algorithm 1: data value embeddings by a backward recursion over the recorded steps.

With H_k ~ sum_i w_ki g_ki g_ki^T (or separately captured curvature rows, see
capture/curvature.py), the propagator K = prod_{k>t} (I - eta_k H_k) is
kept as K = I - M, one M per layer, updated from the last step backwards::

    M = 0
    for t = T-1 .. 0:
        e_ti = eta_t w_ti (g_ti - M g_ti)        (row form: E = eta w (G - G M^T))
        M   += sum_i e_ti g_ti^T                  (M += E^T G)

so DVEmb(t, i) = e_ti = eta_t w_ti K g_ti. Memory is O(sum_l dim_l^2) plus two chunks
of records (CHUNK_BYTES each by default), read from the store backwards in time.
``blocking="global"`` keeps one M over all layers instead (O((sum_l dim_l)^2)), which keeps
the cross-layer curvature.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import torch

from .. import gemm
from ..sgd import AdamSettings, SGDSettings
from ..store import RowFile, Store, to_torch

Precision = Literal["float32", "float64"]
Blocking = Literal["layer", "global"]
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
CHUNK_BYTES = 96 << 20  # records read per chunk (two are alive while the next is read); 8,200 rows of 3 x 1024 fp32


def rows_per_chunk(row_bytes: int, chunk_rows: int | None) -> int:
    """``chunk_rows`` if given, else as many rows as fit in CHUNK_BYTES (at least one)."""
    return chunk_rows if chunk_rows is not None else max(1, CHUNK_BYTES // max(1, row_bytes))


def default_precision(store: Store) -> Precision:
    """float64 for float64 stores, else float32 (shown accurate to ~1e-5 by the tests)."""
    return "float64" if store.dtype == "float64" else "float32"


class _PlainState:
    """Plain SGD: the running product K = I - M of one block."""

    def __init__(self, dim: int, dtype: torch.dtype) -> None:
        self.m = torch.zeros(dim, dim, dtype=dtype)

    def step(self, g: torch.Tensor, w: torch.Tensor, lr: float, c: torch.Tensor | None,
             c_w: torch.Tensor | None, t: int) -> list[torch.Tensor]:
        """Embeddings [B, dim] of step t's records (rows g, weights w), then fold the step's curvature in."""
        e = (lr * w) * (g - gemm.rows_product(g, self.m))  # eta w (g - M g), rows
        if c is None:
            gemm.add_outer(self.m, e, g)  # M += E^T G
        else:  # H_t = sum_i w_ti sum_s c_tis c_tis^T with separately captured rows c
            gemm.add_outer(self.m, (lr * c_w) * (c - gemm.rows_product(c, self.m)), c)
        return [e]

    def propagator(self) -> torch.Tensor:
        """K = I - M, in place."""
        self.m.neg_().diagonal().add_(1.0)
        return self.m


class _AdamRule:
    """Adam with frozen second moments: W = V - U P_t (P_t diagonal), Phi = (1 - beta1) W;
    AdamW scales U by 1 - eta lambda. (SGD's rule is ``SGDSettings.mix`` / ``decay``.)"""

    def __init__(self, adam: AdamSettings, preconditioners: torch.Tensor, start: int) -> None:
        self.adam, self.momentum = adam, adam.beta1
        self.p, self.start = preconditioners, start  # [steps of the segment, dim]

    def mix(self, u: torch.Tensor, v: torch.Tensor, lr: float, t: int) -> tuple[float, float]:
        """Turn V (of step t + 1) into W in place; return (a, b) with Phi = a W + b U."""
        v.addcmul_(u, self.p[t - self.start], value=-1.0)
        return 1.0 - self.adam.beta1, 0.0

    def decay(self, u: torch.Tensor, w_mat: torch.Tensor, phi: tuple[float, float], lr: float) -> None:
        """AdamW's theta <- (1 - eta lambda) theta: U_t = (1 - eta lambda) U_{t+1} + Phi H."""
        if self.adam.weight_decay:
            u.mul_(1.0 - lr * self.adam.weight_decay)


class _MomentumState:
    """A momentum method (SGD with momentum and/or weight decay, Adam): U and V map a change of
    (theta_t, buffer_{t-1}) to an output.

    The output is theta at the end of the segment, and with ``buffer`` also the momentum
    buffer there (Algorithm 2 composes segments through both). With the rule's W and
    Phi = a W + b U, a record's embedding is -w Phi g (the output's change when its gradient
    is dropped), and going back one step: U += Phi H (plus the rule's weight decay),
    V = mu W. Plain SGD gives Phi = -eta U. W is formed in V's storage: no matrix is allocated.
    """

    def __init__(self, dim: int, dtype: torch.dtype, rule: SGDSettings | _AdamRule, buffer: bool) -> None:
        eye, zero = torch.eye(dim, dtype=dtype), torch.zeros(dim, dim, dtype=dtype)
        self.maps = [(eye, zero)] + ([(zero.clone(), eye.clone())] if buffer else [])  # (U, V) per output
        self.rule = rule

    def step(self, g: torch.Tensor, w: torch.Tensor, lr: float, c: torch.Tensor | None,
             c_w: torch.Tensor | None, t: int) -> list[torch.Tensor]:
        """Embeddings [B, dim] of step t's records for each output, then go back one step."""
        out = []
        for u, v in self.maps:
            phi = self.rule.mix(u, v, lr, t)  # v now holds W
            e = self._times_phi(g, u, v, phi, -w)  # -w Phi g, rows
            h, h_e = (g, e) if c is None else (c, self._times_phi(c, u, v, phi, -c_w))
            self.rule.decay(u, v, phi, lr)
            gemm.add_outer(u, -h_e, h)  # U += sum_i w_i (Phi h_i) h_i^T
            v.mul_(self.rule.momentum)  # V = mu W
            out.append(e)
        return out

    @staticmethod
    def _times_phi(rows: torch.Tensor, u: torch.Tensor, w_mat: torch.Tensor, phi: tuple[float, float],
                   scale: torch.Tensor) -> torch.Tensor:
        """scale * (rows Phi^T) with Phi = a W + b U, without forming Phi."""
        product = gemm.rows_product(rows, w_mat).mul_(phi[0])
        if phi[1]:
            product.add_(gemm.rows_product(rows, u), alpha=phi[1])
        return product.mul_(scale)

    def propagator(self) -> torch.Tensor:
        """The map of a change of theta (and of the buffer) at the segment's start to the outputs."""
        if len(self.maps) == 1:
            return self.maps[0][0]
        return torch.cat([torch.cat(pair, 1) for pair in self.maps], 0)  # [[U, V], [U_b, V_b]]


def adam_preconditioners(store: Store, block: Sequence[int], start: int, stop: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """P_t = eta_t / (1 - beta1^(t+1)) / (sqrt(v_t / (1 - beta2^(t+1))) + eps) for t in [start, stop): [steps, dim].

    v is replayed from step 0 over the stored per-sample gradients: the batch gradient of step t
    is sum_i w_ti g_ti (what the optimizer applied). Exact layers get v elementwise; a projected
    layer gets one v per layer, the mean square of its batch gradient, ||P_out G P_in^T||^2 / size
    (the projections keep squared norms in expectation): an approximation of Adam's
    per-parameter scaling that keeps its per-layer and per-step scale.
    """
    adam = store.config.adam
    assert adam is not None
    records, starts = store.records, store.step_starts
    weights, lrs = np.ascontiguousarray(records["weight"], dtype=np.float64), np.asarray(records["lr"])
    specs = [store.layers[i] for i in block]
    grads = [store.grads(i) for i in block]
    exact = [s.proj_in.is_identity and s.proj_out.is_identity for s in specs]
    v = [torch.zeros(s.dim if e else 1, dtype=torch.float64) for s, e in zip(specs, exact)]
    out = torch.empty(stop - start, sum(s.dim for s in specs), dtype=dtype)
    for t in range(stop):
        r0, r1 = int(starts[t]), int(starts[t + 1])
        scale = float(lrs[r0]) / (1.0 - adam.beta1 ** (t + 1)) if r1 > r0 else 0.0
        parts = []
        for spec, a, v_l, e in zip(specs, grads, v, exact):
            mean = torch.from_numpy(weights[r0:r1]) @ to_torch(np.asarray(a[r0:r1]), store.dtype).double()
            square = mean * mean if e else (mean @ mean / (spec.d_out * (spec.d_in + spec.bias))).reshape(1)
            v_l.mul_(adam.beta2).add_(square, alpha=1.0 - adam.beta2)
            parts.append((v_l.sqrt() / math.sqrt(1.0 - adam.beta2 ** (t + 1)) + adam.eps).expand(spec.dim))
        if t >= start:
            out[t - start] = scale / torch.cat(parts)
    return out


def run_recursion(
    store: Store,
    blocks: Sequence[Sequence[int]],
    sinks: Mapping[int, RowFile],
    start: int,
    stop: int,
    precision: Precision,
    chunk_rows: int | None,
    on_step: Callable[[], None] = lambda: None,
    buffer: bool = False,
) -> list[torch.Tensor]:
    """Run the recursion over steps [start, stop) from M = 0 for the given blocks of layers.

    Each block (a list of layer indices) has one M over its layers' concatenated
    dimensions: one layer per block is the layer-wise approximation, all layers in one
    block is a global M. Writes each record's embedding relative to step ``stop`` into
    ``sinks`` (row writers by layer index, rows indexed like the store) and
    returns the segment's propagators K = I - M, one per block. Records are read in chunks of
    ``chunk_rows`` rows, by default as many as fit in CHUNK_BYTES. A store recorded with
    momentum or weight decay (``store.config.sgd``) keeps two matrices per block (U, V); with
    ``buffer`` (momentum, Algorithm 2) also the records' effects on the momentum buffer at
    ``stop``, written to ``sinks[layer + number of layers]``, and the propagators map
    (theta, buffer) to (theta, buffer).
    """
    dtype = TORCH_DTYPES[precision]
    records = store.records
    lr_all, w_all = np.asarray(records["lr"]), np.ascontiguousarray(records["weight"], dtype=np.float64)
    layers = [i for block in blocks for i in block]
    passes = store.curvature_passes
    arrays = [store.grads(i) for i in layers] + ([store.curvature(i) for i in layers] if passes else [])
    dims = [sum(store.layers[i].dim for i in block) for block in blocks]
    config = store.config
    buffer = buffer and (config.sgd.momentum > 0 or config.adam is not None)
    if config.adam is not None:
        rules = [_AdamRule(config.adam, adam_preconditioners(store, block, start, stop, dtype), start)
                 for block in blocks]
    else:
        rules = [None if config.sgd.plain else config.sgd for _ in blocks]
    states = [_PlainState(d, dtype) if rule is None else _MomentumState(d, dtype, rule, buffer)
              for d, rule in zip(dims, rules)]
    chunk_rows = rows_per_chunk(sum(a.dtype.itemsize * a.shape[1] for a in arrays), chunk_rows)
    for t, r0, r1, rows in store.iter_steps_backward(arrays, chunk_rows, start, stop):
        by_layer = dict(zip(layers, rows))
        curv_by_layer = dict(zip(layers, rows[len(layers):]))
        w = torch.from_numpy(w_all[r0:r1]).to(dtype).unsqueeze(1)
        lr = float(lr_all[r0]) if r1 > r0 else 0.0
        for block, state in zip(blocks, states):
            g = torch.cat([to_torch(by_layer[i], store.dtype) for i in block], 1).to(dtype)
            c = c_w = None
            if passes:
                c = torch.cat([to_torch(curv_by_layer[i], store.dtype).reshape(len(g), passes, -1) for i in block],
                              2).reshape(-1, g.shape[1]).to(dtype)
                c_w = w.repeat_interleave(passes, dim=0)
            for part, e in enumerate(state.step(g, w, lr, c, c_w, t)):
                offset = part * len(store.layers)
                for i, rows_i in zip(block, e.split([store.layers[i].dim for i in block], dim=1)):
                    sinks[i + offset][r0:r1] = rows_i.numpy()
        on_step()
    return [state.propagator() for state in states]


def block_layers(store: Store, blocking: Blocking) -> list[list[int]]:
    """Layer indices of each block: one per layer, or all layers together."""
    if blocking == "layer":
        return [[i] for i in range(len(store.layers))]
    if blocking == "global":
        return [list(range(len(store.layers)))]
    raise ValueError(f"blocking must be 'layer' or 'global', got {blocking!r}")
