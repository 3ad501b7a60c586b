"""Layer rules: the built-in ones (one module per family) and :func:`register_layer` for your own."""

from . import linear, conv, embedding  # noqa: F401, I001  (registers the built-in rules, in this order)
from .conv import grouped_rows
from .registry import (LayerRule, add_rule, affine_inputs, has_bias, last_dim_outputs, register_layer, rule_by_kind,
                       rule_for, supported_layers)

__all__ = ["LayerRule", "add_rule", "affine_inputs", "grouped_rows", "has_bias", "last_dim_outputs", "register_layer",
           "rule_by_kind", "rule_for", "supported_layers"]
