"""Attribute a digits classifier's test losses to training records, in a plain PyTorch loop.

Trains a small MLP with SGD on scikit-learn's bundled 8x8 digits under a ``dvemb.Recorder``
(the library's defaults: fitted projections, Gauss-Newton curvature), computes the data value
embeddings and prints, for a few test images, the training records (step, sample) whose
removal would most raise (helpful) or lower (harmful) their test loss.

    python examples/plain_loop.py            # ~1000 images, 3 epochs
    python examples/plain_loop.py --tiny     # a few seconds
    python examples/plain_loop.py --out runs/digits   # keep the store (default: a temporary folder)

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


def digits(n_train: int, n_test: int, seed: int = 0):
    """(x_train, y_train, x_test, y_test): 8x8 images as float32 [n, 64] in [0, 1], int64 labels."""
    data = load_digits()
    x = torch.from_numpy(data.data.astype(np.float32) / 16.0)
    y = torch.from_numpy(data.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = order[:n_train], order[n_train:n_train + n_test]
    return x[train], y[train], x[test], y[test]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds on a CPU")
    parser.add_argument("--out", metavar="DIR", default=None, help="where to keep the store (default: a temp folder)")
    args = parser.parse_args()
    torch.manual_seed(0)
    n_train, epochs, batch_size, lr = (192, 2, 32, 0.1) if args.tiny else (1000, 3, 32, 0.1)
    x, y, x_test, y_test = digits(n_train, n_test=5)
    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(args.out or tmp) / "store"
        # 1. record: one `rec.step` per optimizer step, with the ids of the batch's samples
        with dvemb.Recorder(model, store, optimizer=opt) as rec:   # lr (and momentum etc.) read from opt
            for epoch in range(epochs):
                for ids in torch.randperm(n_train).split(batch_size):
                    with rec.step(ids):
                        F.cross_entropy(model(x[ids]), y[ids]).backward()
                    opt.step()
                    opt.zero_grad()
        print(f"recorded {rec.steps} steps of {n_train} samples into {store}")

        # 2. embeddings (Algorithm 1); influence() would also compute them when missing
        info = dvemb.compute_embeddings(store, show_progress=False)
        print(f"embeddings of {info.committed_records} records ({info.blocking} blocking) in {info.seconds:.2f} s")

        # 3. scores: the closure returns per-example test losses at the model as it is now (theta_T)
        def test_losses() -> torch.Tensor:
            return F.cross_entropy(model(x_test), y_test, reduction="none")

        inf = dvemb.influence(store, model, test_losses)
        print(f"scores: {inf.scores.shape[0]} test points x {inf.scores.shape[1]} records "
              "(estimated test-loss increase if the record is removed; positive = helpful)")
        top = inf.top_k(3)
        for j in range(len(y_test)):
            print(f"test image {j} (label {int(y_test[j])}):")
            for kind, ranking in (("helpful", top.helpful), ("harmful", top.harmful)):
                records = ", ".join(f"step {ranking.step[j, r]} sample {ranking.sample_id[j, r]} "
                                    f"(label {int(y[ranking.sample_id[j, r]])}, {ranking.score[j, r]:+.2e})"
                                    for r in range(ranking.step.shape[1]))
                print(f"  most {kind}: {records}")
        ids, per_sample = inf.by_sample()  # all-epoch removal: a sample's records summed
        print(f"most helpful sample over all its epochs, test image 0: {ids[per_sample[0].argmax()]}")


if __name__ == "__main__":
    main()
