"""Algorithm 2's parallel speed-up: compute_embeddings wall time with 1 and 2 workers on a >= 1 GB store.

The store comes from a deep, narrow MLP (48 layers of 64 -> 64, 256 dims per layer, batch
64), so it passes 1 GB after a few hundred steps while the recursion stays a few seconds.
Variants, alternated in each run: Algorithm 1 in this process with 1 and 2 torch threads,
Algorithm 2 with 2 segments in this process (the cost of composing), and Algorithm 2 with
2 segments over 2 worker processes of 1 thread each.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import common  # noqa: I001  (pins OpenBLAS threads before numpy)
import torch
import torch.nn.functional as F
from torch import nn

import dvemb

DEPTH, WIDTH, BATCH, DIM = 48, 64, 64, 256


def deep_mlp() -> nn.Sequential:
    """48 tanh layers of width 64."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def record(path: Path, min_bytes: int) -> int:
    """Record steps of the deep MLP until the store holds ``min_bytes``; return the steps."""
    model = deep_mlp()
    per_step = BATCH * DEPTH * DIM * 4
    steps = -(-min_bytes // per_step)
    gen = torch.Generator().manual_seed(0)
    with dvemb.Recorder(model, path, projection_dim=DIM, **common.PAPER) as rec:
        for t in range(steps):
            x, y = torch.randn(BATCH, WIDTH, generator=gen), torch.randint(0, WIDTH, (BATCH,), generator=gen)
            with rec.step(range(t * BATCH, (t + 1) * BATCH), lr=0.01):
                F.cross_entropy(model(x), y).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(p.grad, alpha=-0.01)
                    p.grad = None
    return steps


def main() -> None:
    """Record the store, time the variants alternately, print and write the medians and speed-ups."""
    parser = common.base_parser(__doc__.splitlines()[0], runs=5)
    parser.add_argument("--gb", type=float, default=1.0, help="store size to reach, in GB (default 1)")
    args = parser.parse_args()
    common.configure(args)
    root = Path(tempfile.mkdtemp(prefix="dvemb-parallel-"))
    try:
        path = root / "store"
        steps = record(path, int(args.gb * 1e9))
        store = dvemb.Store(path)
        size = store.nbytes()
        print(f"store: {steps} steps, {store.n_records} records, {size / 1e9:.2f} GB")

        def run(threads: int, checkpoints: int | None, workers: int):
            def call() -> float:
                torch.set_num_threads(threads)
                try:
                    return common.seconds(lambda: dvemb.compute_embeddings(
                        path, checkpoints=checkpoints, workers=workers, show_progress=False, **common.EMBED_PAPER))
                finally:
                    torch.set_num_threads(args.threads)
            return call

        times = common.alternate({
            "alg1_1thread": run(1, None, 1),
            "alg1_2threads": run(2, None, 1),
            "alg2_k2_1thread": run(1, 2, 1),
            "alg2_k2_2workers": run(2, 2, 2),
        }, args.runs)
        medians = {name: common.median(t) for name, t in times.items()}
        speedups = {
            "2workers_vs_alg1_1thread": medians["alg1_1thread"] / medians["alg2_k2_2workers"],
            "2workers_vs_alg1_2threads": medians["alg1_2threads"] / medians["alg2_k2_2workers"],
            "2threads_vs_1thread": medians["alg1_1thread"] / medians["alg1_2threads"],
        }
        common.print_table(["variant", "median s"], [[k, v] for k, v in medians.items()])
        common.print_table(["speed-up", "x"], [[k, v] for k, v in speedups.items()])
        common.write_results("parallel_embeddings", args, {
            "model": f"MLP {DEPTH} x Linear({WIDTH}, {WIDTH}), batch {BATCH}, {DIM} dims per layer",
            "steps": steps, "records": store.n_records, "store_bytes": size,
            "seconds": times, "median_seconds": medians, "speedups": speedups,
        })
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
