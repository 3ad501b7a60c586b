"""dvemb against dattri's DVEmbAttributor on the same SGD trajectory: fidelity, time, peak memory, store size.

Both estimate trajectory-specific leave-one-out on the mean validation loss of one run of the
fidelity study (``dvemb evaluate fidelity``'s MLP, data, batch order and removals, seed 0), and are
compared with the exact TSLOO from replaying training, in single-epoch and all-epoch removal.

dattri is not a dependency of dvemb. Install it in its own environment, e.g.::

    python -m venv /tmp/dattri-venv --system-site-packages
    /tmp/dattri-venv/bin/pip install --no-deps dattri   # numpy, scipy, tqdm, pyyaml come from the system
    python benchmarks/dattri_fidelity.py --dattri-python /tmp/dattri-venv/bin/python \\
        --dataset mnist --data-dir /work/shared/data/mnist --out results/fidelity/dattri-mnist.json

Each method runs end to end (training with capture, embeddings, test gradients and scores) in a
subprocess of its own, ``--repeats`` times; the median time is reported. Peak memory is
the process's peak resident set while the method runs (Linux VmHWM, reset when it starts), and
its increase over the resident set at the start; the largest over the repeats. Store size:
dvemb's store directory on disk; dattri keeps everything in memory, so its size is the cached
gradients plus the embeddings (in the model's dtype, float64 here; dvemb stores float32 by
default). Both run the paper's method: dvemb with its paper configuration (common.PAPER: gradient
outer-product curvature, Gaussian projections, one block per layer), not its faithful defaults.
Configurations: with ``--projection-dim K`` dvemb projects each layer to about K values (per-layer curvature)
and dattri uses its Kronecker factorisation with ``proj_dim = K * layers`` (its own split: one
k x k block per layer, a global M); with ``--projection-dim none`` both are unprojected (dattri:
full per-sample gradients, a global M over all parameters; only small models fit).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import EMBED_PAPER, PAPER
from dvemb import influence
from dvemb.evaluate import all_epoch_removal, pearson, record_run, single_records, spearman, tsloo
from dvemb.evaluate.fidelity import bootstrap_interval
from dvemb.studies.fidelity import FidelityOptions, build_run

SEED = 0
SETTINGS = ("single_epoch", "all_epoch")


def main() -> int:
    """Parent: ground truth, both workers, correlations and ratios; or one worker with ``--worker``."""
    args = _parser().parse_args()
    options = FidelityOptions(dataset=args.dataset, data_dir=args.data_dir, activation=args.activation,
                              records=args.records, seeds=1, train_size=args.train_size, val_size=args.val_size,
                              hidden=args.hidden, projection_dim=args.projection_dim)
    if args.worker is not None:
        result = WORKERS[args.worker](options)
        Path(args.result).write_text(json.dumps(result))
        return 0
    run = build_run(options, SEED)
    x_val, y_val = _validation(run)
    removals = single_records(run.records) + all_epoch_removal(run.spec, run.samples)
    start = time.perf_counter()
    truth = tsloo(run.spec, removals, lambda m: run.spec.loss(m(x_val), y_val).mean(), show_progress=False)[0]
    truth_seconds = time.perf_counter() - start
    truths = {SETTINGS[0]: truth[: len(run.records)], SETTINGS[1]: truth[len(run.records):]}
    methods = {"dvemb": sys.executable, "dattri": args.dattri_python}
    results = {name: _spawn(python, name, args) for name, python in methods.items()}
    report = _report(options, truths, results, truth_seconds, args.resamples)
    print(_format(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


def run_dvemb(options: FidelityOptions) -> dict[str, object]:
    """dvemb end to end: recorded training, embeddings, scores of every record."""
    run = build_run(options, SEED)
    spec = run.spec
    x_val, y_val = _validation(run)
    before = _reset_peak_rss()
    with tempfile.TemporaryDirectory(prefix="dvemb-bench-") as directory:
        path = Path(directory) / "store"
        start = time.perf_counter()
        model = record_run(spec, path, projection_dim=options.projection_dim, **PAPER)
        result = influence(path, model, lambda: spec.loss(model(x_val), y_val), **EMBED_PAPER)
        seconds = time.perf_counter() - start
        store_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    scores = result.scores.mean(axis=0)
    column = {(int(t), int(i)): k for k, (t, i) in enumerate(zip(result.steps, result.sample_ids))}
    ids, by_sample = result.by_sample()
    by_id = dict(zip(ids.tolist(), by_sample.mean(axis=0)))
    return {"single_epoch": [float(scores[column[r]]) for r in run.records],
            "all_epoch": [float(by_id[i]) for i in run.samples],
            "seconds": seconds, "store_bytes": store_bytes, "rss_before_mib": before, "peak_rss_mib": _peak_rss_mib(),
            "config": {"projection_dim": options.projection_dim, **PAPER, **EMBED_PAPER}}


def run_dattri(options: FidelityOptions) -> dict[str, object]:
    """dattri's DVEmbAttributor end to end on the same run: cache_gradients at every step, cache, attribute."""
    from dattri.algorithm.dvemb import DVEmbAttributor
    from dattri.task import AttributionTask

    run = build_run(options, SEED)
    spec = run.spec
    x_val, y_val = _validation(run)
    torch.set_default_dtype(spec.dtype)  # dattri builds its projectors from default-dtype tensors
    model = spec.build_model()
    params = [p for p in model.parameters() if p.requires_grad]
    n_layers = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    if options.projection_dim is None:  # full per-sample gradients (vmap over one sample at a time)
        def loss(flat_params: dict, sample: tuple) -> torch.Tensor:
            x, y = sample
            return spec.loss(torch.func.functional_call(model, flat_params, (x[None],)), y[None])[0]

        config = {"factorization_type": "none", "proj_dim": None}
    else:  # Kronecker factors from hooks; the loss is the batch mean, as dattri expects
        def loss(net: torch.nn.Module, batch: tuple, device: object) -> torch.Tensor:
            x, y = batch
            return spec.loss(net(x), y).mean()

        config = {"factorization_type": "kronecker", "proj_dim": options.projection_dim * n_layers}
    before = _reset_peak_rss()
    start = time.perf_counter()
    attributor = DVEmbAttributor(AttributionTask(loss, model, model.state_dict()), proj_seed=SEED, **config)
    steps_per_epoch = spec.num_steps // options.epochs
    for t in range(spec.num_steps):
        x, y = spec.step_data(t)
        attributor.cache_gradients(t // steps_per_epoch, (x, y), torch.tensor(spec.batch(t)), spec.lr(t))
        model.zero_grad()
        spec.loss(model(x), y).mean().backward()
        with torch.no_grad():
            for p in params:
                p -= spec.lr(t) * p.grad
    cached = sum(g.nbytes for grads in attributor.cached_gradients.values() for g in grads)
    attributor.cache()
    test = [(x_val, y_val)]
    last = attributor.attribute(test, epoch=options.epochs - 1).mean(dim=1)
    every = attributor.attribute(test).mean(dim=1)
    seconds = time.perf_counter() - start
    embedded = sum(e.nbytes for e in attributor.embeddings.values())
    return {"single_epoch": [float(last[i]) for i in run.samples], "all_epoch": [float(every[i]) for i in run.samples],
            "seconds": seconds, "store_bytes": cached + embedded, "rss_before_mib": before,
            "peak_rss_mib": _peak_rss_mib(), "config": config}


WORKERS = {"dvemb": run_dvemb, "dattri": run_dattri}


def _report(options: FidelityOptions, truths: dict[str, np.ndarray], results: dict[str, dict], truth_seconds: float,
            resamples: int) -> dict[str, object]:
    """Correlations with bootstrap intervals per method and setting, costs, and dattri / dvemb ratios."""
    methods = {}
    for name, result in results.items():
        fidelity = {}
        for setting, truth in truths.items():
            groups = [(np.asarray(result[setting]), truth)]
            fidelity[setting] = {
                "spearman": bootstrap_interval(groups, spearman, resamples=resamples).to_dict(),
                "pearson": bootstrap_interval(groups, pearson, resamples=resamples).to_dict()}
        costs = ("seconds", "all_seconds", "store_bytes", "peak_rss_mib", "peak_rss_increase_mib")
        methods[name] = {"config": result["config"], "fidelity": fidelity, **{k: result[k] for k in costs}}
    ratios = {k: methods["dattri"][k] / methods["dvemb"][k] if methods["dvemb"][k] > 0 else None
              for k in ("seconds", "store_bytes", "peak_rss_mib", "peak_rss_increase_mib")}
    return {"options": options.to_dict(), "seed": SEED, "ground_truth_seconds": truth_seconds,
            "methods": methods, "ratios_dattri_over_dvemb": ratios}


def _format(report: dict[str, object]) -> str:
    """The report as a short text table."""
    lines = [f"{'method':<8}{'setting':<14}{'Spearman [95% CI]':<28}{'Pearson [95% CI]':<28}"]
    for name, method in report["methods"].items():
        for setting, f in method["fidelity"].items():
            lines.append(f"{name:<8}{setting:<14}{_interval(f['spearman']):<28}{_interval(f['pearson']):<28}")
    lines.append("")
    for name, m in report["methods"].items():
        lines.append(f"{name:<8}time {m['seconds']:.2f} s, store {m['store_bytes'] / 2**20:.1f} MiB, peak RSS "
                     f"{m['peak_rss_mib']:.0f} MiB (+{m['peak_rss_increase_mib']:.0f} MiB over the RSS before it)")
    ratios = report["ratios_dattri_over_dvemb"]
    lines.append("dattri / dvemb: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items() if v is not None))
    return "\n".join(lines)


def _interval(d: dict[str, float]) -> str:
    return f"{d['value']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"


def _spawn(python: str, worker: str, args: argparse.Namespace) -> dict[str, object]:
    """Runs one worker ``args.repeats`` times, each in a fresh process: the median time, the peak memories' maxima."""
    runs = []
    with tempfile.TemporaryDirectory() as directory:
        result = Path(directory) / "result.json"
        for _ in range(args.repeats):
            subprocess.run([python, __file__, *sys.argv[1:], "--worker", worker, "--result", str(result)], check=True)
            runs.append(json.loads(result.read_text()))
    return {**runs[0], "seconds": statistics.median(r["seconds"] for r in runs),
            "all_seconds": [r["seconds"] for r in runs],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "peak_rss_increase_mib": max(r["peak_rss_mib"] - r["rss_before_mib"] for r in runs)}


def _validation(run) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's validation data in its dtype."""
    x_val, y_val = run.validation
    return x_val.to(run.spec.dtype), y_val


def _reset_peak_rss() -> float:
    """Resets this process's peak resident memory to its current value (Linux); returns that value in MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _peak_rss_mib()


def _peak_rss_mib() -> float:
    """Peak resident memory of this process since the last reset, in MiB (Linux VmHWM)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _projection_dim(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dattri-python", default="/tmp/dattri-venv/bin/python",
                        help="interpreter of an environment with dattri installed")
    parser.add_argument("--dataset", choices=("digits", "mnist"), default="mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--activation", choices=("relu", "gelu", "tanh"), default="relu")
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--projection-dim", type=_projection_dim, default=1024, metavar="K|none")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each method; the median time is reported")
    parser.add_argument("--out", default=None, help="JSON report path")
    parser.add_argument("--worker", choices=sorted(WORKERS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    sys.exit(main())
