"""Independent reference computations for the tests (torch.func, explicit products)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from dvemb.capture.layers import rule_for
from dvemb.embed.layout import embedding_info, final_arrays
from dvemb.store import LayerSpec, Store


def final_embeddings(path) -> np.ndarray:
    """A store's computed embeddings relative to its last step, its layers' columns side by side [records, dims]."""
    store = Store(path)
    precision = embedding_info(store)["precision"]
    return np.concatenate([np.array(a.read(store.n_records)) for a in final_arrays(store, precision)], 1)


def per_sample_gradients(
    model: nn.Module, own_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor, y: torch.Tensor, names: list[str],
) -> dict[str, torch.Tensor]:
    """Each sample's gradient of its own loss, per named layer, as [B, d_out, d_in (+1 bias)]."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return own_loss(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        rule = rule_for(modules[name])
        gw = vmap(rule.as_matrix)(per[f"{name}.weight"])
        if f"{name}.bias" in per:
            gw = torch.cat([gw, per[f"{name}.bias"].unsqueeze(-1)], dim=-1)
        out[name] = gw
    return out


def project(spec: LayerSpec, g: torch.Tensor) -> torch.Tensor:
    """P_out G P_in^T for each sample, flattened to [B, k_out * k_in]."""
    p_in = spec.proj_in.matrix(g.dtype)
    p_out = spec.proj_out.matrix(g.dtype)
    return (p_out @ g @ p_in.t()).reshape(g.shape[0], -1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frobenius-norm relative error of a against the reference b."""
    return ((a - b).norm() / b.norm()).item()
