"""Recursion efficiency: Algorithm 1's achieved FLOP/s over this machine's fp32 GEMM FLOP/s on the same shapes.

A store is recorded from the paper's MNIST MLP (784-512-256-10, batch 64, random data)
at ``--dim`` values per layer. Each run times ``dvemb.compute_embeddings`` end to end
(reading gradients, the recursion, writing embeddings) and, alternating with it, the
references: per step and layer, two [B, p] x [p, p] matmuls, with ``torch.mm`` into
preallocated outputs (MKL on x86) and with oneDNN (through torch's op, as dvemb's G M^T
uses it where available); the faster is the machine's GEMM throughput. All count 4 B p^2
FLOPs per layer per step (G M^T and E^T G). A last timing, one G M^T and the rank-B update
M += E^T G ([p, B] x [B, p]) per layer with dvemb's kernels, is reported for context, and
so is ``compute_embeddings`` on the same store read as recorded with SGD momentum 0.9 (the
U, V recursion: ``dvemb/update/sgd.py``). The ratios are medians over runs of the same run's ratios.

    python benchmarks/recursion_efficiency.py [--runs 7] [--steps 200] [--dim 1024]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import (BATCH, EMBED_PAPER, MLP_SIZES, alternate, base_parser, configure, embedding_seconds_read_as, median,
                    print_table, ratios, record_store, seconds, write_results)

import torch

import dvemb
from dvemb import gemm
from dvemb.update import SGD


def step_flops(dims: list[int], batch: int) -> int:
    """FLOPs of one recursion step: 4 B p^2 per layer (G M^T and E^T G)."""
    return sum(4 * batch * p * p for p in dims)


def matmul_seconds(dims: list[int], batch: int, steps: int, onednn: bool) -> float:
    """Seconds for ``steps`` steps of two [B, p] x [p, p] matmuls per layer (torch.mm into outputs, or oneDNN)."""
    gs = [torch.randn(batch, p) for p in dims]
    ms = [torch.randn(p, p) for p in dims]
    outs = [torch.empty(batch, p) for p in dims]

    def run() -> None:
        """All steps' matmuls."""
        for _ in range(steps):
            for g, m, out in zip(gs, ms, outs):
                for _ in range(2):
                    if onednn:
                        gemm.rows_product(g, m)
                    else:
                        torch.mm(g, m, out=out)

    return seconds(run)


def rank_update_seconds(dims: list[int], batch: int, steps: int) -> float:
    """Seconds for ``steps`` steps of one G M^T and one rank-B update M += E^T G per layer, as dvemb runs them."""
    gs = [torch.randn(batch, p) for p in dims]
    es = [1e-6 * torch.randn(batch, p) for p in dims]  # small: M stays finite over the steps
    ms = [torch.zeros(p, p) for p in dims]

    def run() -> None:
        """All steps' matmuls and rank-B updates."""
        for _ in range(steps):
            for g, e, m in zip(gs, es, ms):
                gemm.rows_product(g, m)
                gemm.add_outer(m, e, g)

    return seconds(run)


def momentum_seconds(path: Path, momentum: float = 0.9) -> float:
    """Seconds of ``compute_embeddings`` on the same store read as recorded with SGD momentum (U, V recursion)."""
    return embedding_seconds_read_as(path, lambda data: data.update(update=SGD(momentum=momentum).to_dict()),
                                     **EMBED_PAPER)


def main() -> None:
    """Record a store, time the recursion against the GEMM references, print and write JSON."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="recorded steps (batch 64 each)")
    parser.add_argument("--dim", type=int, default=1024, help="projection size per layer")
    args = parser.parse_args()
    configure(args)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        record_store(path, args.steps, args.dim)
        store = dvemb.Store(path)
        dims = [spec.dim for spec in store.layers]
        flops = step_flops(dims, BATCH) * store.n_steps
        timed = {
            "compute_embeddings": lambda: seconds(lambda: dvemb.compute_embeddings(path, show_progress=False, **EMBED_PAPER)),
            "matmul_mkl": lambda: matmul_seconds(dims, BATCH, store.n_steps, onednn=False),
            "matmul_onednn": lambda: matmul_seconds(dims, BATCH, store.n_steps, onednn=True),
            "rank_update": lambda: rank_update_seconds(dims, BATCH, store.n_steps),
            "compute_embeddings_momentum": lambda: momentum_seconds(path),
        }
        alternate(timed, 1)  # warm-up
        times = alternate(timed, args.runs)
    rates = {k: [flops / t / 1e9 for t in v] for k, v in times.items()}
    gemm_rate = [max(a, b) for a, b in zip(rates["matmul_mkl"], rates["matmul_onednn"])]
    efficiency = ratios(rates["compute_embeddings"], gemm_rate)
    versus_rank_update = ratios(rates["compute_embeddings"], rates["rank_update"])
    momentum_cost = ratios(times["compute_embeddings_momentum"], times["compute_embeddings"])
    print(f"MLP {'-'.join(map(str, MLP_SIZES))} at {args.dim}/layer (dims {dims}), {store.n_steps} steps x {BATCH} "
          f"records, {flops / 1e9:.1f} GFLOP, {torch.get_num_threads()} thread(s), median of {args.runs} runs")
    print_table(["variant", "seconds", "GFLOP/s"], [[k, median(times[k]), median(rates[k])] for k in times])
    print(f"recursion / best [B,p]x[p,p] matmul: {median(efficiency):.1%}   "
          f"recursion / (matmul + rank-B update): {median(versus_rank_update):.1%}   "
          f"momentum recursion / plain: {median(momentum_cost):.2f}x")
    write_results("recursion_efficiency", args, {
        "model": "mnist_mlp", "sizes": MLP_SIZES, "batch": BATCH, "layer_dims": dims, "steps": store.n_steps,
        "records": store.n_records, "gflop": flops / 1e9, "onednn": gemm.onednn_available(),
        "gemm_gflops": median(gemm_rate),
        "seconds": {k: median(v) for k, v in times.items()}, "gflops": {k: median(v) for k, v in rates.items()},
        "efficiency": median(efficiency), "efficiencies": efficiency,
        "efficiency_vs_rank_update": median(versus_rank_update),
        "momentum_time_ratio": median(momentum_cost), "momentum_time_ratios": momentum_cost,
    })


if __name__ == "__main__":
    main()
