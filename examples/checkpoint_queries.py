"""Influence on intermediate checkpoints (Algorithm 2): how the first epoch's records matter later.

The Recorder saves the model at each epoch boundary (``save_checkpoints``); ``compute_embeddings``
cuts the run at the same steps (``checkpoints=``), computes the segments independently and
composes them. For each checkpoint l the model is loaded as it was then (``load_checkpoint``) and
``influence(..., checkpoint=l)`` scores the records used before it, by their effect on that
checkpoint's test loss.

    python examples/checkpoint_queries.py          # 4 epochs on 1000 digits, 2 worker processes
    python examples/checkpoint_queries.py --tiny   # a few seconds
    python examples/checkpoint_queries.py --out runs/checkpoints

Needs scikit-learn (pip install "dvemb[demo]"). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import dvemb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds on a CPU")
    parser.add_argument("--out", metavar="DIR", default=None, help="where to keep the store (default: a temp folder)")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_digits()
    x = torch.from_numpy(data.data.astype(np.float32) / 16.0)
    y = torch.from_numpy(data.target.astype(np.int64))
    n_train, epochs, batch_size, workers = (128, 3, 32, 1) if args.tiny else (1000, 4, 32, 2)
    x_test, y_test = x[-50:], y[-50:]
    steps_per_epoch = -(-n_train // batch_size)
    epoch_starts = [e * steps_per_epoch for e in range(1, epochs)]  # theta before each later epoch

    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(args.out or tmp) / "store"
        with dvemb.Recorder(model, store, optimizer=opt, save_checkpoints=epoch_starts) as rec:  # + theta_T on close
            for epoch in range(epochs):
                for ids in torch.randperm(n_train).split(batch_size):
                    with rec.step(ids):
                        F.cross_entropy(model(x[ids]), y[ids]).backward()
                    opt.step()
                    opt.zero_grad()
        print("saved model checkpoints at steps", dvemb.saved_checkpoints(store))

        dvemb.compute_embeddings(store, checkpoints=epoch_starts, workers=workers, show_progress=False)
        steps = dvemb.checkpoint_steps(store)  # the segment ends: the epoch starts, then T
        print("checkpoints available to influence(checkpoint=l):", steps)

        def test_losses() -> torch.Tensor:  # per test point; summed below: the test set's total loss
            return F.cross_entropy(model(x_test), y_test, reduction="none")

        for l, step in enumerate(steps):
            dvemb.load_checkpoint(store, model, step)  # theta_step, in place
            inf = dvemb.influence(store, model, test_losses, checkpoint=l)
            first_epoch = inf.steps < steps_per_epoch
            total = inf.scores.sum(0)  # each record's effect on the summed test loss
            best = int(total.argmax())
            print(f"checkpoint {l} (step {step}): {inf.scores.shape[1]} records scored; first epoch's records: "
                  f"mean |score| {np.abs(total[first_epoch]).mean():.2e}; most helpful record: "
                  f"step {inf.steps[best]}, sample {inf.sample_ids[best]}")


if __name__ == "__main__":
    main()
