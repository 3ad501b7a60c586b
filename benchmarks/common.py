"""Helpers shared by the benchmarks: threads, the paper's MNIST MLP, a recorded store, timing, medians, JSON, RSS.

Import this module before numpy: it pins OpenBLAS to one thread so that numpy's
threads do not compete with torch's on a shared machine.
"""

from __future__ import annotations

import os

os.environ["OPENBLAS_NUM_THREADS"] = "1"  # must precede the first numpy import

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dvemb

RESULTS_DIR = Path(os.environ.get("DVEMB_BENCHMARK_RESULTS") or Path(__file__).resolve().parent / "results")
"""Where results go: benchmarks/results, or $DVEMB_BENCHMARK_RESULTS (the smoke tests write elsewhere)."""
MLP_SIZES = (784, 512, 256, 10)  # the paper's MNIST MLP
BATCH = 64
LR = 0.01
MIN_RUNS = 5
PAPER = {"curvature": "gradient_outer", "projection": "gaussian"}
"""The paper's configuration: the benchmarks of capture, recursion and scoring speed measure it (the faithful
default's extra costs are measured by curvature_cost.py and embedding_scale.py)."""
EMBED_PAPER = {"blocking": "layer"}

Batch = tuple[torch.Tensor, torch.Tensor]
LossClosure = Callable[[], torch.Tensor]
R = TypeVar("R")


def base_parser(description: str, runs: int = 7) -> argparse.ArgumentParser:
    """Argument parser with the options every benchmark shares (--runs, --threads, --suffix)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=runs, help=f"repetitions whose median is reported (>= {MIN_RUNS})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine may be shared)")
    parser.add_argument("--suffix", default="", help="appended to the results file's name, e.g. _run2")
    return parser


def configure(args: argparse.Namespace) -> None:
    """Apply the shared options: check the number of runs and set torch's thread count."""
    if args.runs < MIN_RUNS:
        raise SystemExit(f"--runs must be >= {MIN_RUNS} (medians of fewer runs are too noisy here)")
    torch.set_num_threads(args.threads)


def mnist_mlp(seed: int = 0, sizes: Sequence[int] = MLP_SIZES, activation: type[nn.Module] = nn.ReLU
              ) -> nn.Sequential:
    """An MLP; by default the paper's MNIST MLP 784-512-256-10 with ReLU activations."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(d_in, d_out), activation()]
    return nn.Sequential(*layers[:-1])


def random_batches(n: int, batch: int = BATCH, seed: int = 0) -> Iterator[Batch]:
    """``n`` batches of random MNIST-shaped inputs and labels, made one at a time (memory stays flat)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randn(batch, MLP_SIZES[0], generator=gen), torch.randint(0, MLP_SIZES[-1], (batch,), generator=gen)


def backward(model: nn.Module, batch: Batch, rec: dvemb.Recorder | None = None, first_id: int = 0,
             lr: float | None = None) -> None:
    """Forward, mean cross-entropy and backward of one batch, recorded when ``rec`` is given (with ``lr``, or the
    Recorder's optimizer's)."""
    x, y = batch
    if rec is None:
        F.cross_entropy(model(x), y).backward()
    else:
        with rec.step(range(first_id, first_id + len(x)), lr=lr):
            F.cross_entropy(model(x), y).backward()


def sgd_step(model: nn.Module, batch: Batch, rec: dvemb.Recorder | None = None, first_id: int = 0,
             lr: float = LR) -> None:
    """One plain SGD step (forward, mean cross-entropy, backward, update by hand), recorded when ``rec`` is given."""
    backward(model, batch, rec, first_id, lr)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=-lr)
            p.grad = None


def record_store(path: Path, steps: int, projection_dim: int | None, seed: int = 0) -> nn.Module:
    """Train the MNIST MLP for ``steps`` recorded steps on random data into a store at ``path``; return the model."""
    model = mnist_mlp(seed)
    with dvemb.Recorder(model, path, projection_dim=projection_dim, seed=seed, **PAPER) as rec:
        for t, batch in enumerate(random_batches(steps, seed=seed)):
            sgd_step(model, batch, rec, first_id=t * BATCH)
    return model


def query_loss(model: nn.Module, n_test: int, seed: int = 1) -> LossClosure:
    """Closure of per-example cross-entropy losses of ``n_test`` random test points at ``model``."""
    x, y = next(random_batches(1, batch=n_test, seed=seed))
    return lambda: F.cross_entropy(model(x), y, reduction="none")


@dataclass(frozen=True)
class Elapsed:
    """Wall-clock seconds and CPU seconds (user + system, this process) of some work."""

    wall: float
    cpu: float

    def per(self, n: int) -> Elapsed:
        """The same divided by ``n`` (per step, per record)."""
        return Elapsed(self.wall / n, self.cpu / n)


def elapsed(fn: Callable[[], object]) -> Elapsed:
    """Wall-clock and CPU seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return Elapsed(time.perf_counter() - wall, time.process_time() - cpu)


def seconds(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    return elapsed(fn).wall


def embedding_seconds_read_as(path: Path, change: Callable[[dict], None], **options: object) -> float:
    """Seconds of ``dvemb.compute_embeddings(path, **options)`` with the store's manifest changed by ``change``
    (in place, on its JSON), restored afterwards."""
    manifest = path / "manifest.json"
    plain = manifest.read_text()
    data = json.loads(plain)
    change(data)
    manifest.write_text(json.dumps(data))
    try:
        return seconds(lambda: dvemb.compute_embeddings(path, show_progress=False, **options))
    finally:
        manifest.write_text(plain)


def alternate(variants: Mapping[str, Callable[[], R]], runs: int) -> dict[str, list[R]]:
    """Call every variant once per run, rotating their order each run; return each variant's measurements."""
    names = list(variants)
    out: dict[str, list[R]] = {name: [] for name in names}
    for run in range(runs):
        shift = run % len(names)
        for name in names[shift:] + names[:shift]:
            out[name].append(variants[name]())
    return out


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Element-wise ratios of paired measurements (same run)."""
    return [a / b for a, b in zip(numerators, denominators)]


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment(args: argparse.Namespace) -> dict:
    """Versions, machine and settings that the numbers depend on."""
    return {
        "torch": torch.__version__, "numpy": np.__version__, "dvemb": dvemb.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "openblas_threads": os.environ["OPENBLAS_NUM_THREADS"],
        "command": " ".join(sys.argv), "settings": vars(args),
    }


def write_results(name: str, args: argparse.Namespace, payload: dict) -> Path:
    """Write ``payload`` with the environment to benchmarks/results/<name>[_threads<N>]<suffix>.json (``_threadsN``
    unless 1 thread, so that runs at other thread counts do not overwrite each other); return the path."""
    RESULTS_DIR.mkdir(exist_ok=True)
    threads = getattr(args, "threads", 1)
    path = RESULTS_DIR / f"{name}{'' if threads == 1 else f'_threads{threads}'}{getattr(args, 'suffix', '')}.json"
    path.write_text(json.dumps({"benchmark": name, "environment": environment(args), **payload}, indent=1))
    print(f"written {path}")
    return path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print rows under headers, right-aligned, floats with 3 significant digits."""
    cells = [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
