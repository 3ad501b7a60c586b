"""Per-module-type rules: which modules are tracked and how their weight is oriented.

Every supported layer is affine in its weight token by token, s_tok = W a_tok + b, so the
per-sample gradient of its weight (with the bias as an extra input column) is
sum_tok ds_tok [a_tok, 1]^T. For nn.Linear and GPT-2's Conv1D a token is a position of
the last dimension's map, for nn.Conv1d / nn.Conv2d / nn.Conv3d an output position (a_tok its input patch), for
nn.Embedding a looked-up id (a_tok its one-hot vector). A grouped convolution is one such map
per group on the group's channels: its gradient's rows of group g are
sum_pos ds_g,pos [a_g,pos, 1]^T, so its tokens are (group, position) pairs and the sum over
positions runs within each group. Rules say how to recognise the
module, its sizes, how to view its weight as a d_out x d_in matrix, and how to turn its
input and output gradient into token rows (projecting the input side on the way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


Inputs = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None", bool, torch.dtype],
                  torch.Tensor]


@dataclass(frozen=True)
class LayerRule:
    """How one module type maps onto the d_out x d_in gradient layout."""

    kind: str
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


def _is_hf_conv1d(module: nn.Module) -> bool:
    # Hugging Face's GPT-2 Conv1D (transformers.pytorch_utils.Conv1D): weight is (d_in, d_out).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _affine_inputs(module: nn.Module, x: torch.Tensor, in_t: torch.Tensor | None, in_bias: torch.Tensor | None,
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


def _conv_inputs(module: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: torch.Tensor, in_t: torch.Tensor | None,
                 in_bias: torch.Tensor | None, bias: bool, dtype: torch.dtype) -> torch.Tensor:
    """Patches of a 1-D, 2-D or 3-D convolution, one token per output position.

    Projected, P_in times every patch is a convolution of the input with the k_in rows of
    P_in as filters (and P_in's bias column as their bias), so patches are never unfolded.
    A 1-D convolution runs as a 2-D one of height 1. Exact 3-D patches are a convolution with
    one-hot filters (torch has no 3-D unfold). With groups, each group's patches (its input
    channels) are projected by the same P_in: tokens [b, groups * positions, k_in], group-major.
    """
    x = x.to(dtype)
    padding = module.padding
    if isinstance(padding, str) or module.padding_mode != "zeros":  # pad as the module does, then none
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x, padding = F.pad(x, module._reversed_padding_repeated_twice, mode=mode), 0
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
        padding = (0, *padding) if isinstance(padding, tuple) else (0, padding)
    b, groups, exact = x.shape[0], module.groups, in_t is None
    conv = F.conv3d if isinstance(module, nn.Conv3d) else F.conv2d
    if exact and conv is F.conv3d:  # exact patches: one-hot filters pick each (channel, offset)
        in_t = torch.eye(x.shape[1] // groups * math.prod(kernel), dtype=dtype, device=x.device)
    if in_t is not None:
        filters = in_t.t().reshape(-1, x.shape[1] // groups, *kernel).repeat(groups, *[1] * (len(kernel) + 1))
        in_bias = None if in_bias is None else in_bias.repeat(groups)
        rows = conv(x, filters, in_bias, stride, padding, dilation, groups)  # [b, groups * k_in, *out]
    else:
        rows = F.unfold(x, kernel, dilation, padding, stride)  # [b, channels * kernel, positions]
    rows = rows.reshape(b, groups, -1, rows[0, 0].numel()).transpose(2, 3).reshape(b, -1, rows.shape[1] // groups)
    if exact and bias:
        rows = torch.cat([rows, rows.new_ones(*rows.shape[:2], 1)], dim=2)
    return rows


def _conv_outputs(ds: torch.Tensor) -> torch.Tensor:
    return ds.flatten(3).transpose(-1, -2)  # [passes, b, C_out, *spatial] -> [passes, b, positions, C_out]


def grouped_rows(ds: torch.Tensor, a_rows: torch.Tensor, out_t: torch.Tensor | None, groups: int) -> torch.Tensor:
    """Rows [b, passes * k_out * k_in] of a grouped convolution: within each group, the sum over
    positions of ds ⊗ a, then ``out_t`` (scaled P_out^T, None = exact) over all output channels.

    ds: output gradients [passes, b, C_out, *spatial]; a_rows: [b, groups * positions, k_in].
    """
    passes, b, c_out = ds.shape[:3]
    per_group = torch.einsum("pbgcs,bgsi->pbgci", ds.reshape(passes, b, groups, c_out // groups, -1),
                             a_rows.reshape(b, groups, -1, a_rows.shape[-1])).reshape(passes, b, c_out, -1)
    if out_t is not None:
        per_group = torch.einsum("pboi,ok->pbki", per_group, out_t)
    return per_group.transpose(0, 1).reshape(b, -1)


def _embedding_inputs(module: nn.Embedding, ids: torch.Tensor, in_t: torch.Tensor | None,
                      in_bias: torch.Tensor | None, bias: bool, dtype: torch.dtype) -> torch.Tensor:
    """One-hot rows of the looked-up ids (projected: the ids' rows of P_in^T); padding_idx gets no gradient."""
    ids = ids.reshape(ids.shape[0], -1)
    rows = in_t[ids] if in_t is not None else F.one_hot(ids, module.num_embeddings).to(dtype)
    if module.padding_idx is not None:
        rows = rows * (ids != module.padding_idx).unsqueeze(-1).to(rows.dtype)
    return rows


RULES: tuple[LayerRule, ...] = (
    LayerRule("linear", lambda m: isinstance(m, nn.Linear), lambda m: (m.in_features, m.out_features), lambda w: w,
              _affine_inputs, _last_dim_outputs),
    LayerRule("conv1d", _is_hf_conv1d, lambda m: (m.weight.shape[0], m.weight.shape[1]), lambda w: w.t(),
              _affine_inputs, _last_dim_outputs),
    LayerRule("conv2d", lambda m: isinstance(m, nn.Conv2d),
              lambda m: (m.weight[0].numel(), m.out_channels), lambda w: w.reshape(w.shape[0], -1),
              _conv_inputs, _conv_outputs, groups=lambda m: m.groups),
    LayerRule("torch_conv1d", lambda m: isinstance(m, nn.Conv1d),
              lambda m: (m.weight[0].numel(), m.out_channels), lambda w: w.reshape(w.shape[0], -1),
              _conv_inputs, _conv_outputs, groups=lambda m: m.groups),
    LayerRule("conv3d", lambda m: isinstance(m, nn.Conv3d),
              lambda m: (m.weight[0].numel(), m.out_channels), lambda w: w.reshape(w.shape[0], -1),
              _conv_inputs, _conv_outputs, groups=lambda m: m.groups),
    LayerRule("embedding", lambda m: isinstance(m, nn.Embedding),
              lambda m: (m.num_embeddings, m.embedding_dim), lambda w: w.t(),
              _embedding_inputs, _last_dim_outputs, default=False),
)
SUPPORTED = "nn.Linear, nn.Conv1d / nn.Conv2d / nn.Conv3d (any groups), nn.Embedding (when named), GPT-2 Conv1D"


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
