"""torch.optim.Adam / AdamW (no amsgrad) from a fresh state.

    d_t = g_t (+ lambda theta_t for Adam's L2 decay);  theta_t *= 1 - eta_t lambda for AdamW
    m_t = beta1 m_{t-1} + (1 - beta1) d_t,   v_t = beta2 v_{t-1} + (1 - beta2) d_t^2
    theta_{t+1} = theta_t - s_t m_t / D_t,   s_t = eta_t / (1 - beta1^(t+1)),
                  D_t = sqrt(v_t) / sqrt(1 - beta2^(t+1)) + eps

Linearised, a change of d_t moves m_t and v_t (dv_t = 2 (1 - beta2) d_t dd_t), and
theta_{t+1} moves by -P_t dm_t + Q_t dv_t with the diagonals P_t = s_t / D_t and
Q_t = s_t m_t / (2 D_t^2 sqrt(v_t) sqrt(1 - beta2^(t+1))). With U the adjoint of theta_{t+1}
and V_m, V_v those of m_t, v_t: W_m = V_m - U P_t, W_v = V_v + U Q_t,
gamma = (1 - beta1) W_m + 2 (1 - beta2) W_v diag(d_t); then U *= 1 - eta lambda (AdamW) or
U += lambda gamma (L2), V_m = beta1 W_m, V_v = beta2 W_v.
``second_moment="frozen"`` drops v's path (W_v = 0): the record then changes only m.

``initial_step``: the steps the optimizer had taken before the store's first step (recording started
on an optimizer with state, e.g. after warm-up or from a checkpoint). Bias corrections count from
there (t + 1 + initial_step), and the moments start from the state the store keeps
(``Store.initial_moments``) instead of zero.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from .rule import Gamma, Params, PlusDiagonal, StepCoefficients, UpdateRule

EXP_AVG, EXP_AVG_SQ = "exp_avg", "exp_avg_sq"
SecondMoment = Literal["full", "frozen"]


@dataclass(frozen=True)
class Adam(UpdateRule):
    """Adam (``decoupled=False``: L2 weight decay in the gradient) or AdamW (``decoupled=True``)."""

    kind = "adam"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = True
    second_moment: SecondMoment = "full"
    initial_step: int = 0

    def __post_init__(self) -> None:
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0) or self.eps < 0 or self.weight_decay < 0:
            raise ValueError(f"unsupported Adam settings {self}")
        if self.second_moment not in ("full", "frozen"):
            raise ValueError(f"second_moment must be 'full' or 'frozen', got {self.second_moment!r}")
        if isinstance(self.initial_step, bool) or not isinstance(self.initial_step, int) or self.initial_step < 0:
            raise ValueError(f"initial_step must be an integer >= 0, got {self.initial_step!r}")

    def count(self, t: int) -> int:
        """The optimizer's own step count at the store's step t (its bias corrections' exponent)."""
        return t + 1 + self.initial_step

    def step_size(self, lr: float, t: int) -> float:
        """s_t = eta_t / (1 - beta1^count): the lr with the first moment's bias correction."""
        return lr / (1 - self.beta1 ** self.count(t))

    @property
    def buffers(self) -> tuple[str, ...]:
        """Adjoint order: the first moment, and with ``second_moment="full"`` the second."""
        return (EXP_AVG, EXP_AVG_SQ) if self.second_moment == "full" else (EXP_AVG,)

    def describe(self) -> str:
        """One line, e.g. ``AdamW, betas (0.9, 0.999), eps 1e-08, weight decay 0.01``."""
        name = "AdamW" if self.decoupled and self.weight_decay else "Adam"
        return (f"{name}, betas ({self.beta1:g}, {self.beta2:g}), eps {self.eps:g}"
                + (f", {'decoupled ' if self.decoupled else 'L2 '}weight decay {self.weight_decay:g}"
                   if self.weight_decay else "")
                + ("" if self.second_moment == "full" else " (second moments frozen)")
                + (f", from optimizer step {self.initial_step}" if self.initial_step else ""))

    def to_dict(self) -> dict:
        """JSON form for the manifest."""
        return {"kind": self.kind, **asdict(self)}

    def _decay(self, lr: float) -> float:
        return 1.0 - lr * self.weight_decay if self.decoupled else 1.0

    def step(self, params: Params, grads: Params, state: Params, lr: float, t: int) -> tuple[Params, Params]:
        """torch's single-tensor Adam(W), functionally (same operations: a replay matches it to round-off)."""
        new_params, new_state = {}, {}
        step_size, bc2_sqrt = self.step_size(lr, t), (1 - self.beta2 ** self.count(t)) ** 0.5
        for name, p in params.items():
            g = grads[name]
            if self.weight_decay and self.decoupled:
                p = p.mul(1 - lr * self.weight_decay)
            elif self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            m = state.get(f"{EXP_AVG}:{name}", torch.zeros_like(p)).lerp(g, 1 - self.beta1)
            v = state.get(f"{EXP_AVG_SQ}:{name}", torch.zeros_like(p)).mul(self.beta2).addcmul(g, g, value=1 - self.beta2)
            new_state[f"{EXP_AVG}:{name}"], new_state[f"{EXP_AVG_SQ}:{name}"] = m, v
            new_params[name] = p.addcdiv(m, (v.sqrt() / bc2_sqrt).add(self.eps), value=-step_size)
        return new_params, new_state

    def coefficients(self, lr: float, t: int, state: Params | None = None, grad: torch.Tensor | None = None,
                     params: torch.Tensor | None = None) -> StepCoefficients:
        """P_t, Q_t and d_t from the flat moments before the step, the batch gradient and (L2 decay) theta_t.

        The moments after the step are returned too (``exp_avg``, ``exp_avg_sq``), to carry to step t + 1.
        """
        if grad is None:
            raise ValueError("Adam's linearised step needs the batch gradient")
        d = grad if self.decoupled or not self.weight_decay else grad + self.weight_decay * params
        m, v = self.moments(state or {}, d)
        s = self.step_size(lr, t)
        precondition = s / (v.sqrt() / math.sqrt(1 - self.beta2 ** self.count(t)) + self.eps)
        return StepCoefficients(lr, t, {"precondition": precondition, "second": precondition * self.coupling(m, v, t),
                                        "gradient": d, EXP_AVG: m, EXP_AVG_SQ: v})

    def moments(self, state: Params, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m_t, v_t) from the moments before the step (``state``; none before the first) and d_t."""
        m = self.beta1 * state.get(EXP_AVG, torch.zeros_like(d)) + (1 - self.beta1) * d
        return m, self.beta2 * state.get(EXP_AVG_SQ, torch.zeros_like(d)) + (1 - self.beta2) * d * d

    def coupling(self, m: torch.Tensor, v: torch.Tensor, t: int) -> torch.Tensor:
        """r_t = m_t / (2 D_t sqrt(v_t) sqrt(1 - beta2^(t+1))) elementwise, so that Q_t = P_t r_t (0 where v_t = 0,
        where every d so far, and so m_t, was 0)."""
        bc2_sqrt = math.sqrt(1 - self.beta2 ** self.count(t))
        root = v.sqrt()
        denominator = (root / bc2_sqrt + self.eps) * root * (2 * bc2_sqrt)
        return m / denominator.clamp(min=torch.finfo(denominator.dtype).tiny)

    def mix(self, adjoints: list[torch.Tensor], c: StepCoefficients) -> Gamma:
        """W_m = V_m - U P_t, W_v = V_v + U Q_t (in place); gamma = (1 - beta1) W_m + 2 (1 - beta2) W_v diag(d_t).
        Operators ``"second"`` and ``"gradient"`` in ``c`` add non-diagonal parts to Q_t and diag(d_t)
        (:class:`WhitenedAdam`'s projected coordinates)."""
        u, diag = adjoints[0], c.diagonals
        w_m = adjoints[1].addcmul_(u, diag["precondition"], value=-1.0)
        terms = [(1.0 - self.beta1, w_m, None)]
        if self.second_moment == "full":
            w_v = adjoints[2].addcmul_(u, diag["second"])
            gradient = diag["gradient"]
            if "second" in c.operators:
                w_v.add_(c.operators["second"](u))
                gradient = PlusDiagonal(c.operators["gradient"], gradient)
            terms.append((2.0 * (1.0 - self.beta2), w_v, gradient))
        return Gamma(u, terms)

    def settle(self, adjoints: list[torch.Tensor], gamma: Gamma, c: StepCoefficients) -> None:
        """U *= 1 - eta lambda (AdamW) or U += lambda gamma (L2); V_m = beta1 W_m, V_v = beta2 W_v."""
        if self.weight_decay and self.decoupled:
            adjoints[0].mul_(self._decay(c.lr))
        elif self.weight_decay:
            gamma.add_to(adjoints[0], self.weight_decay)
        adjoints[1].mul_(self.beta1)
        if self.second_moment == "full":
            adjoints[2].mul_(self.beta2)


@dataclass(frozen=True)
class WhitenedAdam(UpdateRule):
    """Adam linearised in coordinates whitened by its preconditioner: what projected per-sample gradients follow.

    A random projection mixes parameters, so Adam's elementwise scaling 1/D_t cannot be applied to
    projected rows. Written in phi = R^-1 theta, mu = R m with R_t = D_t^(-1/2) (elementwise), the
    linearised step becomes momentum with a unit preconditioner::

        dphi_{t+1} = a_t rho_t dphi_t - s_t dmu_t
        dmu_t = beta1 / rho_t dmu_{t-1} + (1 - beta1) (H~_t rho_t dphi_t + R_t dg_t)

    with H~_t = R_t H_t R_t, rho_t = R_t^-1 R_{t-1}, so the rows it needs (record gradients, curvature
    rows, test gradients) are whitened *before* projection, where R is a rank-1 (row x column) factor
    per layer that the Kronecker trick can apply, and rho_t is taken as one number per layer and
    step (``"ratio"``, a [dim] vector constant within layers). Without ``factored``
    the second moment's path is dropped on whitened coordinates.

    Exact layers of the same store keep R = 1 and :class:`Adam`'s own linearisation: their coordinates
    have ratio 1 and Adam's P_t as ``"precondition"``, and with ``second_moment="full"`` the v path
    through ``"second"`` (Q_t) and ``"gradient"`` (d_t), zero on whitened coordinates.
    Coefficients: ``"precondition"`` per coordinate, ``"ratio"``, and the lr's decoupled decay.

    ``factored`` (with ``second_moment="full"``): whitened coordinates follow v's path too, through
    operators in place of Q_t and d_t (``operators["second"]`` and ``["gradient"]``, zero on
    exact coordinates). Adam's coupling Q_u d_t / P_u = r_u d_t between a gradient at step t and the
    update at step u >= t through v (r_u = m_u / (2 D_u sqrt(v_u) sqrt(1 - beta2^(u+1))), elementwise)
    is taken as sign_u f_u f_t, with f_t = x_t y_t^T a rank-1 (row x column) fit of sqrt(|r_t d_t|) per
    layer, captured from the optimizer (capture/whitening.py). On projected coordinates v's change is
    kept projected, P(f_t (.) dd_t), and the operators are
    ``"second"`` = s_t sign_t P diag(R_t f_t) P^+ and ``"gradient"`` = P diag(f_t / R_t) P^+ (P^+ the
    pseudo-inverse; P^T for orthonormal rows), Kronecker products of k_out x k_out and k_in x k_in
    factors (embed/factored.py).
    """

    kind = "whitened_adam"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    second_moment: SecondMoment = "frozen"  # "full": exact layers' coordinates follow v's path
    factored: bool = False  # whitened coordinates follow v's path through factored operators too
    initial_step: int = 0  # as Adam's

    @property
    def buffers(self) -> tuple[str, ...]:
        """The (whitened) first moment, and with ``second_moment="full"`` the second."""
        return (EXP_AVG, EXP_AVG_SQ) if self.second_moment == "full" else (EXP_AVG,)

    def describe(self) -> str:
        """One line."""
        projected = ("factored per layer in projected layers" if self.factored else
                     "frozen in projected layers" if self.second_moment == "full" else "frozen")
        return (f"AdamW, betas ({self.beta1:g}, {self.beta2:g}), eps {self.eps:g}, weight decay {self.weight_decay:g}"
                f" (whitened, second moments {projected})"
                + (f", from optimizer step {self.initial_step}" if self.initial_step else ""))

    def to_dict(self) -> dict:
        """JSON form."""
        return {"kind": self.kind, **asdict(self)}

    @functools.cached_property
    def adam(self) -> Adam:
        """The AdamW rule whose linearisation the coordinates follow (built once: mix and settle run every step)."""
        return Adam(self.beta1, self.beta2, self.eps, self.weight_decay, True, self.second_moment, self.initial_step)

    def step(self, params: Params, grads: Params, state: Params, lr: float, t: int) -> tuple[Params, Params]:
        """The forward step is AdamW's."""
        return self.adam.step(params, grads, state, lr, t)

    def mix(self, adjoints: list[torch.Tensor], c: StepCoefficients) -> Gamma:
        """W_m = V_m - U P_t, W_v = V_v + U Q_t (in place); gamma as :meth:`Adam.mix`, whose operators carry the
        factored Q~ and d~ of whitened coordinates: W_v += U Q~, gamma's v term 2 (1 - beta2) W_v (diag(d_t) + d~)."""
        return self.adam.mix(adjoints, c)

    def settle(self, adjoints: list[torch.Tensor], gamma: Gamma, c: StepCoefficients) -> None:
        """U *= 1 - eta lambda, V_m = beta1 / rho_t W_m, V_v = beta2 W_v."""
        self.adam.settle(adjoints, gamma, c)
        adjoints[1].div_(c.diagonals["ratio"])

    def finish(self, adjoints: list[torch.Tensor], c: StepCoefficients) -> None:
        """U = (a U + gamma H~) rho_t."""
        adjoints[0].mul_(c.diagonals["ratio"])
