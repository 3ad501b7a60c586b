"""A small CNN trained from a torch DataLoader whose dataset yields (sample id, image, label).

The sample id travels with each example through the DataLoader (shuffling, batching), so each
optimizer step hands the Recorder the ids of exactly the samples in its batch. The run uses SGD
with momentum, which the embeddings follow when the optimizer is given to the Recorder. Queries
go through a ``dvemb.Scorer``, which keeps the embeddings mapped for repeated questions.

    python examples/cnn_dataloader.py          # full digits, 3 epochs
    python examples/cnn_dataloader.py --tiny   # a few seconds
    python examples/cnn_dataloader.py --out runs/cnn

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
from torch.utils.data import DataLoader, Dataset

import dvemb


class DigitsWithIds(Dataset):
    """scikit-learn's 8x8 digits as (id, image [1, 8, 8], label); the id is the index into this dataset."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return i, self.images[i], self.labels[i]


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),            # 8 x 8 x 8
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),  # 8 x 4 x 4
        nn.Flatten(), nn.Linear(128, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds on a CPU")
    parser.add_argument("--out", metavar="DIR", default=None, help="where to keep the store (default: a temp folder)")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)  # [1797, 1, 8, 8]
    labels = torch.from_numpy(data.target.astype(np.int64))
    n_train, epochs = (160, 2) if args.tiny else (1500, 3)
    train = DigitsWithIds(images[:n_train], labels[:n_train])
    x_test, y_test = images[-4:], labels[-4:]
    loader = DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))

    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(args.out or tmp) / "store"
        with dvemb.Recorder(model, store, optimizer=opt) as rec:
            print("tracked layers:", ", ".join(rec.layers))
            for epoch in range(epochs):
                for ids, x, y in loader:  # the default collate turns the ids into a LongTensor
                    with rec.step(ids):
                        F.cross_entropy(model(x), y).backward()
                    opt.step()
                    opt.zero_grad()
        print(dvemb.Store(store).summary())

        def test_losses() -> torch.Tensor:
            return F.cross_entropy(model(x_test), y_test, reduction="none")

        with dvemb.Scorer(store) as scorer:  # computes the embeddings on opening (they are missing)
            top = scorer.top_k(model, test_losses, k=3)
            for j in range(len(y_test)):
                print(f"test image {j} (label {int(y_test[j])}): most helpful "
                      + ", ".join(f"step {s} sample {i} (label {int(labels[i])})"
                                  for s, i in zip(top.helpful.step[j], top.helpful.sample_id[j])))
            scores = scorer.influence(model, test_losses).scores  # a second query reuses the mapped files
            print(f"score matrix {scores.shape}; records that helped test image 0: {(scores[0] > 0).sum()}")


if __name__ == "__main__":
    main()
