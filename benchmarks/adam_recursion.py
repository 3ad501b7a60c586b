"""Cost of following AdamW's second moment in the recursion: ``compute_embeddings`` with v followed against frozen.

A store is recorded with the Recorder's defaults from an MLP with GELU trained by torch's AdamW
(lr 1e-3, weight decay 0.01) on random MNIST-shaped data, ``--dim`` values per layer. Alternating
in one process, ``compute_embeddings`` (defaults) runs on the store as recorded (projected layers
follow v through the factored operators, exact layers elementwise: three propagator-sized matrices
per block) and on the same store read with ``second_moment="frozen"`` in its manifest (v frozen
everywhere: two). Reported: the median seconds of each and the median of the runs' time ratios.

    python benchmarks/adam_recursion.py [--runs 7] [--steps 100] [--dim 1024] [--model fidelity|paper]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import (alternate, backward, base_parser, configure, median, mnist_mlp,
                    print_table, ratios, seconds, write_results)

import torch
from torch import nn

import dvemb

MODELS = {"fidelity": ((784, 128, 10), 32), "paper": ((784, 512, 256, 10), 64)}  # sizes, batch


def record(path: Path, sizes: tuple[int, ...], batch: int, steps: int, dim: int) -> None:
    """Train the MLP with AdamW on random data for ``steps`` steps under a default Recorder."""
    model = mnist_mlp(0, sizes, nn.GELU)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    with dvemb.Recorder(model, path, projection_dim=dim, optimizer=opt) as rec:
        for t in range(steps):
            data = torch.randn(batch, sizes[0], generator=gen), torch.randint(0, sizes[-1], (batch,), generator=gen)
            backward(model, data, rec, first_id=t * batch)
            opt.step()
            opt.zero_grad()


def frozen_seconds(path: Path) -> float:
    """Seconds of ``compute_embeddings`` on the store read with the second moment frozen."""
    return seconds(lambda: dvemb.compute_embeddings(path, second_moment="frozen", show_progress=False))


def main() -> None:
    """Record a store, time both readings of it, print and write JSON."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="recorded steps")
    parser.add_argument("--dim", type=int, default=1024, help="projection size per layer")
    parser.add_argument("--model", choices=sorted(MODELS), default="fidelity",
                        help="fidelity: 784-128-10, batch 32 (default); paper: 784-512-256-10, batch 64")
    args = parser.parse_args()
    configure(args)
    sizes, batch = MODELS[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        record(path, sizes, batch, args.steps, args.dim)
        store = dvemb.Store(path)
        dims = [spec.dim for spec in store.layers]
        timed = {"v followed (defaults)": lambda: seconds(lambda: dvemb.compute_embeddings(path, show_progress=False)),
                 "v frozen": lambda: frozen_seconds(path)}
        alternate(timed, 1)  # warm-up
        times = alternate(timed, args.runs)
        blocking = dvemb.compute_embeddings(path, show_progress=False).blocking
    cost = ratios(times["v followed (defaults)"], times["v frozen"])
    print(f"MLP {'-'.join(map(str, sizes))} GELU, AdamW, {args.dim}/layer (dims {dims}), {store.n_steps} steps x "
          f"{batch}, blocking {blocking}, {torch.get_num_threads()} thread(s), median of {args.runs} runs")
    print_table(["variant", "seconds"], [[k, median(v)] for k, v in times.items()])
    print(f"v followed / v frozen: {median(cost):.2f}x")
    write_results(f"adam_recursion_{args.model}", args, {
        "sizes": sizes, "batch": batch, "layer_dims": dims, "steps": store.n_steps, "blocking": blocking,
        "seconds": {k: median(v) for k, v in times.items()}, "time_ratio": median(cost), "time_ratios": cost})


if __name__ == "__main__":
    main()
