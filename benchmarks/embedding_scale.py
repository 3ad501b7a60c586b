"""Cost of the default embeddings on a deep model: time and peak memory against the paper's per-layer mode.

A store shaped like a 48-block MLP's run is written with random rows (the recursion's cost does
not depend on their values): 49 tracked layers of 1024 projected values each (256 x 256 linear
layers at 32 x 32), batch 32, ``--steps`` steps, float32. The paper's configuration stores the
gradients only (H = sum w g g^T) and keeps one propagator per layer; the default stores 3
Gauss-Newton rows per record and ``compute_embeddings``'s default plan (``blocking="auto"``:
hierarchical here, since a global propagator would need 10 GB). Each run is a fresh process
(``compute_embeddings`` end to end), so its peak resident memory is its own; runs of the two
configurations alternate. Reported: median seconds, the median of the runs' time ratios, and
peak RSS (MiB) with its difference.

``--optimizer adamw``: both stores follow AdamW as the Recorder writes it for projected layers
(whitened rows, a whitening row per layer and step with the second moment's factors), so both
configurations follow v through the factored operators on whole layers: three propagator matrices
per layer, and the default's coarse blocks (sketches, v held fixed) two.

    python benchmarks/embedding_scale.py [--runs 5] [--steps 40] [--layers 49] [--optimizer adamw]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import base_parser, configure, median, print_table, ratios, write_results

import numpy as np
from torch import nn

from dvemb.capture.selection import layer_spec
from dvemb.store import StepRecord, StoreConfig, StoreWriter
from dvemb.update import SGD, Adam

DIM, WIDTH, BATCH, PASSES = 1024, 256, 32, 3
CONFIGS = {"paper": {"passes": 0, "blocking": "layer", "curvature": "gradient_outer"},
           "default": {"passes": PASSES, "blocking": "auto", "curvature": "ggn"}}


def write_store(path: Path, layers: int, steps: int, passes: int, curvature: str, adam: bool = False) -> None:
    """A store of random float32 rows shaped like the 48-block MLP's run (under AdamW with ``adam``)."""
    specs = tuple(layer_spec(str(i), nn.Linear(WIDTH, WIDTH), DIM, 0, "gaussian") for i in range(layers))
    rule = Adam(weight_decay=0.01) if adam else SGD()
    writer = StoreWriter(path, StoreConfig(specs, "float32", "mean", curvature, "gaussian", 0, rule, whitening=adam,
                                           second_factors=adam))
    gen = np.random.default_rng(0)
    for t in range(steps):
        rows = [(gen.standard_normal((BATCH, s.dim)) * 1e-2).astype(np.float32) for s in specs]
        curv = None if not passes else [(gen.standard_normal((BATCH, passes * s.dim)) * 1e-2).astype(np.float32)
                                        for s in specs]
        writer.append_step(StepRecord(np.arange(t * BATCH, (t + 1) * BATCH), np.full(BATCH, 1.0 / BATCH), 0.1,
                                      rows, curv, whitening=[_whitening_row(gen) for _ in specs] if adam else None))
    writer.close()


def _whitening_row(gen: np.random.Generator) -> np.ndarray:
    """A layer's row under AdamW: log whitening factors 0 (R = 1), second-moment factors of a coupling ~1e-6, sign."""
    sides = WIDTH + WIDTH + 1
    return np.concatenate([np.zeros(sides), gen.uniform(0, 1e-3, sides), [gen.choice([-1.0, 1.0])]])


CHILD = """
import json, resource, sys, time
import torch
import dvemb
torch.set_num_threads(int(sys.argv[3]))
start = time.perf_counter()
info = dvemb.compute_embeddings(sys.argv[1], blocking=sys.argv[2], show_progress=False)
print(json.dumps({"seconds": time.perf_counter() - start, "blocking": info.blocking,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(path: Path, blocking: str, threads: int) -> dict:
    """compute_embeddings in a fresh process: seconds, the plan and the process's peak RSS."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), blocking, str(threads)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Write the two stores, time the configurations alternately, print and write JSON."""
    parser = base_parser(__doc__.splitlines()[0], runs=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--layers", type=int, default=49)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="the run's optimizer")
    args = parser.parse_args()
    configure(args)
    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for name, c in CONFIGS.items():
            write_store(Path(tmp) / name, args.layers, args.steps, c["passes"], c["curvature"],
                        args.optimizer == "adamw")
        for _ in range(args.runs):
            for name, c in CONFIGS.items():
                results[name].append(run(Path(tmp) / name, c["blocking"], args.threads))
    seconds = {n: [r["seconds"] for r in rs] for n, rs in results.items()}
    peak = {n: median([r["peak_mib"] for r in rs]) for n, rs in results.items()}
    time_ratio = median(ratios(seconds["default"], seconds["paper"]))
    print(f"{args.layers} layers x {DIM} values, batch {BATCH}, {args.steps} steps, {args.optimizer}, "
          f"{args.threads} thread(s), median of {args.runs} fresh processes")
    print_table(["configuration", "plan", "seconds", "peak RSS MiB"],
                [[n, results[n][0]["blocking"], median(seconds[n]), peak[n]] for n in CONFIGS])
    print(f"default / paper: time {time_ratio:.2f}x, peak memory {peak['default'] - peak['paper']:+.0f} MiB")
    name = "embedding_scale" + ("_adamw" if args.optimizer == "adamw" else "")
    write_results(name, args, {"layers": args.layers, "dim": DIM, "batch": BATCH, "steps": args.steps,
                               "runs": results, "time_ratio": time_ratio,
                               "peak_mib": peak, "extra_mib": peak["default"] - peak["paper"]})


if __name__ == "__main__":
    main()
