"""nn.Conv1d / nn.Conv2d / nn.Conv3d, any groups (depthwise too), stride, dilation and padding mode.

A token is an output position and a_tok its input patch. A grouped convolution is one map per
group on the group's channels: its gradient's rows of group g are sum_pos ds_g,pos [a_g,pos, 1]^T,
so its tokens are (group, position) pairs and the sum over positions runs within each group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .registry import LayerRule, add_rule


def conv_inputs(module: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: torch.Tensor, in_t: torch.Tensor | None,
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


def conv_outputs(ds: torch.Tensor) -> torch.Tensor:
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


def _conv_rule(kind: str, label: str, module_type: type[nn.Module]) -> LayerRule:
    return add_rule(LayerRule(kind, label, lambda m: isinstance(m, module_type),
                              lambda m: (m.weight[0].numel(), m.out_channels), lambda w: w.reshape(w.shape[0], -1),
                              conv_inputs, conv_outputs, groups=lambda m: m.groups))


CONV1D = _conv_rule("conv1d", "nn.Conv1d", nn.Conv1d)
CONV2D = _conv_rule("conv2d", "nn.Conv2d", nn.Conv2d)
CONV3D = _conv_rule("conv3d", "nn.Conv3d", nn.Conv3d)
