"""Curvature captured beside the gradients: the Hessian term H_t of the recursion.

``gradient_outer`` (the paper's): H_t ~ sum_i w_ti g_ti g_ti^T with the true labels.
``fisher``: the true Fisher, H_t ~ sum_i w_ti E_{y~p(.|x_i)} g_ti(y) g_ti(y)^T, estimated with
    ``curvature_samples`` labels drawn from the model (one extra backward each).
``ggn``: the Gauss-Newton matrix of softmax cross-entropy for classification,
    J^T (diag(p) - p p^T) J = sum_c p_c g(c) g(c)^T: one backward per class, or with
    ``curvature_samples=k`` < C the k most likely classes of each sample (k backwards).

Each extra backward uses a *pseudo-loss* sum_i m_i * own_loss_i(labels) whose per-sample
gradients are the rows c_is with H_t ~ sum_i w_ti sum_s c_is c_is^T.
"""

from __future__ import annotations

from typing import Iterator, Literal

import torch
import torch.nn.functional as F

Curvature = Literal["gradient_outer", "fisher", "ggn"]
CURVATURES = ("gradient_outer", "fisher", "ggn")


def logits_of(output: object) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, ``.logits``, or the first element."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}; "
                    "curvature='fisher'/'ggn' needs the model to return logits")


def pseudo_losses(logits: torch.Tensor, curvature: Curvature, samples: int | None, reduction: str,
                  generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Yield the pseudo-losses whose per-sample gradients are the curvature rows.

    ``logits`` are [B, C] or [B, T, C]; a sample's own loss is its token mean under
    ``reduction="mean"`` and its token sum under ``"sum"``, as for the gradients.
    """
    flat = logits.reshape(logits.shape[0], -1, logits.shape[-1])
    detached = flat.detach()
    probs = torch.softmax(detached.float() if detached.dtype in (torch.float16, torch.bfloat16) else detached, dim=-1)
    if curvature == "fisher":
        samples = samples or 1
        for _ in range(samples):
            labels = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
            yield _own_losses(flat, labels.reshape(probs.shape[:-1]), None, reduction) / samples ** 0.5
    elif curvature == "ggn":
        if flat.shape[1] != 1:
            raise ValueError("curvature='ggn' is exact only for one prediction per sample; use 'fisher' for sequences")
        n_classes = flat.shape[-1]
        k = n_classes if samples is None else min(samples, n_classes)
        top_p, top_c = probs.topk(k, dim=-1)  # all classes in order, or each sample's k most likely
        for j in range(k):
            yield _own_losses(flat, top_c[..., j], top_p[..., j].sqrt(), reduction)
    else:
        raise ValueError(f"curvature {curvature!r} needs no extra pass")


def _own_losses(flat: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """sum_i scale_i * own_loss_i(labels) over the batch."""
    per_token = F.cross_entropy(flat.transpose(1, 2), labels, reduction="none")  # [B, T]
    if scale is not None:
        per_token = per_token * scale.to(per_token.dtype)
    own = per_token.mean(1) if reduction == "mean" else per_token.sum(1)
    return own.sum()
