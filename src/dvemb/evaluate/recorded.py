"""Running a TrainingSpec under the Recorder, so estimates and ground truth share one trajectory."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..capture.recorder import Recorder
from ..progress import ProgressBar
from ..update import make_optimizer
from .replay import TrainingSpec


def record_run(spec: TrainingSpec, path: str | os.PathLike, *, show_progress: bool = False,
               **recorder_kwargs: object) -> nn.Module:
    """Train ``spec`` under a Recorder writing to ``path``; return the final model.

    The run is the same as :func:`dvemb.evaluate.train` replays: same initial model,
    batches, weights and learning rates, and ``spec.update``'s optimizer (a torch optimizer,
    handed to the Recorder, unless the rule is plain SGD). Extra keyword arguments go to
    the Recorder (``projection_dim``, ``dtype``, ``modules``, ...; ``optimizer=None`` records
    the run as if it were plain SGD, to measure what ignoring the optimizer costs).
    """
    model = spec.build_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = None if spec.update.plain else make_optimizer(spec.update, params, spec.lr(0))
    with Recorder(model, path, reduction=spec.reduction, **{"optimizer": opt, **recorder_kwargs}) as rec:  # type: ignore[arg-type]
        for t in ProgressBar(range(spec.num_steps), desc="record", unit="step", disable=not show_progress):
            x, y = spec.step_data(t)
            lr = spec.lr(t)
            with rec.step(spec.batch(t), lr=lr):
                losses = spec.loss(model(x), y)
                (losses.mean() if spec.reduction == "mean" else losses.sum()).backward()
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.step()
                opt.zero_grad(set_to_none=True)
                continue
            with torch.no_grad():
                for p in params:
                    p -= lr * p.grad
                    p.grad = None
    return model
