"""Curvature captured beside the gradients: the Hessian term H_t of the recursion.

``gradient_outer`` (the paper's): H_t ~ sum_i w_ti g_ti g_ti^T with the true labels.
``fisher``: the true Fisher, H_t ~ sum_i w_ti E_{y~p(.|x_i)} g_ti(y) g_ti(y)^T, estimated with
    ``curvature_samples`` labels drawn from the model (one extra pass each).
``ggn``: the Gauss-Newton matrix of softmax cross-entropy, J^T (diag(p) - p p^T) J: for one
    prediction per sample exactly in C - 1 passes (eigenvectors of diag(p) - p p^T), or with
    ``curvature_samples=k`` in k passes: its k - 1 leading factors exactly and, in the last pass,
    the other factors summed with random signs (an unbiased estimate whose largest directions carry
    no noise; beyond EIGEN_MAX_CLASSES classes the leading rank-k part); for sequences the leading
    rank-k part per token (k passes, 1 by default), summed over tokens with random signs.

Each pass is a *pseudo-loss* whose per-sample gradients are the rows c_is with
H_t ~ sum_i w_ti sum_s c_is c_is^T. Its gradient wrt the logits has a closed form
(``logit_gradients``), with each token weighted as the training loss weights it (read off the
loss's gradient wrt the logits when the backward pass reaches them), and one vectorised
backward from the logits to the tracked layers' outputs serves all passes at once (see ghost.py).
For sequences (one prediction per token) each token has its own low-rank output factors; the
passes sum them over a sample's tokens with random signs, an unbiased estimate of its GGN.
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


def token_weights(probs: torch.Tensor, loss_grad: torch.Tensor) -> torch.Tensor:
    """Each token's weight in the batch loss [B, T], read off the loss's gradient wrt the logits.

    Softmax cross-entropy with weight gamma on a token has gradient gamma (p - e_y): its entries sum
    to 0, y is the most negative one and sum |gradient| = 2 gamma (1 - p_y). Tokens the loss ignores
    (padding, a causal LM's last position) have a zero gradient and get weight 0; a token the model
    predicts with certainty (1 - p_y ~ 0) has no curvature either.
    """
    y = loss_grad.argmin(dim=-1, keepdim=True)
    missing = (1.0 - probs.gather(-1, y)).squeeze(-1)
    total = loss_grad.abs().sum(-1)
    return torch.where(missing > 1e-12, total / (2.0 * missing.clamp(min=1e-12)), torch.zeros_like(total))


def logit_gradients(logits: torch.Tensor, loss_grad: torch.Tensor, curvature: Curvature, samples: int | None,
                    generator: torch.Generator) -> torch.Tensor:
    """The gradients wrt the logits [passes, *logits.shape] of the pseudo-losses whose per-sample
    parameter gradients are the curvature rows (times sqrt(w_i), the sample's weight in the batch loss).

    ``logits`` are [B, C] or [B, T, C]; ``loss_grad`` is the training loss's gradient wrt them, which
    gives each token's weight (:func:`token_weights`): the curvature is that of the loss as trained,
    with its masking and normalisation. With several tokens per sample, each token gets its own
    low-rank factors and the passes sum them over the sample's tokens with independent random signs,
    so that the cross-token terms vanish in expectation (an unbiased estimate of the sample's GGN).
    """
    flat = logits.detach().reshape(logits.shape[0], -1, logits.shape[-1])
    probs = torch.softmax(flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat, dim=-1)
    loss_grad = loss_grad.detach().reshape(flat.shape).to(probs.dtype)
    finite = torch.isfinite(probs).all(-1) & torch.isfinite(loss_grad).all(-1)  # [B, T]
    # a non-finite token's step is refused later: keep the factorisations well defined, mark the rows (always
    # computed, not behind `if not finite.all()`: reading that flag would wait for the device at every step)
    probs = torch.where(finite[..., None], probs, 1.0 / probs.shape[-1])
    loss_grad = torch.where(finite[..., None], loss_grad, 0.0)
    weights = token_weights(probs, loss_grad).sqrt().masked_fill(~finite, float("nan"))  # [B, T]
    if curvature == "fisher":
        samples = samples or 1
        labels = torch.multinomial(probs.reshape(-1, probs.shape[-1]), samples, replacement=True, generator=generator)
        labels = labels.t().reshape(samples, *probs.shape[:-1])  # pass s: one sampled label per token
        vectors = (probs - F.one_hot(labels, probs.shape[-1]).to(probs.dtype)) / samples ** 0.5
    elif curvature == "ggn":
        if flat.shape[-1] < 2:
            raise ValueError("curvature='ggn' is for softmax cross-entropy over >= 2 classes; the model returns 1 logit")
        tokens = flat.shape[1]
        factors = _ggn_factors(probs.reshape(-1, probs.shape[-1]), samples or (None if tokens == 1 else 1),
                               generator if tokens == 1 else None)
        vectors = factors.reshape(factors.shape[0], *probs.shape)
        if tokens > 1:
            signs = torch.randint(0, 2, vectors.shape[:3], generator=generator, device=generator.device)
            vectors = vectors * (2 * signs - 1).to(vectors.dtype)[..., None]
    else:
        raise ValueError(f"curvature {curvature!r} needs no extra pass")
    return (vectors * weights[..., None]).to(logits.dtype).reshape(vectors.shape[0], *logits.shape)


def _ggn_factors(probs: torch.Tensor, samples: int | None, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Vectors v_j [passes, B, C] with sum_j v_j v_j^T ~ diag(p) - p p^T per sample.

    ``diag(p) - p p^T`` has rank <= C - 1 (its rows sum to 0): its eigenvectors scaled by
    sqrt(eigenvalue) give it exactly in C - 1 passes (beyond ``EIGEN_MAX_CLASSES`` classes the
    identity sum_c p_c (p - e_c)(p - e_c)^T is used instead, C passes). With ``samples=k`` < C - 1,
    k passes: given a ``generator``, the k - 1 leading factors and a random-sign sum of the others
    (``_split_factors``: unbiased); without one, or beyond ``EIGEN_MAX_CLASSES`` classes, the best
    rank-k part by Rayleigh-Ritz (``_ritz_factors``).
    """
    n_classes = probs.shape[-1]
    if samples is not None and samples < n_classes - 1:
        if generator is not None and n_classes <= EIGEN_MAX_CLASSES:
            return _split_factors(probs, samples, generator)
        return _ritz_factors(probs, samples)
    if n_classes > EIGEN_MAX_CLASSES:
        onehots = F.one_hot(torch.arange(n_classes, device=probs.device), n_classes).to(probs.dtype)
        return (probs - onehots[:, None, :]) * probs.t()[..., None].sqrt()
    return _eigen_factors(probs)[:, :, 1:].permute(2, 0, 1).flip(0)  # the C - 1 nonzero ones, largest first


def _eigen_factors(probs: torch.Tensor) -> torch.Tensor:
    """All C factors of diag(p) - p p^T as columns [B, C, C], eigenvalues ascending (the first is 0)."""
    lam = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    values, vecs = torch.linalg.eigh(lam)  # ascending, in the logits' precision (at least float32)
    return vecs * values.clamp(min=0).sqrt()[:, None, :]


def _split_factors(probs: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k passes [k, B, C]: the k - 1 leading factors of diag(p) - p p^T, then the others summed with
    independent random signs r_j, so that E[sum_s v_s v_s^T] = diag(p) - p p^T (the cross terms
    r_i r_j f_i f_j^T average out) while the largest directions carry no sampling noise."""
    factors = _eigen_factors(probs)
    split = factors.shape[-1] - (k - 1)
    signs = torch.randint(0, 2, (probs.shape[0], split), generator=generator, device=generator.device)
    rest = (factors[:, :, :split] * (2 * signs - 1).to(factors.dtype)[:, None, :]).sum(-1)
    return torch.cat([factors[:, :, split:].permute(2, 0, 1).flip(0), rest[None]], 0)


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
