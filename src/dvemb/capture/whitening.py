"""Whitening projected rows by Adam's preconditioner (see :class:`dvemb.update.adam.WhitenedAdam`).

A projection mixes parameters, so Adam's elementwise 1/D_t (D_t = sqrt(v_t / (1 - beta2^(t+1))) + eps)
cannot act on projected rows. Whitened rows can carry it: the per-sample gradient is scaled
elementwise by R_t = D_t^(-1/2) before projection, which the Kronecker trick applies when R is a
row x column product, R ~ exp(r) exp(c)^T per layer: the least-squares fit of log R by a row
and a column term (the bias as a last column). Measured on MNIST with AdamW, 1024 values per
layer and fitted bases: Spearman 0.92 with whitened rows against 0.68 with one number per layer;
unprojected, the factored whitening costs 0.007 against the elementwise one.

Exact layers (no projection) are not whitened: their factors are zero (R = 1), and the recursion
follows Adam's own per-parameter linearisation on them, second moment included.

Rows of steps whose capture was deferred (the first steps, while the bases are fitted) are
whitened with the step's own second moment v_t, from the optimizer's state and the batch
gradient before ``optimizer.step()``; later steps with v_{t-1}, known when the step starts
(on MNIST the two agree within 0.002).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..update import Adam
from .distributed import full_tensor
from .layers import rule_for
from ..store import LayerSpec

Factors = tuple[torch.Tensor, torch.Tensor]  # log row factor [d_out], log column factor [d_in (+1)]


class Whitening:
    """The factored log whitening of each tracked layer, read from an Adam optimizer's state."""

    def __init__(self, optimizer: torch.optim.Optimizer, modules: Sequence[nn.Module], specs: Sequence[LayerSpec],
                 rule: Adam) -> None:
        self.optimizer, self.modules, self.specs, self.rule = optimizer, list(modules), list(specs), rule

    def lagged(self, t: int) -> list[Factors]:
        """Factors from v_{t-1}, the state before step t (identity at the first step)."""
        return [self._factors(m, s, t, current=False) for m, s in zip(self.modules, self.specs)]

    def current(self, t: int) -> list[Factors]:
        """Factors from v_t: the state before step t updated with the batch gradient in ``.grad``."""
        return [self._factors(m, s, t, current=True) for m, s in zip(self.modules, self.specs)]

    def _factors(self, module: nn.Module, spec: LayerSpec, t: int, current: bool) -> Factors:
        params = [module.weight] + ([module.bias] if spec.bias else [])
        states = [self.optimizer.state.get(p, {}).get("exp_avg_sq") for p in params]
        steps = t + 1 if current else t
        if steps == 0 or spec.exact:  # exact layers follow Adam elementwise: identity factors
            return torch.zeros(spec.d_out, dtype=torch.float64), torch.zeros(spec.d_in + spec.bias, dtype=torch.float64)
        second = []
        for p, v in zip(params, states):  # FSDP: state and gradient are shards, gathered (every rank calls this)
            v = torch.zeros(p.shape, dtype=torch.float64, device=p.device) if v is None else full_tensor(v.detach()).double()
            if current:
                if p.grad is None:
                    raise RuntimeError(f"layer {spec.name!r} has no gradient at the end of the step")
                v = self.rule.beta2 * v + (1 - self.rule.beta2) * full_tensor(p.grad.detach()).double() ** 2
            second.append(v)
        rule = rule_for(module)
        matrix = rule.as_matrix(second[0])
        if spec.bias:
            matrix = torch.cat([matrix, second[1].reshape(-1, 1)], 1)
        log_r = -0.5 * torch.log((matrix / (1 - self.rule.beta2 ** steps)).sqrt() + self.rule.eps)
        mean = log_r.mean()
        return log_r.mean(1).cpu(), (log_r.mean(0) - mean).cpu()


def scales(factors: Sequence[Factors]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(in_scale, out_scale) per layer for the capture's projectors: exp of the column and row factors."""
    return [(c.exp(), r.exp()) for r, c in factors]


def rows(factors: Sequence[Factors]) -> list[np.ndarray]:
    """The store's per-step rows [d_out + d_in (+1)]: the log row factor, then the log column factor."""
    return [torch.cat([r, c]).numpy() for r, c in factors]


def from_row(row: np.ndarray, spec: LayerSpec) -> Factors:
    """Inverse of :func:`rows` for one layer."""
    row = torch.from_numpy(np.asarray(row, dtype=np.float64))
    return row[: spec.d_out], row[spec.d_out:]


def level(row: np.ndarray, spec: LayerSpec) -> float:
    """The mean log whitening of a layer at a step (row factor mean; the column factor has mean zero)."""
    return float(np.mean(row[: spec.d_out]) + np.mean(row[spec.d_out:]))
