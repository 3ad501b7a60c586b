"""Scoring efficiency: bytes of embeddings scored per second over the measured memory read bandwidth.

A store is recorded from the paper's MNIST MLP (784-512-256-10, batch 64, random data) at
``--dim`` values per layer and its embeddings computed. For each number of test points,
these are timed alternately in one process (median over runs of the same run's ratios):

- ``score``: dvemb's streamed scoring loop (``dvemb.query._score_chunks`` into a fresh
  score matrix, as ``dvemb.influence`` runs it) over the float32 embedding files
  (positional reads into reused buffers, read ahead), read once beforehand so they sit in
  the page cache; the test gradients are taken once, outside the timing;
- ``scorer``: the same loop over an open ``dvemb.Scorer`` (the files mapped once, the
  products taken on the mapped rows: no copy), as ``Scorer.influence`` runs it;
- ``influence`` / ``scorer_influence``: ``dvemb.influence`` / ``Scorer.influence`` end to end
  (test gradients and scoring; ``influence`` also opens the store);
- ``scorer_first``: opening a Scorer and its first query (it pays the page faults);
- ``top_k``: ``dvemb.top_k`` end to end (k = 10, no full score matrix);
- ``read_numpy`` / ``read_torch``: a sum over an in-memory array of the embeddings' size
  (torch's with ``--threads`` threads), the machine's read bandwidth (the faster of the two
  is the reference);
- ``read_store``: the same sum over fresh memmaps of the embedding files;
- ``matmul`` / ``matmul_mkl``: one [n_test, P] x [P, n_records] product over the same
  embeddings in memory, with dvemb's kernel (oneDNN where torch has it) / with ``torch.mm``
  (MKL): the compute bound. With n_test test points each byte read costs n_test / 2 FLOPs,
  so for many test points scoring is bound by GEMM throughput, not by bandwidth.

    python benchmarks/scoring_efficiency.py [--runs 7] [--threads 1] [--n-test 100 10 4 1]
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from common import (BATCH, MLP_SIZES, alternate, base_parser, configure, median, print_table, query_loss, ratios,
                    record_store, seconds, write_results)

import numpy as np
import torch
from torch import nn

import dvemb
from dvemb import gemm
from dvemb.embed.layout import final_arrays
from dvemb.query import CHUNK_BYTES, MAPPED_CHUNK_BYTES, _prepare, _Query, _score_chunks

TOP_K = 10


def score_seconds(query: _Query, scorer: dvemb.Scorer | None = None) -> float:
    """Seconds of dvemb's scoring loop into a fresh score matrix (streamed, or over ``scorer``'s mapped rows)."""

    def run() -> None:
        """Score every record into a new matrix."""
        scores = np.empty((query.tests[0].shape[0], query.n_rows), dtype=np.float32)
        for r0, r1, chunk in _score_chunks(query, None, False, None if scorer is None else scorer._source):
            scores[:, r0:r1] = chunk.numpy()

    return seconds(run)


def store_read_seconds(store: dvemb.Store) -> float:
    """Seconds to sum the embedding files through fresh memmaps (they sit in the page cache)."""
    return seconds(lambda: [a.read(store.n_records).sum() for a in final_arrays(store, "float32")])


def first_query_seconds(path: Path, model: nn.Module, closure: Callable[[], torch.Tensor]) -> float:
    """Seconds to open a Scorer and answer its first query (page faults included)."""

    def run() -> None:
        """Open, query once, close."""
        with dvemb.Scorer(path) as scorer:
            scorer.influence(model, closure)

    return seconds(run)


def variants(path: Path, model: nn.Module, n_test: int, in_memory: np.ndarray,
             scorer: dvemb.Scorer) -> dict[str, Callable[[], float]]:
    """Timed callables (each returns seconds) for one number of test points."""
    store = dvemb.Store(path)
    closure = query_loss(model, n_test)
    query = _prepare(path, model, closure, None, None, None, False, None)
    rows = torch.from_numpy(in_memory)
    out = torch.empty(n_test, len(in_memory))
    return {
        "score": lambda: score_seconds(query),
        "scorer": lambda: score_seconds(query, scorer),
        "influence": lambda: seconds(lambda: dvemb.influence(path, model, closure)),
        "scorer_influence": lambda: seconds(lambda: scorer.influence(model, closure)),
        "scorer_first": lambda: first_query_seconds(path, model, closure),
        "top_k": lambda: seconds(lambda: dvemb.top_k(path, model, closure, TOP_K)),
        "read_numpy": lambda: seconds(lambda: in_memory.sum()),
        "read_torch": lambda: seconds(lambda: rows.sum()),
        "read_store": lambda: store_read_seconds(store),
        "matmul": lambda: seconds(lambda: gemm.scores([torch.cat(query.tests, 1)], [rows])),
        "matmul_mkl": lambda: seconds(lambda: torch.mm(torch.cat(query.tests, 1), rows.t(), out=out)),
    }


def measure(path: Path, model: nn.Module, n_test: int, in_memory: np.ndarray, scorer: dvemb.Scorer,
            runs: int) -> dict:
    """Medians of times, bytes per second and ratios for one number of test points."""
    timed = variants(path, model, n_test, in_memory, scorer)
    alternate(timed, 1)  # warm-up (page cache, mappings, allocator)
    times = alternate(timed, runs)
    nbytes = in_memory.nbytes
    rate = {k: [nbytes / t / 1e9 for t in v] for k, v in times.items()}
    bandwidth = [max(a, b) for a, b in zip(rate["read_numpy"], rate["read_torch"])]
    roofline = [min(a, b) for a, b in zip(bandwidth, rate["matmul"])]
    versus = {f"{k}_vs_bandwidth": median(ratios(rate[k], bandwidth))
              for k in ("score", "scorer", "influence", "scorer_influence", "scorer_first", "top_k")}
    return {
        "n_test": n_test, "ms": {k: 1e3 * median(v) for k, v in times.items()},
        "gb_per_s": {k: median(v) for k, v in rate.items()}, "bandwidth_gb_per_s": median(bandwidth), **versus,
        "score_vs_read_store": median(ratios(rate["score"], rate["read_store"])),
        "scorer_vs_roofline": median(ratios(rate["scorer"], roofline)),
        "score_vs_roofline": median(ratios(rate["score"], roofline)),
        "matmul_vs_mkl": median(ratios(rate["matmul"], rate["matmul_mkl"])),
        "matmul_gflops": median([2 * n_test * in_memory.size / t / 1e9 for t in times["matmul"]]),
        "scorer_vs_bandwidth_runs": ratios(rate["scorer"], bandwidth),
    }


def main() -> None:
    """Record a store, compute embeddings, time scoring against the references, print and write JSON."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="recorded steps (batch 64 each)")
    parser.add_argument("--dim", type=int, default=1024, help="projection size per layer")
    parser.add_argument("--n-test", type=int, nargs="+", default=[100, 10, 4, 1], help="numbers of test points")
    args = parser.parse_args()
    configure(args)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        model = record_store(path, args.steps, args.dim)
        dvemb.compute_embeddings(path, show_progress=False, blocking="layer")
        store = dvemb.Store(path)
        # an in-memory copy for the references; reading the memmaps also puts them in the page cache
        in_memory = np.concatenate([a.read(store.n_records) for a in final_arrays(store, "float32")], axis=1)
        with dvemb.Scorer(path) as scorer:
            cases = [measure(path, model, n, in_memory, scorer, args.runs) for n in args.n_test]
    dims = [spec.dim for spec in store.layers]
    print(f"MLP {'-'.join(map(str, MLP_SIZES))} at {args.dim}/layer (dims {dims}), {store.n_records} records, "
          f"{in_memory.nbytes / 1e6:.0f} MB of float32 embeddings, {torch.get_num_threads()} thread(s), "
          f"oneDNN products: {gemm.onednn_available()}, median of {args.runs} runs")
    print_table(["n_test", "scorer ms", "score ms", "influence ms", "top_k ms", "matmul ms", "mkl ms",
                 "scorer GB/s", "score GB/s", "read GB/s", "scorer/bw", "1st query/bw", "score/bw", "influence/bw",
                 "top_k/bw", "scorer/roofline", "matmul/mkl"],
                [[c["n_test"], c["ms"]["scorer"], c["ms"]["score"], c["ms"]["influence"], c["ms"]["top_k"],
                  c["ms"]["matmul"], c["ms"]["matmul_mkl"], c["gb_per_s"]["scorer"], c["gb_per_s"]["score"],
                  c["bandwidth_gb_per_s"], c["scorer_vs_bandwidth"], c["scorer_first_vs_bandwidth"],
                  c["score_vs_bandwidth"], c["influence_vs_bandwidth"], c["top_k_vs_bandwidth"],
                  c["scorer_vs_roofline"], c["matmul_vs_mkl"]] for c in cases])
    write_results("scoring_efficiency", args, {
        "model": "mnist_mlp", "sizes": MLP_SIZES, "batch": BATCH, "layer_dims": dims, "records": store.n_records,
        "embedding_bytes": in_memory.nbytes, "chunk_bytes": CHUNK_BYTES, "mapped_chunk_bytes": MAPPED_CHUNK_BYTES,
        "onednn": gemm.onednn_available(), "cases": cases,
    })


if __name__ == "__main__":
    main()
