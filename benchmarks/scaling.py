"""Scaling: time per record and peak RSS of record + compute_embeddings + influence as the run grows.

The paper's MNIST MLP (784-512-256-10, batch 64, random data) is recorded for T steps at
``--dim`` values per layer, its embeddings computed, and ``--n-test`` test points scored,
each size in a fresh subprocess so that its peak resident set size (ru_maxrss) is its own.
The peak is read after each phase (it only grows), so the phase that raises it is known.
With ``--sample-rss`` a thread also samples /proc/self/status every 20 ms and reports each
phase's highest resident anonymous memory (heap) and file-backed memory (mapped store
files) apart; it is off by default so that it cannot disturb the timings. The score
matrix [n_test, n_records] grows with T by design: its size is reported separately.
Sizes run in rotated order in each run; medians over runs.

    python benchmarks/scaling.py [--runs 5] [--steps 100 400 1600] [--sample-rss]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

from common import (BATCH, EMBED_PAPER, MLP_SIZES, alternate, base_parser, configure, median, peak_rss_mib, print_table,
                    query_loss, record_store, write_results)

import dvemb

PHASES = ("record", "embed", "influence")
SAMPLE_SECONDS = 0.02
T = TypeVar("T")


def resident_mib() -> dict[str, float]:
    """Current resident anonymous and file-backed memory of this process, in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("RssAnon", "RssFile")}


class RssSampler(threading.Thread):
    """Background thread keeping the highest RssAnon and RssFile seen since the last reset."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.highest = resident_mib()
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Sample until stopped."""
        while not self._stop_event.wait(SAMPLE_SECONDS):
            self.highest = {k: max(v, self.highest[k]) for k, v in resident_mib().items()}

    def take(self) -> dict[str, float]:
        """The highest values since the last call (including now), then reset."""
        now = resident_mib()
        highest = {k: max(v, now[k]) for k, v in self.highest.items()}
        self.highest = now
        return highest

    def stop(self) -> None:
        """End the thread."""
        self._stop_event.set()
        self.join()


def phase(out: dict, name: str, fn: Callable[[], T], sampler: RssSampler | None) -> T:
    """Run one phase, adding its time per record and the memory during it to ``out``; return its result."""
    if sampler is not None:
        sampler.take()
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    out["phases"][name] = {"seconds": elapsed, "us_per_record": 1e6 * elapsed / out["records"],
                           "peak_mib": peak_rss_mib()}
    if sampler is not None:
        out["phases"][name].update({f"max_{k}_mib": v for k, v in sampler.take().items()})
    return result


def worker(args: argparse.Namespace) -> dict:
    """Run the three phases for one size in this process; return times and memory of each phase."""
    out: dict = {"steps": args.worker, "records": args.worker * BATCH, "start_peak_mib": peak_rss_mib(), "phases": {}}
    sampler = RssSampler() if args.sample_rss else None
    if sampler is not None:
        sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        model = phase(out, "record", lambda: record_store(path, args.worker, args.dim), sampler)
        phase(out, "embed", lambda: dvemb.compute_embeddings(path, show_progress=False, **EMBED_PAPER), sampler)
        scores = phase(out, "influence", lambda: dvemb.influence(path, model, query_loss(model, args.n_test)).scores,
                       sampler)
        out["store_mib"] = dvemb.Store(path).nbytes() / 2 ** 20
    if sampler is not None:
        sampler.stop()
    out["scores_mib"] = scores.nbytes / 2 ** 20
    return out


def run_size(steps: int, args: argparse.Namespace) -> dict:
    """One size in a fresh subprocess."""
    command = [sys.executable, __file__, "--worker", str(steps), "--dim", str(args.dim), "--n-test", str(args.n_test),
               "--threads", str(args.threads), "--runs", str(args.runs)] + (["--sample-rss"] if args.sample_rss else [])
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.splitlines()[-1])


def summarise(results: list[dict]) -> dict:
    """Medians over the runs of one size."""
    first = results[0]
    phases = {name: {key: median([r["phases"][name][key] for r in results]) for key in first["phases"][name]}
              for name in PHASES}
    return {"steps": first["steps"], "records": first["records"], "store_mib": first["store_mib"],
            "scores_mib": first["scores_mib"], "start_peak_mib": median([r["start_peak_mib"] for r in results]),
            "peak_mib": phases["influence"]["peak_mib"], "phases": phases,
            "peak_mib_runs": [r["phases"]["influence"]["peak_mib"] for r in results]}


def growth(sizes: list[dict]) -> dict:
    """Peak RSS (with and without the score matrix) and time per record of each size over the smallest."""
    base = sizes[0]
    return {str(s["steps"]): {
        "peak": s["peak_mib"] / base["peak_mib"],
        "peak_without_scores": (s["peak_mib"] - s["scores_mib"]) / (base["peak_mib"] - base["scores_mib"]),
        "us_per_record": {p: s["phases"][p]["us_per_record"] / base["phases"][p]["us_per_record"] for p in PHASES},
    } for s in sizes}


def print_results(sizes: list[dict], args: argparse.Namespace) -> None:
    """Tables of time per record and memory per size."""
    print(f"MLP {'-'.join(map(str, MLP_SIZES))} at {args.dim}/layer, batch {BATCH}, {args.n_test} test points, "
          f"{args.threads} thread(s), median of {args.runs} runs, one subprocess per size and run")
    print_table(["T", "records", "store MiB", *(f"{p} us/rec" for p in PHASES), "start MiB",
                 *(f"peak after {p}" for p in PHASES), "scores MiB"],
                [[s["steps"], s["records"], s["store_mib"], *(s["phases"][p]["us_per_record"] for p in PHASES),
                  s["start_peak_mib"], *(s["phases"][p]["peak_mib"] for p in PHASES), s["scores_mib"]]
                 for s in sizes])
    if args.sample_rss:
        print("highest resident MiB during each phase: anonymous (heap) / file-backed (mapped files)")
        print_table(["T", *PHASES], [[s["steps"], *(f"{s['phases'][p]['max_RssAnon_mib']:.0f} / "
                                                   f"{s['phases'][p]['max_RssFile_mib']:.0f}" for p in PHASES)]
                                     for s in sizes])


def main() -> None:
    """Run every size in subprocesses, print the tables and write JSON (or, with --worker, run one size)."""
    parser = base_parser(__doc__.splitlines()[0], runs=5)
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 400, 1600], help="run lengths T")
    parser.add_argument("--dim", type=int, default=1024, help="projection size per layer")
    parser.add_argument("--n-test", type=int, default=10, help="test points scored")
    parser.add_argument("--sample-rss", action="store_true", help="sample anonymous and file-backed RSS per phase")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure(args)
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return
    raw = alternate({str(steps): (lambda steps=steps: run_size(steps, args)) for steps in args.steps}, args.runs)
    sizes = [summarise(raw[str(steps)]) for steps in args.steps]
    print_results(sizes, args)
    ratios = growth(sizes)
    print("relative to the smallest T:")
    print_table(["T", "peak", "peak w/o scores", *(f"{p} us/rec" for p in PHASES)],
                [[t, g["peak"], g["peak_without_scores"], *g["us_per_record"].values()] for t, g in ratios.items()])
    write_results("scaling_sampled" if args.sample_rss else "scaling", args, {
        "model": "mnist_mlp", "sizes": MLP_SIZES, "batch": BATCH, "dim": args.dim, "n_test": args.n_test,
        "results": sizes, "growth": ratios})


if __name__ == "__main__":
    main()
