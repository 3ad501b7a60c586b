"""Capture overhead on a tiny GPT-2: training-step time with the Recorder over the plain step time.

Both kinds of step run side by side in one process on the same model and batches, in
alternating order; each run times ``--steps`` steps of each, and the reported ratio is the
median over ``--runs`` runs. A step is forward, loss, backward and an SGD update; the
recorded step also writes its rows to a store (as in real use). The model is the
lm-self experiment's GPT-2 (``dvemb.studies.lm``), tied head and untied head.

    python benchmarks/capture_overhead_lm.py [--runs 7] [--projection-dim 1024 none]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import dvemb
from common import PAPER
from dvemb.studies.lm import GPT2Size, LMSelfConfig, build_gpt2, sequence_losses

DEFAULTS = LMSelfConfig()


def sgd_step(model: torch.nn.Module, tokens: torch.Tensor, lr: float, rec: dvemb.Recorder | None) -> None:
    """One training step, recorded when ``rec`` is given."""
    with rec.step(range(len(tokens)), lr=lr) if rec is not None else nullcontext():
        sequence_losses(model, tokens).mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=-lr)
            p.grad = None


def timed(model: torch.nn.Module, batches: list[torch.Tensor], rec: dvemb.Recorder | None) -> float:
    """Seconds per step over the batches."""
    start = time.perf_counter()
    for tokens in batches:
        sgd_step(model, tokens, 1e-4, rec)
    return (time.perf_counter() - start) / len(batches)


def measure(tie: bool, projection_dim: int | None, args: argparse.Namespace) -> dict:
    """Median ratio (recorded / plain step time) of one configuration over ``args.runs`` runs."""
    model = build_gpt2(args.vocab_size, args.seq_len, GPT2Size(), seed=0, tie_embeddings=tie)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=gen)
               for _ in range(args.steps)]
    plain, recorded = [], []
    with tempfile.TemporaryDirectory() as tmp:
        rec = dvemb.Recorder(model, Path(tmp) / "store", projection_dim=projection_dim,
                             modules="transformer.h.*" if tie else None, **PAPER)
        try:
            timed(model, batches[:args.warmup], None)
            timed(model, batches[:args.warmup], rec)
            for run in range(args.runs):
                for kind in ((None, rec) if run % 2 == 0 else (rec, None)):
                    (plain if kind is None else recorded).append(timed(model, batches, kind))
        finally:
            rec.close()
        layers = rec.layers
    ratios = [r / p for r, p in zip(recorded, plain)]
    return {"tied_head": tie, "projection_dim": projection_dim, "tracked_layers": layers,
            "plain_step_s": statistics.median(plain), "recorded_step_s": statistics.median(recorded),
            "ratio_median": statistics.median(ratios), "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len)
    parser.add_argument("--vocab-size", type=int, default=DEFAULTS.vocab_size)
    parser.add_argument("--projection-dim", nargs="+", default=["256", "1024", "4096", "none"],
                        help="per-layer projection sizes to measure ('none': exact)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine may be shared)")
    parser.add_argument("--out", default="results/lm/capture_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dims = [None if d.lower() == "none" else int(d) for d in args.projection_dim]
    cases = [measure(tie, dim, args) for dim in dims for tie in (True, False)]
    print(f"GPT-2 {GPT2Size()}, vocab {args.vocab_size}, batch {args.batch_size} x {args.seq_len} tokens, "
          f"{args.threads} thread(s), median of {args.runs} runs x {args.steps} steps")
    print(f"{'head':<8} {'projection':>10} {'layers':>6} {'plain ms':>9} {'recorded ms':>12} {'ratio':>6}")
    for c in cases:
        print(f"{'tied' if c['tied_head'] else 'untied':<8} {str(c['projection_dim']):>10} "
              f"{len(c['tracked_layers']):>6} {1e3 * c['plain_step_s']:>9.1f} {1e3 * c['recorded_step_s']:>12.1f} "
              f"{c['ratio_median']:>6.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    out.write_text(json.dumps({"benchmark": "capture_overhead_lm", "settings": settings,
                               "torch": torch.__version__, "machine": platform.machine(), "cases": cases}, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
