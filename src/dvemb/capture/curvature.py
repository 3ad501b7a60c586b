"""Curvature captured beside the gradients: the Hessian term H_t of the recursion.

``gradient_outer`` (the paper's): H_t ~ sum_i w_ti g_ti g_ti^T with the true labels.
``fisher``: the true Fisher, H_t ~ sum_i w_ti E_{y~p(.|x_i)} g_ti(y) g_ti(y)^T, estimated with
    ``curvature_samples`` labels drawn from the model (one extra pass each).
``ggn``: the Gauss-Newton matrix of softmax cross-entropy, J^T (diag(p) - p p^T) J: for one
    prediction per sample exactly in C - 1 passes (the sequential factors of diag(p) - p p^T, most
    likely class first), or with ``curvature_samples=k`` in k passes: its k - 1 leading factors exactly
    and, in the last pass, the other factors summed with random signs (an unbiased estimate whose
    largest directions carry no noise); for sequences the leading rank-k part per token (k passes;
    1 with ``curvature_samples=None``), summed over tokens with random signs.

Each pass is a *pseudo-loss* whose per-sample gradients are the rows c_is with
H_t ~ sum_i w_ti sum_s c_is c_is^T. Its gradient wrt the logits has a closed form
(``logit_gradients``), with each token weighted as the training loss weights it (read off the
loss's gradient wrt the logits when the backward pass reaches them), and one vectorised
backward from the logits to the tracked layers' outputs serves all passes at once (see ghost.py).
For sequences (one prediction per token) each token has its own low-rank output factors; the
passes sum them over a sample's tokens with random signs, an unbiased estimate of its GGN.
"""

from __future__ import annotations

import functools
from typing import Literal

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


def token_weights(probs: torch.Tensor, loss_grad: torch.Tensor) -> torch.Tensor:
    """Each token's weight in the batch loss [B, T], read off the loss's gradient wrt the logits.

    Softmax cross-entropy with weight gamma >= 0 on a token has gradient gamma (p - e_y): positive
    exactly on the other classes c (those with p_c > 0), where it is gamma p_c, so gamma is the sum of
    the positive entries over the sum of those classes' probabilities (1 - p_y, summed without
    cancellation). Tokens the loss ignores (padding, a causal LM's last position) have a zero gradient
    and get weight 0, as does a token the model predicts with certainty (it has no curvature). A NaN
    or infinity in a token's ``probs`` or ``loss_grad`` gives it a non-finite weight.
    """
    positive = loss_grad > 0
    return loss_grad.relu().sum(-1).div_((probs * positive).sum(-1).clamp_(min=torch.finfo(probs.dtype).tiny))


def logit_gradients(logits: torch.Tensor, loss_grad: torch.Tensor, curvature: Curvature, samples: int | None,
                    generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """The gradients wrt the logits [passes, *logits.shape] of the pseudo-losses whose per-sample
    parameter gradients are the curvature rows, times ``scale`` sqrt(w_i) (w_i: the sample's weight in the
    batch loss; ``scale`` undoes a batch-wide weight, as the gradients' scale does).

    ``logits`` are [B, C] or [B, T, C]; ``loss_grad`` is the training loss's gradient wrt them, which
    gives each token's weight (:func:`token_weights`): the curvature is that of the loss as trained,
    with its masking and normalisation. With several tokens per sample, each token gets its own
    low-rank factors and the passes sum them over the sample's tokens with independent random signs,
    so that the cross-token terms vanish in expectation (an unbiased estimate of the sample's GGN).
    """
    flat = logits.detach().reshape(logits.shape[0], -1, logits.shape[-1])
    probs = torch.softmax(flat, dim=-1, dtype=torch.float32 if flat.dtype in (torch.float16, torch.bfloat16) else None)
    loss_grad = loss_grad.detach().reshape(flat.shape).to(probs.dtype)
    # a non-finite token's step is refused later: its weight is non-finite, which marks its rows (no `if not
    # finite.all()`: reading that flag would wait for the device at every step); where its probabilities are
    # sampled or factored by eigh they are made uniform, so that these stay defined
    weights = token_weights(probs, loss_grad).mul_(scale * scale).sqrt_()  # [B, T]
    if curvature == "fisher":
        probs = probs.nan_to_num(1.0 / probs.shape[-1])
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
    """Vectors v_j [passes, N, C] with sum_j v_j v_j^T ~ diag(p) - p p^T for each row p of ``probs``.

    ``diag(p) - p p^T`` has rank <= C - 1 (its rows sum to 0): its C - 1 sequential factors
    (:func:`_sequential_factors`) give it exactly in C - 1 passes. With ``samples=k`` < C - 1, k passes:
    given a ``generator``, the k - 1 leading factors and a random-sign sum of the others (unbiased);
    without one, the best rank-k part by Rayleigh-Ritz (``_ritz_factors``).
    """
    n_classes = probs.shape[-1]
    if samples is not None and samples < n_classes - 1:
        if generator is not None:
            return _sequential_factors(probs, samples - 1, generator)
        return _ritz_factors(probs.nan_to_num(1.0 / n_classes), samples)
    return _sequential_factors(probs, n_classes - 1, None)


def _sequential_factors(probs: torch.Tensor, leading: int, generator: torch.Generator | None) -> torch.Tensor:
    """The ``leading`` first factors of diag(p) - p p^T = sum_j f_j f_j^T [leading, N, C], followed, given a
    ``generator``, by the sum of all the others with independent random signs r_j (one more pass: since
    E[r_i r_j] = 0 for i != j, the passes' sum of outer products is unbiased).

    f_j comes from drawing the class one at a time, most likely first: with the classes sorted by
    probability and s_j the probability left at class j (s_j = p_j + p_{j+1} + ...), step j decides
    "class j or a later one", a Bernoulli(p_j / s_j) reached with probability s_j; the one-hot
    label's covariance diag(p) - p p^T is the sum of these steps' (uncorrelated) covariances,
        f_j = sqrt(p_j s_{j+1} / s_j) (e_j - p_{>j} / s_{j+1}),
    i.e. its Cholesky factor with the classes pivoted by probability. The first factors carry most of
    the trace (the largest probabilities), like the leading eigenvectors, at O(C) cost per factor.
    """
    ps, order = probs.sort(dim=-1, descending=True)
    left = ps.flip(-1).cumsum(-1).flip(-1)  # s_j, summed from the smallest: no cancellation
    after = F.pad(left[:, 1:], (0, 1))  # s_{j+1}
    tiny = torch.finfo(ps.dtype).tiny
    size = (ps * after).div_(left.clamp(min=tiny)).sqrt_()
    share = size / after.clamp(min=tiny)  # sqrt(p_j s_{j+1} / s_j) / s_{j+1}; 0 where s_{j+1} = 0 (then size = 0)
    # pass k is sum_j R_kj f_j, R_kj = (k == j) for the leading ones, r_j (+-1) for the others in the last pass:
    # entry c of it is R_kc size_c - p_c sum_{j<c} R_kj share_j
    base, signed = _layout(leading, ps.shape[-1], generator is not None, ps.dtype, ps.device)
    mix = base if generator is None else torch.addcmul(base, torch.randint(  # R = base + 2 b on the signed entries
        0, 2, ps.shape, generator=generator, device=ps.device, dtype=ps.dtype)[:, None, :], signed)
    weight = mix * share[:, None, :]
    passes = torch.addcmul(mix * size[:, None, :], ps[:, None, :], weight.cumsum(-1) - weight, value=-1)
    return torch.empty_like(passes).scatter_(2, order[:, None, :].expand_as(passes), passes).transpose(0, 1)


@functools.lru_cache(maxsize=64)
def _layout(leading: int, n_classes: int, signs: bool, dtype: torch.dtype, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The passes' mixing of the sorted classes' factors, R = base + 2 b * signed with b in {0, 1}: for the
    ``leading`` factors base[k, j] = (k == j); with ``signs`` one more pass, base = -1 and signed = 2 on the
    others (r_j = 2 b_j - 1)."""
    base = torch.eye(leading + signs, n_classes, dtype=dtype, device=device)
    signed = torch.zeros_like(base)
    if signs:
        base[leading, leading:] = -1.0
        signed[leading, leading:] = 2.0
    return base, signed


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
