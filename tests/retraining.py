"""Runs recorded with a torch optimizer for the momentum and Adam tests: a tiny scheduled run, and a digits
run whose scores are compared with retraining it with single records removed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dvemb
from dvemb.studies.data import load_digits_split
from dvemb.evaluate.metrics import spearman

MakeOptimizer = Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer]


def tiny_recorded_run(path, make_optimizer: MakeOptimizer, lr: Callable[[int], float], *, steps: int,
                      batch: int = 5, d: int = 10, **recorder_kwargs) -> nn.Module:
    """A small float64 tanh MLP trained by the optimizer, its lr set by ``lr(step)``, under a Recorder reading it
    (with the paper's curvature, H = sum_i w_i g_i g_i^T, unless ``recorder_kwargs`` say otherwise)."""
    recorder_kwargs = {"curvature": "gradient_outer", "projection": "gaussian", **recorder_kwargs}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x, y = torch.randn(steps * batch, d, dtype=torch.float64), torch.randint(0, 4, (steps * batch,))
    opt = make_optimizer(model.parameters())
    with dvemb.Recorder(model, path, dtype=torch.float64, optimizer=opt, **recorder_kwargs) as rec:
        for t in range(steps):
            opt.param_groups[0]["lr"] = lr(t)
            ids = list(range(t * batch, (t + 1) * batch))
            with rec.step(ids):
                F.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step()
            opt.zero_grad()
    return model


def digits_run(seed: int = 0, n_train: int = 256, batch: int = 16, epochs: int = 2):
    """(x, y, x_val, y_val, batches) of a small float64 digits run."""
    x, y, xv, yv = load_digits_split(seed=seed)
    x, y = x[:n_train].double(), y[:n_train]
    g = torch.Generator().manual_seed(seed)
    batches = [b.tolist() for _ in range(epochs) for b in torch.randperm(n_train, generator=g).split(batch)]
    return x, y, xv[:200].double(), yv[:200], batches


def train(x, y, batches, make_optimizer: MakeOptimizer, removed: tuple[int, int] | None = None,
          record: Callable[[nn.Module, torch.optim.Optimizer], dvemb.Recorder] | None = None,
          warm: int = 0) -> nn.Module:
    """The run (recorded with ``record`` from step ``warm`` on), or the same run with record (step, sample) removed."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    opt = make_optimizer(model.parameters())
    recorder = None
    for t, ids in enumerate(batches):
        if record is not None and t == warm:
            recorder = record(model, opt)
        w = torch.full((len(ids),), 1.0 / len(ids), dtype=torch.float64)
        if removed is not None and removed[0] == t:
            w[ids.index(removed[1])] = 0.0  # weight 0 at that step only; the divisor stays B
        if recorder is None:
            (w * F.cross_entropy(model(x[ids]), y[ids], reduction="none")).sum().backward()
        else:
            with recorder.step(ids):
                F.cross_entropy(model(x[ids]), y[ids]).backward()
        opt.step()
        opt.zero_grad()
    if recorder is not None:
        recorder.close()
    return model


@dataclass(frozen=True)
class Agreement:
    """Spearman and least-squares scale (truth ~ scale * estimate) of the estimates, and of the
    same store read with the update rule ``ignored`` (a manifest edit)."""

    spearman: float
    scale: float
    ignored_spearman: float
    ignored_scale: float


def against_retraining(path: Path, make_optimizer: MakeOptimizer, ignored: dict, records: int = 30, warm: int = 0,
                       **recorder_kwargs) -> Agreement:
    """Record the digits run at ``path`` (from step ``warm`` on), score its last 10 steps' records and retrain
    without each."""
    x, y, xv, yv, batches = digits_run()
    model = train(x, y, batches, make_optimizer,
                  record=lambda m, o: dvemb.Recorder(m, path, optimizer=o, dtype=torch.float64, **recorder_kwargs),
                  warm=warm)
    loss = lambda m: float(F.cross_entropy(m(xv), yv).detach())  # noqa: E731
    closure = lambda: F.cross_entropy(model(xv), yv, reduction="none")  # noqa: E731
    inf = dvemb.influence(path, model, closure)
    chosen = np.random.default_rng(0).choice(np.flatnonzero(inf.steps >= len(batches) - warm - 10), records,
                                             replace=False)
    base = loss(model)
    truth = np.array([loss(train(x, y, batches, make_optimizer, (warm + int(inf.steps[r]), int(inf.sample_ids[r]))))
                      - base for r in chosen])
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, **ignored}))
    dvemb.compute_embeddings(path, show_progress=False)
    naive = dvemb.influence(path, model, closure)
    estimate, other = inf.scores.mean(axis=0)[chosen], naive.scores.mean(axis=0)[chosen]
    scale = lambda e: float(e @ truth / (e @ e))  # noqa: E731
    return Agreement(spearman(estimate, truth), scale(estimate), spearman(other, truth), scale(other))
