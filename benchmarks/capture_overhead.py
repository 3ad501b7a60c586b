"""Capture overhead: recorded training step over plain training step, on the paper's MNIST MLP.

Model 784-512-256-10 (ReLU), batch 64 of random data, mean cross-entropy, plain SGD by
hand. Variants, timed in blocks of steps alternating in one process on the same model:

- ``plain``: forward, backward, update; no dvemb object exists.
- ``capture``: the same with dvemb's hooks and projection (GhostCapture) but no store.
- ``recorded``: everything the Recorder does per step (hooks, projection, checks, and
  the store's writes and commits on disk, which its writer thread overlaps with training);
  each block ends with ``Recorder.flush``, so every step's commit is inside the timing.
- ``recorded_tmpfs``: the same with the store on tmpfs (no disk, no journal).
- ``recorded_nowrite``: the Recorder's training-thread work (hooks, projection, host copies and
  checks) with the steps dropped instead of handed to the writer thread: with ``capture`` and
  ``recorded`` it splits the overhead into projection, Recorder bookkeeping and the writer thread.

A fresh Recorder (and store) is made for each block, outside the timed region. Ratios are
the median over runs of (variant / plain) of the same run, for wall-clock time and for this
process's CPU time (user + system), which other work on a shared machine disturbs less.
``--profile`` also times the parts of the recorded step in place (wrapping the functions
in SPANS with timers, alternating with plain steps) and prints where the time goes.

    python benchmarks/capture_overhead.py [--runs 7] [--dims 256 1024 4096 none] [--profile]
        [--threads 2] [--suffix _quiet] [--note "..."]

At torch's default thread count on a 2-CPU machine (2 threads; issue 14 item 7), measured with
OPENBLAS_NUM_THREADS=1 at 1024 values per layer (results/capture_overhead_threads2_quiet.json,
_threads2.json and _threads1.json, with the load averages around each run):

- with the machine otherwise idle (1-minute load 1.0-1.3, this benchmark included; 2026-12-06,
  seven runs of 7 blocks each): plain 1.4-2.6 ms per step; ``capture`` x1.25-1.32 (hooks and
  projection), ``recorded_nowrite`` x1.42-1.53 (plus the Recorder's copies, checks and
  bookkeeping in the training thread), ``recorded`` x1.66-1.94 (plus the writer thread: 0.24 ms
  per step writing 0.79 MB of rows to the page cache, 0.08 ms of manifest commits). At 1 thread
  the projection and the writer can use the second CPU: x1.17 in capture_overhead.json (an
  earlier, quieter machine); x1.31-1.9 in today's runs, where other jobs often held that CPU
  (capture_overhead_threads1.json: x1.44, load ~1 around it).
- the floor is set by the number of operators, not arithmetic: a recorded step dispatches 250
  torch operators (41 that compute: matmuls, elementwise, copies) against the plain step's 121
  (28), counted with torch.profiler (``aten_ops_per_step``, independent of load). The projections
  add ~6 MFLOP to the plain step's ~150 MFLOP, but each of the 13 added kernels is a parallel
  region whose fork-join costs about what a plain kernel of this small MLP costs at 2 threads, so
  the capture alone already costs x1.25-1.3; the writer thread's copy of each step's rows into the
  page cache then runs on a core torch's threads need. x1.3 would need the capture's kernels, the
  bookkeeping and the write to fit in 30% of a 1.5-2.5 ms step; measured they take 60-90%.
  What helps: 1 torch thread (x1.17), bfloat16 storage (half the bytes written), larger batches
  or models (the same operator count over more arithmetic). Not: glibc keeping freed memory
  (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_: no change in three paired runs).
- on a loaded machine (other jobs on the 2 cores, load ~4) every parallel region waits for a
  descheduled thread: the plain step takes 8-20 ms and the ratio swings from 1.5 to 15
  (capture_overhead_threads2.json was measured so).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from common import (BATCH, MLP_SIZES, PAPER, Batch, Elapsed, alternate, base_parser, configure, elapsed, median,
                    mnist_mlp, print_table, random_batches, ratios, sgd_step, write_results)

import torch
from torch import nn

import dvemb
from dvemb.capture.ghost import GhostCapture
from dvemb.capture.selection import layer_spec, select_modules
from dvemb.store import LayerSpec
from dvemb.capture import recorder as recorder_module
from dvemb.store import AppendableArray, BackgroundWriter, StoreWriter

EXACT_STEPS = 10  # steps per block without projection: each step writes ~137 MB

# In-situ profile: label -> (owner, function name) timed while a recorded block runs. The first
# CRITICAL ones run in the training thread; the rest run in the Recorder's writer thread,
# overlapping with training (they cost training time only when the hand-off has to wait).
SPANS: dict[str, tuple[object, str]] = {
    "hooks + projection (GhostCapture._on_grad)": (GhostCapture, "_on_grad"),
    "collect rows (GhostCapture.collect)": (GhostCapture, "collect"),
    "to numpy (store.to_numpy)": (recorder_module, "to_numpy"),
    "finite check (store.all_finite)": (recorder_module, "all_finite"),
    "hand-off to writer (BackgroundWriter.append_step)": (BackgroundWriter, "append_step"),
    "wait for last commits (Recorder.flush)": (dvemb.Recorder, "flush"),
    "writer thread: commit (StoreWriter.append_step)": (StoreWriter, "append_step"),
    "  write rows (AppendableArray.append)": (AppendableArray, "append"),
    "  flush to OS (AppendableArray.flush)": (AppendableArray, "flush"),
    "  manifest (StoreWriter._write_manifest)": (StoreWriter, "_write_manifest"),
    "    os.replace": (os, "replace"),
}
CRITICAL = tuple(SPANS)[:6]


def specs(model: nn.Module, dim: int | None) -> list[LayerSpec]:
    """The tracked layers' specs as a Recorder with seed 0 builds them."""
    return [layer_spec(name, module, dim, 0, "gaussian") for name, module in select_modules(model)]


def train(model: nn.Module, batches: list[Batch], rec: dvemb.Recorder | None = None) -> None:
    """SGD steps over the batches; when recorded, also wait until the recorder has committed them all."""
    for t, batch in enumerate(batches):
        sgd_step(model, batch, rec, first_id=t * BATCH)
    if rec is not None:
        rec.flush()


def plain_block(model: nn.Module, batches: list[Batch]) -> Elapsed:
    """Time per plain step."""
    return elapsed(lambda: train(model, batches)).per(len(batches))


def recorded_block(model: nn.Module, batches: list[Batch], dim: int | None, root: str, write: bool = True
                   ) -> Elapsed:
    """Time per recorded step, with a fresh Recorder and store under ``root`` made outside the timing
    (``write=False``: steps are dropped where they would be handed to the writer thread)."""
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        rec = dvemb.Recorder(model, Path(tmp) / "store", projection_dim=dim, **PAPER)
        if not write:
            rec._sink.append = lambda step, n_total: None
        try:
            return elapsed(lambda: train(model, batches, rec)).per(len(batches))
        finally:
            rec.close()


def capture_block(model: nn.Module, batches: list[Batch], dim: int | None) -> Elapsed:
    """Time per step with dvemb's hooks and projection collecting rows, but no store."""
    capture = GhostCapture(model, [m for _, m in select_modules(model)], specs(model, dim))

    def steps() -> None:
        """Train on every batch, collecting each step's rows."""
        for batch in batches:
            capture.begin(scale=BATCH)  # as the Recorder does under mean reduction
            sgd_step(model, batch)
            capture.collect(n_rows=BATCH)

    capture.attach()
    try:
        return elapsed(steps).per(len(batches))
    finally:
        capture.detach()


def variants(model: nn.Module, batches: list[Batch], dim: int | None, args: argparse.Namespace
             ) -> dict[str, Callable[[], Elapsed]]:
    """The timed variants of one projection size."""
    out = {
        "plain": lambda: plain_block(model, batches),
        "capture": lambda: capture_block(model, batches, dim),
        "recorded": lambda: recorded_block(model, batches, dim, args.store_dir),
    }
    if args.tmpfs_dir:
        out["recorded_tmpfs"] = lambda: recorded_block(model, batches, dim, args.tmpfs_dir)
    out["recorded_nowrite"] = lambda: recorded_block(model, batches, dim, args.store_dir, write=False)
    return out


def measure(dim: int | None, args: argparse.Namespace) -> dict:
    """Median step times and ratios to plain (wall-clock and CPU) of every variant at one projection size."""
    model = mnist_mlp()
    steps = args.steps if dim is not None else EXACT_STEPS
    batches = list(random_batches(steps))
    timed = variants(model, batches, dim, args)
    alternate(timed, 1)  # warm-up: allocator, page cache
    times = alternate(timed, args.runs)
    wall = {k: [t.wall for t in v] for k, v in times.items()}
    cpu = {k: [t.cpu for t in v] for k, v in times.items()}
    others = [k for k in times if k != "plain"]
    return {
        "projection_dim": dim, "layer_dims": {spec.name: spec.dim for spec in specs(model, dim)},
        "steps_per_block": steps, "step_ms": {k: 1e3 * median(v) for k, v in wall.items()},
        "cpu_step_ms": {k: 1e3 * median(v) for k, v in cpu.items()},
        "ratio": {k: median(ratios(wall[k], wall["plain"])) for k in others},
        "cpu_ratio": {k: median(ratios(cpu[k], cpu["plain"])) for k in others},
        "ratios": {k: ratios(wall[k], wall["plain"]) for k in others},
    }


def timed_method(method: Callable, label: str, totals: dict[str, float]) -> Callable:
    """``method`` adding its wall-clock seconds to ``totals[label]``."""

    @functools.wraps(method)
    def wrapper(*args: object, **kwargs: object) -> object:
        """Call ``method`` and add its time."""
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            totals[label] = totals.get(label, 0.0) + time.perf_counter() - start

    return wrapper


@contextlib.contextmanager
def instrumented(totals: dict[str, float]) -> Iterator[None]:
    """Time every SPANS function into ``totals`` while inside; the originals are restored on exit."""
    originals = {label: getattr(owner, name) for label, (owner, name) in SPANS.items()}
    for label, (owner, name) in SPANS.items():
        setattr(owner, name, timed_method(originals[label], label, totals))
    try:
        yield
    finally:
        for label, (owner, name) in SPANS.items():
            setattr(owner, name, originals[label])


def profile(dim: int | None, args: argparse.Namespace) -> dict[str, float]:
    """Median milliseconds per step of plain, recorded and each SPANS part of the recorded step (in situ)."""
    model = mnist_mlp()
    batches = list(random_batches(args.steps if dim is not None else EXACT_STEPS))

    def spans() -> dict[str, float]:
        """One instrumented recorded block: ms per step of the block and of each span."""
        totals: dict[str, float] = {}
        with instrumented(totals):
            totals["recorded step"] = recorded_block(model, batches, dim, args.store_dir).wall * len(batches)
        return {label: 1e3 * totals.get(label, 0.0) / len(batches) for label in ("recorded step", *SPANS)}

    timed = {"plain": lambda: {"plain step": 1e3 * plain_block(model, batches).wall}, "recorded": spans}
    alternate(timed, 1)  # warm-up
    runs = alternate(timed, args.runs)
    rows = [{**p, **r} for p, r in zip(runs["plain"], runs["recorded"])]
    for row in rows:
        row["other Recorder work (training thread)"] = (row["recorded step"] - row["plain step"]
                                                        - sum(row[s] for s in CRITICAL))
    return {label: median([row[label] for row in rows]) for label in rows[0]}


def op_counts(dim: int | None, args: argparse.Namespace, steps: int = 20) -> dict[str, float]:
    """Operators torch dispatches per step, plain and recorded (``torch.profiler``; independent of load).

    Both variants run the same forward and backward; the recorded step adds the capture's small
    projections. With 2 threads on 2 cores each parallel operator pays a fork-join whatever its
    size, so these counts, not the projections' arithmetic, set the overhead at the default threads.
    """
    from torch.profiler import ProfilerActivity, profile as torch_profile

    model = mnist_mlp()
    batches = list(random_batches(steps + 5))

    def count(rec: dvemb.Recorder | None) -> dict[str, float]:
        for t in range(5):
            sgd_step(model, batches[t], rec, first_id=t * BATCH)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for t in range(5, 5 + steps):
                sgd_step(model, batches[t], rec, first_id=t * BATCH)
        events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        heavy = ("aten::addmm", "aten::mm", "aten::bmm", "aten::mul", "aten::add", "aten::copy_", "aten::threshold_backward",
                 "aten::relu", "aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::nll_loss_forward",
                 "aten::nll_loss_backward", "aten::sum", "aten::add_")
        return {"all": sum(e.count for e in events) / steps,
                "kernels": sum(e.count for e in events if e.key in heavy) / steps}

    plain = count(None)
    with tempfile.TemporaryDirectory(dir=args.store_dir) as tmp:
        rec = dvemb.Recorder(model, Path(tmp) / "store", projection_dim=dim, **PAPER)
        try:
            recorded = count(rec)
        finally:
            rec.close()
    return {"plain_ops": plain["all"], "recorded_ops": recorded["all"], "plain_kernels": plain["kernels"],
            "recorded_kernels": recorded["kernels"]}


def parse_dims(values: list[str]) -> list[int | None]:
    """Projection sizes from the command line ('none': exact gradients)."""
    return [None if v.lower() == "none" else int(v) for v in values]


def print_results(cases: list[dict], args: argparse.Namespace) -> None:
    """The table of step times and ratios."""
    print(f"MLP {'-'.join(map(str, MLP_SIZES))}, batch {BATCH}, {torch.get_num_threads()} thread(s), "
          f"median of {args.runs} runs; ratios to the plain step of the same run (x: wall-clock, cpu x: CPU time)")
    names = list(cases[0]["ratio"])
    print_table(["dim/layer", "dims", "plain ms", "recorded ms", *(f"{n} x" for n in names),
                 *(f"{n} cpu x" for n in names)],
                [[str(c["projection_dim"]), "+".join(map(str, c["layer_dims"].values())), c["step_ms"]["plain"],
                  c["step_ms"]["recorded"], *(c["ratio"][n] for n in names), *(c["cpu_ratio"][n] for n in names)]
                 for c in cases])


def main() -> None:
    """Measure every projection size, print the tables and write JSON."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help=f"steps per timed block (exact gradients: {EXACT_STEPS})")
    parser.add_argument("--dims", nargs="+", default=["256", "1024", "4096", "none"], help="per-layer projection sizes")
    parser.add_argument("--store-dir", default=tempfile.gettempdir(), help="where the recorded stores go (disk)")
    parser.add_argument("--tmpfs-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else "",
                        help="tmpfs directory for the recorded_tmpfs variant ('' to skip it)")
    parser.add_argument("--profile", action="store_true", help="also time the parts of the recorded step")
    parser.add_argument("--note", default="", help="a remark stored with the results (e.g. what else ran)")
    args = parser.parse_args()
    configure(args)
    dims = parse_dims(args.dims)
    cases = [measure(dim, args) for dim in dims]
    print_results(cases, args)
    payload: dict = {"model": "mnist_mlp", "sizes": MLP_SIZES, "batch": BATCH, "store_dir": args.store_dir,
                     "tmpfs_dir": args.tmpfs_dir, "load_before": os.getloadavg(), "cases": cases}
    if args.profile:
        payload["profile_ms_per_step"] = {str(dim): profile(dim, args) for dim in dims}
        payload["aten_ops_per_step"] = {str(dim): op_counts(dim, args) for dim in dims}
        print("\ntorch operators per step (aten::*, and those that compute: matmuls, elementwise, copies):",
              payload["aten_ops_per_step"])
        print(f"\nwhere the recorded step's time goes: ms per step, medians of {args.runs} runs alternating with plain "
              "steps; timers wrap the functions in place (nested rows are part of the row above)")
        print_table(["span", *payload["profile_ms_per_step"]],
                    [[s, *(p[s] for p in payload["profile_ms_per_step"].values())]
                     for s in next(iter(payload["profile_ms_per_step"].values()))])
    payload["note"] = args.note
    payload["load_after"] = os.getloadavg()  # 1, 5, 15-minute load averages: other work on the machine
    write_results("capture_overhead", args, payload)


if __name__ == "__main__":
    main()
