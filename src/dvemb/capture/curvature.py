"""Curvature captured beside the gradients: the Hessian term H_t of the recursion.

``gradient_outer`` (the paper's): H_t ~ sum_i w_ti g_ti g_ti^T with the true labels.
``fisher``: the true Fisher, H_t ~ sum_i w_ti E_{y~p(.|x_i)} g_ti(y) g_ti(y)^T, estimated with
    ``curvature_samples`` labels drawn from the model (one extra pass each).
``ggn``: the Gauss-Newton matrix of softmax cross-entropy for classification,
    J^T (diag(p) - p p^T) J, exactly in C - 1 passes (eigenvectors of diag(p) - p p^T), or
    with ``curvature_samples=k`` its leading rank-k part per sample (k passes).

Each pass is a *pseudo-loss* sum_i m_i * own_loss_i(labels) whose per-sample gradients are
the rows c_is with H_t ~ sum_i w_ti sum_s c_is c_is^T. Its gradient wrt the logits has a
closed form (``logit_gradients``), and one vectorised backward from the logits to the
tracked layers' outputs serves all passes at once (see ghost.py).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Curvature = Literal["gradient_outer", "fisher", "ggn"]
CURVATURES = ("gradient_outer", "fisher", "ggn")
EIGEN_MAX_CLASSES = 256  # exact ggn factors by eigendecomposition up to this many classes


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


def logit_gradients(logits: torch.Tensor, curvature: Curvature, samples: int | None, reduction: str,
                    generator: torch.Generator) -> torch.Tensor:
    """The gradients wrt the logits [passes, *logits.shape] of the pseudo-losses whose per-sample
    parameter gradients are the curvature rows.

    ``logits`` are [B, C] or [B, T, C]; a sample's own loss is its token mean under
    ``reduction="mean"`` and its token sum under ``"sum"``, as for the gradients. The gradient of
    cross-entropy with label c wrt the logits is softmax - e_c, so no backward is needed here.
    """
    flat = logits.detach().reshape(logits.shape[0], -1, logits.shape[-1])
    probs = torch.softmax(flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat, dim=-1)
    per_token = 1.0 / flat.shape[1] if reduction == "mean" else 1.0
    if curvature == "fisher":
        samples = samples or 1
        labels = torch.multinomial(probs.reshape(-1, probs.shape[-1]), samples, replacement=True, generator=generator)
        labels = labels.t().reshape(samples, *probs.shape[:-1])  # pass s: one sampled label per token
        vectors = (probs - F.one_hot(labels, probs.shape[-1]).to(probs.dtype)) * (per_token / samples ** 0.5)
    elif curvature == "ggn":
        if flat.shape[1] != 1:
            raise ValueError("curvature='ggn' is exact only for one prediction per sample; use 'fisher' for sequences")
        if flat.shape[-1] < 2:
            raise ValueError("curvature='ggn' is for softmax cross-entropy over >= 2 classes; the model returns 1 logit")
        vectors = _ggn_factors(probs[:, 0], samples)[:, :, None]  # [passes, B, 1, C]
    else:
        raise ValueError(f"curvature {curvature!r} needs no extra pass")
    return vectors.to(logits.dtype).reshape(vectors.shape[0], *logits.shape)


def _ggn_factors(probs: torch.Tensor, samples: int | None) -> torch.Tensor:
    """Vectors v_j [passes, B, C] with sum_j v_j v_j^T ~ diag(p) - p p^T per sample.

    ``diag(p) - p p^T`` has rank <= C - 1 (its rows sum to 0): its eigenvectors scaled by
    sqrt(eigenvalue) give it exactly in C - 1 passes (beyond ``EIGEN_MAX_CLASSES`` classes the
    identity sum_c p_c (p - e_c)(p - e_c)^T is used instead, C passes). With ``samples=k`` the
    k passes approximate its best rank-k part: exactly when k >= C - 1, else by Rayleigh-Ritz
    (see ``_ritz_factors``).
    """
    n_classes = probs.shape[-1]
    if samples is not None and samples < n_classes - 1:
        return _ritz_factors(probs, samples)
    if n_classes > EIGEN_MAX_CLASSES:
        onehots = F.one_hot(torch.arange(n_classes, device=probs.device), n_classes).to(probs.dtype)
        return (probs - onehots[:, None, :]) * probs.t()[..., None].sqrt()
    k = n_classes - 1
    lam = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    values, vecs = torch.linalg.eigh(lam)  # ascending, in the logits' precision (at least float32)
    top = vecs[:, :, -k:] * values[:, None, -k:].clamp(min=0).sqrt()
    return top.permute(2, 0, 1).flip(0)  # largest first


def _ritz_factors(probs: torch.Tensor, k: int) -> torch.Tensor:
    """The k leading Ritz pairs of diag(p) - p p^T on span{e_c of the k most likely classes, r}.

    r is the other classes' probabilities, normalised. The subspace holds p, and is invariant
    when those probabilities are equal, so the pairs are then exact eigenpairs; in general the
    error is the spread of the unlikely classes' probabilities. It needs one eigendecomposition
    of a (k+1) x (k+1) matrix per sample instead of C x C (4x4 instead of 10x10: ~4x cheaper).
    """
    top_p, top_c = probs.topk(k, dim=-1)  # [B, k]
    rest = probs.scatter(1, top_c, 0.0)
    norm = rest.norm(dim=1, keepdim=True)
    safe = norm.clamp(min=torch.finfo(probs.dtype).tiny)
    # in this basis diag(p) is diagonal (disjoint supports) and p has coordinates (p_top, |rest|)
    diagonal = torch.cat([top_p, (rest ** 3).sum(1, keepdim=True) / safe ** 2], 1)
    coords = torch.cat([top_p, norm], 1)
    small = torch.diag_embed(diagonal) - coords[:, :, None] * coords[:, None, :]
    values, vecs = torch.linalg.eigh(small)  # ascending
    basis = torch.cat([F.one_hot(top_c, probs.shape[-1]).to(probs.dtype), (rest / safe)[:, None, :]], 1)
    ritz = vecs[:, :, -k:].transpose(1, 2) @ basis  # [B, k, C], orthonormal rows
    return (ritz * values[:, -k:, None].clamp(min=0).sqrt()).transpose(0, 1).flip(0)  # largest first
