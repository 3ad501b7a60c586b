"""Per-module-type rules: which modules are tracked and how their per-sample gradients are formed.

Every supported layer is affine in its weight token by token, s_tok = W a_tok + b, so the
per-sample gradient of its weight (with the bias as an extra input column) is
sum_tok ds_tok [a_tok, 1]^T. A rule says how to recognise the module, its sizes, how to view
its weight as a d_out x d_in matrix, and how to turn its input and output gradient into token
rows (projecting the input side on the way). Built-in rules live one per file beside this one;
:func:`register_layer` adds a rule for a module type of your own, and later rules take
precedence, so a built-in can be overridden too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

Inputs = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None", bool, torch.dtype],
                  torch.Tensor]


@dataclass(frozen=True)
class LayerRule:
    """How one module type maps onto the d_out x d_in gradient layout."""

    kind: str  # stored in the manifest: stable and unique
    label: str  # for people: "nn.Linear"
    matches: Callable[[nn.Module], bool]
    sizes: Callable[[nn.Module], tuple[int, int]]  # (d_in, d_out) without the bias column
    as_matrix: Callable[[torch.Tensor], torch.Tensor]  # weight-shaped tensor -> d_out x d_in
    # (module, input, in_t, in_bias, bias, dtype) -> input rows [b, tokens, k_in]: projected by
    # in_t (d_in x k_in) and in_bias (k_in, the bias column of P_in), or exact (in_t None) with a ones column
    inputs: Inputs
    # output gradients [passes, b, ...] -> [passes, b, tokens, d_out], tokens in the order of the inputs
    outputs: Callable[[torch.Tensor], torch.Tensor]
    default: bool = True  # tracked by modules=None
    groups: Callable[[nn.Module], int] = lambda m: 1  # > 1: rows by grouped_rows, inputs ordered (group, token)


_RULES: list[LayerRule] = []


def add_rule(rule: LayerRule) -> LayerRule:
    """Register a rule (a later rule for the same modules takes precedence); kinds must be unique."""
    if any(r.kind == rule.kind for r in _RULES):
        raise ValueError(f"a layer rule of kind {rule.kind!r} is already registered")
    _RULES.append(rule)
    return rule


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule that handles ``module`` (the latest registered that matches), or None if unsupported."""
    return next((rule for rule in reversed(_RULES) if rule.matches(module)), None)


def rule_by_kind(kind: str) -> LayerRule:
    """The rule recorded in a manifest as ``kind``."""
    for rule in _RULES:
        if rule.kind == kind:
            return rule
    raise ValueError(f"no layer rule of kind {kind!r} is registered (register_layer adds your own layers; "
                     f"known: {[r.kind for r in _RULES]})")


def supported_layers() -> list[str]:
    """The module types dvemb can track, as people name them (``*``: tracked only when named in ``modules=``)."""
    return [rule.label + ("" if rule.default else " *") for rule in _RULES]


def has_bias(module: nn.Module) -> bool:
    """Whether the module has a bias parameter."""
    return getattr(module, "bias", None) is not None


def affine_inputs(module: nn.Module, x: torch.Tensor, in_t: torch.Tensor | None, in_bias: torch.Tensor | None,
                   bias: bool, dtype: torch.dtype) -> torch.Tensor:
    """Inputs of a map on the last dimension: every leading position of a sample is a token."""
    b = x.shape[0]
    x = x.to(dtype).reshape(-1, x.shape[-1])
    if in_t is not None:
        x = torch.addmm(in_bias, x, in_t) if in_bias is not None else x @ in_t
    elif bias:
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
    return x.reshape(b, -1, x.shape[-1])


def _last_dim_outputs(ds: torch.Tensor) -> torch.Tensor:
    return ds.reshape(ds.shape[0], ds.shape[1], -1, ds.shape[-1])


def last_dim_outputs(ds: torch.Tensor) -> torch.Tensor:
    """Output gradients of a map on the last dimension: every leading position of a sample is a token."""
    return ds.reshape(ds.shape[0], ds.shape[1], -1, ds.shape[-1])


def register_layer(module_type: type[nn.Module], *, sizes: Callable[[nn.Module], tuple[int, int]],
                   weight_matrix: Callable[[torch.Tensor], torch.Tensor] = lambda w: w,
                   outputs: Callable[[torch.Tensor], torch.Tensor] = last_dim_outputs,
                   default: bool = True, kind: str | None = None) -> Callable:
    """Decorator: track modules of ``module_type`` with the decorated function giving their input's token rows.

    The contract: the module's output is affine in its ``weight`` (and ``bias``, if any) token by
    token, s_tok = W a_tok (+ b), with W = ``weight_matrix(module.weight)`` of shape (d_out, d_in)
    and ``sizes(module) = (d_in, d_out)``. The decorated ``inputs(module, x) -> [b, tokens, d_in]``
    gives each sample's a_tok from the module's first positional input ``x`` (batch first);
    ``outputs(ds) -> [passes, b, tokens, d_out]`` turns output gradients [passes, b, ...] into
    token rows in the same token order (default: the output's last dimension is d_out). dvemb
    adds the bias column and projects. The rule's ``kind`` (default: the class's qualified name)
    is stored in the manifest, so register the same rule before opening a store that uses it::

        @dvemb.register_layer(MyLinear, sizes=lambda m: (m.in_features, m.out_features))
        def my_linear_inputs(module, x):
            return x.reshape(x.shape[0], -1, module.in_features)
    """
    def decorate(inputs: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        def projected(module: nn.Module, x: torch.Tensor, in_t, in_bias, bias: bool, dtype: torch.dtype):
            return affine_inputs(module, inputs(module, x), in_t, in_bias, bias, dtype)

        add_rule(LayerRule(kind or module_type.__qualname__, module_type.__qualname__,
                           lambda m: isinstance(m, module_type), sizes, weight_matrix, projected, outputs, default))
        return inputs

    return decorate
