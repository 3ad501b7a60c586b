"""Algorithm 2 (influence checkpointing): independent time segments and their composition.

The run [0, T) is cut at boundaries 0 = b_0 < b_1 < ... < b_K = T. Segment j runs
Algorithm 1 from M = 0 over [b_j, b_{j+1}) and yields, per layer, the embeddings of its
records relative to b_{j+1} and its propagator K_j = prod_{t in segment} (I - eta_t H_t).
Relative to any later boundary b_{l+1}, a record of segment j has

    DVEmb^(t -> b_{l+1}) = K_l K_{l-1} ... K_{j+1} DVEmb^(t -> b_{j+1}),

exactly Algorithm 1's embedding up to round-off. Scores against a test gradient g at
b_{l+1} therefore use V_l = g and V_j = V_{j+1} K_{j+1}: the test gradient travels back
through the propagators, so no per-checkpoint copy of the embeddings is stored.
"""

from __future__ import annotations

from typing import Sequence

import torch

Checkpoints = int | Sequence[int] | None


def segment_boundaries(n_steps: int, checkpoints: Checkpoints) -> list[int]:
    """Boundaries [0, b_1, ..., T]: K evenly spaced segments, or the given interior steps."""
    if n_steps < 1:
        raise ValueError("the store has no committed steps")
    if checkpoints is None:
        return [0, n_steps]
    if isinstance(checkpoints, int):
        if not 1 <= checkpoints <= n_steps:
            raise ValueError(f"checkpoints={checkpoints}: need between 1 and {n_steps} segments")
        return sorted({round(j * n_steps / checkpoints) for j in range(checkpoints + 1)})
    steps = sorted({int(s) for s in checkpoints})
    if steps and (steps[0] < 0 or steps[-1] > n_steps):
        raise ValueError(f"checkpoint steps must lie in [0, {n_steps}], got {steps}")
    return sorted({0, n_steps, *steps})


def compose(propagators: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """C_j = K_{K-1} ... K_{j+1} for each segment j (C_{K-1} = I): maps segment-end embeddings to T."""
    eye = torch.eye(propagators[0].shape[0], dtype=propagators[0].dtype)
    out = [eye]
    for k in reversed(propagators[1:]):
        out.append(out[-1] @ k)
    return out[::-1]
