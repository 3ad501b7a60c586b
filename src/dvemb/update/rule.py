"""The update rule a run followed, forwards (replay) and linearised backwards (embeddings, adjoints).

A rule steps the state (theta_t, buffers_{t-1}) with the batch gradient g_t to
(theta_{t+1}, buffers_t). Removing record (t, i) changes g_t by -w_ti g_ti; to first order the
change reaches theta_T through the linearised steps, with dg_t = H_t dtheta_t. Both the
recursion (matrices) and the exact adjoint (row vectors) carry *adjoints*: tensors [n_out, p]
whose rows map a change of theta_{t+1} (``adjoints[0]``) or of a buffer at step t (the others)
to the outputs. One step back is::

    gamma = rule.mix(adjoints, c)     # buffers' adjoints become W (total adjoints at step t), in place;
                                      # gamma is the adjoint of g_t, a lazy combination of them
    embedding of record (t, i) = -w_ti gamma g_ti
    rule.settle(adjoints, gamma, c)   # theta's adjoint without the curvature term, buffers' of step t-1
    adjoints[0] += gamma H_t          # by the caller: H_t from curvature rows or Hessian products
    rule.finish(adjoints, c)

``c`` holds the step's coefficients (:class:`StepCoefficients`): the lr, and for rules with
state-dependent scalings (Adam) their per-parameter values.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping, Protocol, Union

import torch

Params = dict[str, torch.Tensor]


class Operator(Protocol):
    """A linear map M on a rule's coordinates, applied to rows x [n, p]: ``op(x)`` = x M and
    ``op.transposed(x)`` = x M^T (new tensors)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def transposed(self, x: torch.Tensor) -> torch.Tensor: ...


class PlusDiagonal:
    """The operator M + diag(d)."""

    __slots__ = ("op", "d")

    def __init__(self, op: Operator, d: torch.Tensor) -> None:
        self.op, self.d = op, d

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x).addcmul_(x, self.d)

    def transposed(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.transposed(x).addcmul_(x, self.d)


@dataclass(frozen=True)
class StepCoefficients:
    """What one linearised step needs: its lr and index, per-parameter scalings (rule-specific, [p]), and
    operators where a scaling is not diagonal (rule-specific, e.g. on projected coordinates)."""

    lr: float
    step: int
    diagonals: Mapping[str, torch.Tensor] = field(default_factory=dict)
    operators: Mapping[str, Operator] = field(default_factory=dict)


Scale = Union[torch.Tensor, Operator, None]
"""A term's scaling in :class:`Gamma`: diagonal [p], an operator, or none."""


def _scaled(x: torch.Tensor, scale: Scale, transposed: bool = False) -> torch.Tensor:
    """x diag(s), x M or (``transposed``) x M^T for rows x [n, p] (x itself when unscaled)."""
    if scale is None:
        return x
    if isinstance(scale, torch.Tensor):
        return x * scale
    return scale.transposed(x) if transposed else scale(x)


class Gamma:
    """A lazy linear combination sum_k alpha_k T_k S_k of adjoint tensors [n_out, p], S_k a diagonal scaling
    diag(s_k), an operator, or none.

    Never formed as a matrix in the recursion: products with rows and additions go term by term.
    """

    __slots__ = ("terms", "like")

    def __init__(self, like: torch.Tensor, terms: list[tuple[float, torch.Tensor, Scale]]) -> None:
        self.like = like  # an adjoint tensor: gamma's shape
        self.terms = [t for t in terms if t[0] != 0.0]

    def rows(self, x: torch.Tensor, product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
             ) -> torch.Tensor:
        """``x @ gamma.T`` for rows x [n, p]: [n, n_out]. ``product(a, b)`` computes a @ b.T (default: torch)."""
        mul = product or (lambda a, b: a @ b.t())
        out = None
        for alpha, tensor, scale in self.terms:  # x (T S)^T = (x S^T) T^T
            part = mul(_scaled(x, scale, transposed=True), tensor)
            out = part.mul_(alpha) if out is None else out.add_(part, alpha=alpha)
        return out if out is not None else x.new_zeros(x.shape[0], self.like.shape[0])

    def add_to(self, target: torch.Tensor, alpha: float = 1.0) -> None:
        """``target += alpha * gamma`` in place (terms that are ``target`` itself are applied first, as a scaling)."""
        own = sum(a for a, tensor, scale in self.terms if tensor is target and scale is None)
        if own:
            target.mul_(1.0 + alpha * own)
        for a, tensor, scale in self.terms:
            if tensor is target and scale is None:
                continue
            if tensor is target:
                raise ValueError("a scaled term of gamma cannot be added to itself in place")
            if isinstance(scale, torch.Tensor):
                target.addcmul_(tensor, scale, value=alpha * a)
            else:
                target.add_(_scaled(tensor, scale), alpha=alpha * a)

    def dense(self) -> torch.Tensor:
        """The combination as a new tensor (row vectors: the exact adjoint)."""
        out = torch.zeros_like(self.like)
        for a, tensor, scale in self.terms:
            out.add_(_scaled(tensor, scale), alpha=a)
        return out


class UpdateRule(ABC):
    """An optimizer's update, as a forward step and as its linearisation."""

    kind: ClassVar[str]
    """Name in the store's manifest."""

    @property
    @abstractmethod
    def buffers(self) -> tuple[str, ...]:
        """Names of the per-parameter buffers the rule keeps (momentum, moments), in adjoint order."""

    @property
    def parts(self) -> int:
        """Tensors of a state: theta and each buffer."""
        return 1 + len(self.buffers)

    @property
    def plain(self) -> bool:
        """theta <- theta - lr g: the paper's setting."""
        return False

    @abstractmethod
    def describe(self) -> str:
        """One line for summaries."""

    @abstractmethod
    def to_dict(self) -> dict:
        """JSON form for the manifest, with ``"kind"``."""

    # -- forwards ---------------------------------------------------------------------------
    @abstractmethod
    def step(self, params: Params, grads: Params, state: Params, lr: float, t: int) -> tuple[Params, Params]:
        """One functional step: (params, buffers) after step t from the batch gradients (vmappable, no in-place).

        ``state`` maps ``"<buffer>:<param>"`` to buffers (empty before the first step).
        """

    # -- linearised -------------------------------------------------------------------------
    def coefficients(self, lr: float, t: int, state: Params | None = None, grad: torch.Tensor | None = None,
                     params: torch.Tensor | None = None) -> StepCoefficients:
        """Coefficients of step t. Rules with state-dependent scalings need the flat buffers before the step
        (``state``: buffer name -> [p]), the flat batch gradient ``grad`` [p] and parameters ``params`` [p]."""
        return StepCoefficients(lr, t)

    @abstractmethod
    def mix(self, adjoints: list[torch.Tensor], c: StepCoefficients) -> Gamma:
        """Turn the buffers' adjoints into W (in place) and return gamma, the adjoint of g_t."""

    @abstractmethod
    def settle(self, adjoints: list[torch.Tensor], gamma: Gamma, c: StepCoefficients) -> None:
        """After gamma was used: theta's adjoint through the step (without H), buffers' of the step before."""

    def finish(self, adjoints: list[torch.Tensor], c: StepCoefficients) -> None:
        """After the caller added gamma H to theta's adjoint (most rules: nothing to do)."""
