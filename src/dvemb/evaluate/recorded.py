"""Running a TrainingSpec under the Recorder, so estimates and ground truth share one trajectory."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..capture.recorder import Recorder
from ..progress import ProgressBar
from .replay import TrainingSpec


def record_run(spec: TrainingSpec, path: str | os.PathLike, *, show_progress: bool = False,
               **recorder_kwargs: object) -> nn.Module:
    """Train ``spec`` under a Recorder writing to ``path``; return the final model.

    The run is the same as :func:`dvemb.evaluate.train` replays: same initial model,
    batches, weights and learning rates, and ``spec.sgd``'s update (torch.optim.SGD, handed
    to the Recorder, when it has momentum or weight decay). Extra keyword arguments go to
    the Recorder (``projection_dim``, ``dtype``, ``modules``, ...; ``optimizer=None`` records
    the run as if it were plain SGD, to measure what ignoring momentum costs).
    """
    model = spec.build_model()
    params = [p for p in model.parameters() if p.requires_grad]
    sgd = spec.sgd
    opt = None if sgd.plain else torch.optim.SGD(params, lr=spec.lr(0), momentum=sgd.momentum,
                                                 dampening=sgd.dampening, nesterov=sgd.nesterov,
                                                 weight_decay=sgd.weight_decay, foreach=False)
    with Recorder(model, path, reduction=spec.reduction, **{"optimizer": opt, **recorder_kwargs}) as rec:
        for t in ProgressBar(range(spec.num_steps), desc="record", unit="step", disable=not show_progress):
            x, y = spec.step_data(t)
            lr = spec.lr(t)
            with rec.step(spec.batch(t), lr=lr):
                losses = spec.loss(model(x), y)
                (losses.mean() if spec.reduction == "mean" else losses.sum()).backward()
            if opt is not None:
                opt.param_groups[0]["lr"] = lr
                opt.step()
                opt.zero_grad(set_to_none=True)
                continue
            with torch.no_grad():
                for p in params:
                    p -= lr * p.grad
                    p.grad = None
    return model
