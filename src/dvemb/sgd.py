"""The update rule the embeddings linearise: PyTorch's SGD (momentum, dampening, Nesterov, weight decay),
or Adam / AdamW with frozen second moments.

    d_t = g_t + lambda theta_t                                     (weight decay)
    b_t = mu b_{t-1} + (1 - tau) d_t     (b_t = d_t at the first step)
    theta_{t+1} = theta_t - eta_t (d_t + mu b_t if Nesterov else b_t)

Removing record (t, i) changes g_t by -w_ti g_ti. To first order (H_k ~ sum_i w_ki g_ki g_ki^T
as for plain SGD) the change reaches theta_T through the pair (theta, b), and the backward
recursion carries two matrices per block instead of one: U (the effect of a change of theta
at step t on theta_T) and V (of a change of the momentum buffer). See ``embed/recursion.py``.

Adam is linearised with its second moments frozen (a record changes v by (1 - beta2) of its
share of g^2, which is dropped): theta_{t+1} = a_t theta_t - P_t m_t with the diagonal
P_t = eta_t / (1 - beta1^(t+1)) / (sqrt(v_t / (1 - beta2^(t+1))) + eps) and a_t = 1 - eta_t lambda
(AdamW), m_t = beta1 m_{t-1} + (1 - beta1) g_t. P_t is elementwise in parameter space: it is
rebuilt by replaying v over the store, exactly from exact per-sample gradients
(``projection_dim=None``), as one number per layer and step from projected ones.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class SGDSettings:
    """Hyperparameters of a ``torch.optim.SGD`` run that shape each record's influence (lr is per step)."""

    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    fresh: bool = True  # no momentum buffer before the first recorded step (b_0 = d_0, undampened)

    def __post_init__(self) -> None:
        if self.momentum < 0 or self.weight_decay < 0 or not 0.0 <= self.dampening <= 1.0:
            raise ValueError(f"unsupported SGD settings {self}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    @property
    def plain(self) -> bool:
        """theta <- theta - lr * grad: the paper's setting (one matrix per block in the recursion)."""
        return self.momentum == 0 and self.weight_decay == 0

    def gamma(self, first: bool) -> float:
        """The factor of d_t in b_t: 1 at a fresh buffer's first step, else 1 - dampening."""
        return 1.0 if first and self.fresh else 1.0 - self.dampening

    def mix(self, u: torch.Tensor, v: torch.Tensor, lr: float, t: int) -> tuple[float, float]:
        """One step back in the linearised run: turn V (of step t + 1) into W = V - eta c U in place
        (c = mu for Nesterov, else 1) and return (a, b) with Phi = a W + b U = gamma W - [Nesterov] eta U.

        U and V map a change of (theta_t, b_{t-1}) to an output: matrices in the recursion, row
        vectors (the test gradients' adjoints) in the exact first-order estimator.
        """
        v.add_(u, alpha=-lr * (self.momentum if self.nesterov else 1.0))
        return self.gamma(t == 0), -lr if self.nesterov else 0.0

    def decay(self, u: torch.Tensor, w_mat: torch.Tensor, phi: tuple[float, float], lr: float) -> None:
        """Weight decay's part of U += Phi (H + lambda I), in place."""
        if self.weight_decay:
            if phi[1]:
                u.mul_(1.0 + self.weight_decay * phi[1])
            u.add_(w_mat, alpha=self.weight_decay * phi[0])

    def describe(self) -> str:
        """One line, e.g. ``SGD, momentum 0.9 (Nesterov), weight decay 0.0005``."""
        parts = ["SGD"]
        if self.momentum:
            parts.append(f"momentum {self.momentum:g}" + (" (Nesterov)" if self.nesterov else "")
                         + (f", dampening {self.dampening:g}" if self.dampening else ""))
        if self.weight_decay:
            parts.append(f"weight decay {self.weight_decay:g}")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        """JSON form for the manifest."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "SGDSettings":
        """From the manifest; stores written before momentum support are plain SGD."""
        return cls(**data) if data else cls()


@dataclass(frozen=True)
class AdamSettings:
    """torch.optim.Adam / AdamW (no amsgrad), from a fresh state; weight decay only decoupled (AdamW)."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def describe(self) -> str:
        """One line, e.g. ``Adam(W), betas (0.9, 0.999), eps 1e-08, weight decay 0.01``."""
        return (f"Adam{'W' if self.weight_decay else ''}, betas ({self.beta1:g}, {self.beta2:g}), eps {self.eps:g}"
                + (f", weight decay {self.weight_decay:g}" if self.weight_decay else "")
                + " (second moments frozen)")

    def to_dict(self) -> dict:
        """JSON form for the manifest."""
        return asdict(self)


def settings_of(optimizer: torch.optim.Optimizer | None, modules: Sequence[nn.Module],
                exact: bool = True) -> SGDSettings | AdamSettings:
    """The update rule of the groups holding the tracked layers (plain SGD without an optimizer).

    Adam / AdamW's preconditioner is rebuilt elementwise from exact per-sample gradients
    (``exact``), per layer otherwise (warned); other optimizers, and Adam settings that cannot
    be followed, are linearised as plain SGD with a warning: their scores are an approximation.
    """
    if optimizer is None:
        return SGDSettings()
    params = {id(p) for m in modules for p in m.parameters(recurse=False)}
    groups = [g for g in optimizer.param_groups if any(id(p) in params for p in g["params"])]
    if isinstance(optimizer, torch.optim.Adam):  # AdamW is a subclass
        adam, why = _adam_settings(optimizer, groups, params, exact)
        if adam is not None:
            return adam
        warnings.warn(f"{type(optimizer).__name__}: {why}; data value embeddings linearise plain SGD instead, "
                      "so scores are an approximation for this run", stacklevel=3)
        return SGDSettings()
    if not isinstance(optimizer, torch.optim.SGD):
        warnings.warn(f"{type(optimizer).__name__} is not SGD; data value embeddings linearise "
                      "theta <- theta - lr * grad (with momentum and weight decay for torch.optim.SGD, Adam with "
                      "exact gradients), so scores are an approximation for this optimizer", stacklevel=3)
        return SGDSettings()
    found = {(float(g.get("momentum", 0)), float(g.get("dampening", 0)), bool(g.get("nesterov", False)),
              float(g.get("weight_decay", 0)), bool(g.get("maximize", False))) for g in groups}
    if len(found) > 1:
        raise ValueError(f"tracked layers are in SGD groups with different momentum / dampening / Nesterov / "
                         f"weight decay settings {sorted(found)}; dvemb needs one setting for all tracked layers")
    if not found:
        return SGDSettings()
    momentum, dampening, nesterov, weight_decay, maximize = found.pop()
    if maximize:
        raise ValueError("SGD(maximize=True) is not supported: the embeddings assume descent")
    fresh = not any("momentum_buffer" in optimizer.state.get(p, {}) and optimizer.state[p]["momentum_buffer"]
                    is not None for m in modules for p in m.parameters(recurse=False))
    return SGDSettings(momentum, dampening if momentum else 0.0, nesterov, weight_decay, fresh)


def _adam_settings(optimizer: torch.optim.Adam, groups: list[dict], params: set[int],
                   exact: bool) -> tuple[AdamSettings | None, str]:
    """Adam's settings, or None and why they cannot be followed."""
    found = {(tuple(float(b) for b in g["betas"]), float(g["eps"]), float(g["weight_decay"]),
              bool(g.get("decoupled_weight_decay", False)), bool(g.get("amsgrad")), bool(g.get("maximize")))
             for g in groups}
    if not found:
        return None, "it holds none of the tracked layers"
    if len(found) != 1:
        return None, "the tracked layers are in groups with different settings"
    (beta1, beta2), eps, weight_decay, decoupled, amsgrad, maximize = found.pop()
    if amsgrad or maximize:
        return None, "amsgrad and maximize are not modelled"
    if weight_decay and not decoupled:
        return None, "Adam's L2 weight decay needs theta_t in its second moments (use AdamW)"
    if not exact:
        warnings.warn(f"{type(optimizer).__name__} with projected gradients: its per-parameter preconditioner is "
                      "approximated by one per layer and step (exact per-sample gradients, projection_dim=None, "
                      "follow it elementwise)", stacklevel=4)
    if any(optimizer.state.get(p) for g in groups for p in g["params"] if id(p) in params):
        return None, "it already has state (the second moments before recording are unknown)"
    return AdamSettings(beta1, beta2, eps, weight_decay), ""
