"""Loss scaling (``torch.amp.GradScaler``): unscaling the captured rows and dropping the steps it skips.

``scaler.scale(loss).backward()`` multiplies every gradient the hooks see by the scale S in use.
The gradient rows are linear in the output gradients, so dividing them by S gives the sample's own
gradient. The curvature rows (curvature="fisher"/"ggn") come from a nested backward from the logits
whose pseudo-loss weights are sqrt(w_token) read off the loss's gradient at the logits: that gradient
carries S, so the curvature rows carry sqrt(S) and are divided by sqrt(S).

The scale is read when the step's backward is over (``commit_step``), before ``scaler.step`` and
``scaler.update`` change it: as a device tensor (no host synchronisation) when the scaler exposes one.

A step whose gradients hold inf/NaN is skipped by the scaler: ``scaler.step`` does not call
``optimizer.step()``. The Recorder therefore holds a committed step until the optimizer's step
pre-hook fires (the parameters did change: the step is written) and drops it when the next step
begins, or the Recorder closes, without it (the step never happened).
"""

from __future__ import annotations

import torch


def scaler_enabled(scaler: object) -> bool:
    """Whether ``scaler`` scales the loss (a disabled GradScaler multiplies by 1)."""
    enabled = getattr(scaler, "is_enabled", None)
    return bool(enabled()) if callable(enabled) else True


def current_scale(scaler: object) -> torch.Tensor | float:
    """The scale the step's backward used: a copy of the scaler's scale tensor (no host sync), else a float.

    ``GradScaler._get_scale_async`` returns its scale tensor (None before the first ``scale()``); a scaler
    without it is read through the public ``get_scale()`` (one host synchronisation).
    """
    if not scaler_enabled(scaler):
        return 1.0
    tensor = getattr(scaler, "_get_scale_async", lambda: None)()
    if isinstance(tensor, torch.Tensor):
        return tensor.detach().clone()  # scaler.update() changes the scale in place after this step
    return float(scaler.get_scale())


def unscale(rows: list[torch.Tensor], scale: torch.Tensor | float, power: float = 1.0) -> list[torch.Tensor]:
    """``rows / scale ** power`` computed on the rows' device (a scale tensor is moved, not read)."""
    if isinstance(scale, float):
        if scale == 1.0:
            return rows
        inverse = scale ** -power
        return [r * inverse for r in rows]
    out = []
    for r in rows:
        inverse = scale.to(device=r.device, dtype=torch.float64).pow(-power).to(r.dtype)
        out.append(r * inverse)
    return out
