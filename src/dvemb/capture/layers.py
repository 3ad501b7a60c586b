"""Per-module-type rules: which modules are tracked and how their weight is oriented.

Every supported layer is an affine map on its last dimension, s = a W' + b, so the
per-sample gradient of its weight (with the bias as an extra input column) is
sum_tok ds_tok [a_tok, 1]^T. Rules only say how to recognise the module, its sizes,
and how to view its weight (or weight gradient) as a d_out x d_in matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class LayerRule:
    """How one module type maps onto the d_out x d_in gradient layout."""

    kind: str
    matches: Callable[[nn.Module], bool]
    sizes: Callable[[nn.Module], tuple[int, int]]  # (d_in, d_out) without the bias column
    as_matrix: Callable[[torch.Tensor], torch.Tensor]  # weight-shaped tensor -> d_out x d_in


def _is_hf_conv1d(module: nn.Module) -> bool:
    # Hugging Face's GPT-2 Conv1D (transformers.pytorch_utils.Conv1D): weight is (d_in, d_out).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


RULES: tuple[LayerRule, ...] = (
    LayerRule("linear", lambda m: isinstance(m, nn.Linear), lambda m: (m.in_features, m.out_features), lambda w: w),
    LayerRule("conv1d", _is_hf_conv1d, lambda m: (m.weight.shape[0], m.weight.shape[1]), lambda w: w.t()),
)


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule that handles ``module``, or None if its type is not supported."""
    return next((rule for rule in RULES if rule.matches(module)), None)


def has_bias(module: nn.Module) -> bool:
    """Whether the module has a bias parameter."""
    return getattr(module, "bias", None) is not None


def gradient_matrix(module: nn.Module, rule: LayerRule) -> torch.Tensor:
    """The module's accumulated .grad as d_out x (d_in [+1]) with the bias as last column."""
    grad = rule.as_matrix(module.weight.grad)
    if has_bias(module):
        grad = torch.cat([grad, module.bias.grad.unsqueeze(1)], dim=1)
    return grad
