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

import numpy as np
import torch

from ..devices import to_device
from ..store import AppendableArray, Store
from .layout import embedding_plan, propagator_arrays, segment_arrays, state_blocks

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
    eye = torch.eye(propagators[0].shape[0], dtype=propagators[0].dtype, device=propagators[0].device)
    out = [eye]
    for k in reversed(propagators[1:]):
        out.append(out[-1] @ k)
    return out[::-1]


def segment_tests(store: Store, info: dict, tests: list[torch.Tensor], last: int
                  ) -> tuple[list[AppendableArray], list[tuple[int, int, list[torch.Tensor]]]]:
    """What scores the records before checkpoint ``last`` against per-layer test gradients taken there: the segment
    embedding arrays, and per segment (first row, end row, test gradients per array), the gradients carried back
    through the later segments' propagators (V_j = V_{j+1} K_{j+1}), per part of the embeddings' plan."""
    plan, precision = embedding_plan(info), info["precision"]
    boundaries, n_segments, starts = info["boundaries"], len(info["boundaries"]) - 1, store.step_starts
    arrays = segment_arrays(store, plan, precision)  # theta parts, then the buffers' parts
    stacks = [a.read(n_segments) for a in propagator_arrays(store, plan, precision)]
    blocks = state_blocks(store, plan)
    moved = [p.sign * p.coordinates(tests[p.layer]) for p in plan.parts]
    moved = moved + [torch.zeros_like(t) for t in moved] * (len(arrays) // len(moved) - 1)
    out = []
    for j in range(last, -1, -1):
        out.append((int(starts[boundaries[j]]), int(starts[boundaries[j + 1]]), moved))
        if j > 0:
            moved = _propagate(moved, blocks, [k[j] for k in stacks], moved[0].dtype)
    return arrays, out


def _propagate(tests: list[torch.Tensor], blocks: list[list[int]], propagators: list[np.ndarray],
               dtype: torch.dtype) -> list[torch.Tensor]:
    """Per-part test gradients times each block's propagator (blocks index ``tests``)."""
    out = list(tests)
    for block, k in zip(blocks, propagators):
        moved = torch.cat([tests[i] for i in block], 1) @ to_device(np.array(k), tests[block[0]].device, dtype)
        for i, part in zip(block, moved.split([tests[i].shape[1] for i in block], dim=1)):
            out[i] = part
    return out
