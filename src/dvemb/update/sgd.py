"""torch.optim.SGD: momentum, dampening, Nesterov and weight decay.

    d_t = g_t + lambda theta_t
    b_t = mu b_{t-1} + (1 - tau) d_t        (b_0 = d_0 with a fresh buffer)
    theta_{t+1} = theta_t - eta_t (d_t + mu b_t if Nesterov else b_t)

Linearised (see rule.py), with U the adjoint of theta_{t+1} and V that of b_t: W = V - eta c U
(c = mu for Nesterov, else 1), gamma = g W - [Nesterov] eta U (g = 1 at a fresh buffer's first step,
else 1 - tau); then U += lambda gamma and V = mu W. Plain SGD: gamma = -eta U.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .rule import Gamma, Params, StepCoefficients, UpdateRule

MOMENTUM = "momentum_buffer"


@dataclass(frozen=True)
class SGD(UpdateRule):
    """Hyperparameters of a ``torch.optim.SGD`` run (the lr is per step)."""

    kind = "sgd"
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
    def buffers(self) -> tuple[str, ...]:
        """The momentum buffer, with momentum."""
        return (MOMENTUM,) if self.momentum else ()

    @property
    def plain(self) -> bool:
        """No momentum, no weight decay: the paper's theta <- theta - lr g."""
        return self.momentum == 0 and self.weight_decay == 0

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
        return {"kind": self.kind, **asdict(self)}

    def _gamma_scale(self, t: int) -> float:
        """The factor of d_t in b_t: 1 at a fresh buffer's first step, else 1 - dampening."""
        return 1.0 if t == 0 and self.fresh else 1.0 - self.dampening

    def step(self, params: Params, grads: Params, state: Params, lr: float, t: int) -> tuple[Params, Params]:
        """torch's single-tensor SGD, functionally (same operations, so a replay matches it to round-off)."""
        new_params, new_state = {}, {}
        for name, p in params.items():
            d = grads[name] if not self.weight_decay else grads[name].add(p, alpha=self.weight_decay)
            if self.momentum:
                key = f"{MOMENTUM}:{name}"
                if key in state:
                    buf = state[key].mul(self.momentum).add(d, alpha=1 - self.dampening)
                else:  # a fresh buffer starts at d; an unknown earlier one is taken as zero
                    buf = d if self.fresh else d.mul(1 - self.dampening)
                new_state[key] = buf
                d = d.add(buf, alpha=self.momentum) if self.nesterov else buf
            # torch adds with alpha (possibly fused); plain SGD keeps the historical p - lr * d
            new_params[name] = p.add(d, alpha=-lr) if self.momentum or self.weight_decay else p - lr * d
        return new_params, new_state

    def mix(self, adjoints: list[torch.Tensor], c: StepCoefficients) -> Gamma:
        """W = V - eta c U in place; gamma = g W - [Nesterov] eta U (plain: -eta U)."""
        u = adjoints[0]
        if not self.momentum:
            return Gamma(u, [(-c.lr, u, None)])
        w = adjoints[1].add_(u, alpha=-c.lr * (self.momentum if self.nesterov else 1.0))
        return Gamma(u, [(self._gamma_scale(c.step), w, None), (-c.lr if self.nesterov else 0.0, u, None)])

    def settle(self, adjoints: list[torch.Tensor], gamma: Gamma, c: StepCoefficients) -> None:
        """U += lambda gamma (weight decay), V = mu W."""
        if self.weight_decay:
            gamma.add_to(adjoints[0], self.weight_decay)
        if self.momentum:
            adjoints[1].mul_(self.momentum)
