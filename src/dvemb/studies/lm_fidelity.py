"""`dvemb evaluate lm-fidelity`: data value embeddings of a GPT-2 trained with AdamW, against replayed training.

A small GPT-2 (Hugging Face ``GPT2LMHeadModel``, random init, no dropout, untied head) is trained
from scratch with AdamW on fixed-length windows of a corpus (the Shakespeare plays from a
``.tar.gz``, or CPython's pydoc topics), in float64. A sample's loss is its window's mean
next-token cross-entropy. For a random set of training windows, every method's estimate of
removing the window's last-epoch record (single-epoch removal) and all its records (all-epoch
removal) on the mean validation loss is compared with the exact TSLOO obtained by replaying
training with torch's AdamW (float64), as in ``dvemb evaluate fidelity``.

Methods: DVEmb with the Recorder's defaults (fitted projections, Gauss-Newton rank-3 with
per-token factors, AdamW whitening) and ``compute_embeddings``'s default blocking; DVEmb with
the paper's configuration (gradient outer product, seeded Gaussian projections, one K per
layer); TracIn-CP; the gradient dot product; the exact first-order ceiling.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..capture.curvature import logits_of
from ..evaluate.baselines import exact_first_order, grad_dot, tracin_cp
from ..evaluate.fidelity import ALL_EPOCH, SINGLE, FidelityResult, evaluate_fidelity, jsonable_config
from ..evaluate.replay import TrainingSpec
from ..update import Adam
from ..cli import positive_int
from .fidelity import SETTING_LABELS, config_argument, summarise, with_extras
from .lm import GPT2Size, build_gpt2
from .text import corpus_name, tokenized_windows

PAPER = {"curvature": "gradient_outer", "projection": "gaussian", "blocking": "layer"}


@dataclass(frozen=True)
class LMFidelityOptions:
    """Everything that defines the study; stored with its results."""

    data: str | None = None
    vocab_size: int = 512
    seq_len: int = 32
    n_train: int = 256
    n_val: int = 64
    records: int = 64
    seeds: int = 3
    epochs: int = 3
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.01
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    projection_dim: int = 1024
    extra_configs: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    resamples: int = 1000

    def __post_init__(self) -> None:
        if self.records > self.n_train:
            raise ValueError(f"{self.records} records asked from {self.n_train} training windows")


def sequence_loss(outputs: object, targets: torch.Tensor) -> torch.Tensor:
    """Each window's mean next-token cross-entropy, [n] (the model's logits predict the next token)."""
    logits = logits_of(outputs)
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), targets[:, 1:], reduction="none").mean(1)


def build_run(options: LMFidelityOptions, tokens: np.ndarray, seed: int):
    """The seed's training and validation windows, GPT-2 factory, batches and removals."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(tokens), options.n_train + options.n_val, replace=False)
    train_ids, val_ids = chosen[: options.n_train], chosen[options.n_train:]
    x = torch.from_numpy(tokens[train_ids])
    x_val = torch.from_numpy(tokens[val_ids])
    size = GPT2Size(options.n_layer, options.n_embd, options.n_head)

    def factory() -> nn.Module:
        model = build_gpt2(options.vocab_size, options.seq_len, size, seed=seed, tie_embeddings=False)
        model.config._attn_implementation = "eager"  # vmap-friendly attention for the replay
        return model

    generator = torch.Generator().manual_seed(seed)
    per_epoch = [torch.randperm(options.n_train, generator=generator).split(options.batch_size)
                 for _ in range(options.epochs)]
    batches = [b.tolist() for epoch in per_epoch for b in epoch]
    spec = TrainingSpec(factory, x, x, batches, options.lr, loss=sequence_loss,
                        update=Adam(weight_decay=options.weight_decay))
    samples = sorted(rng.choice(options.n_train, options.records, replace=False).tolist())
    last_epoch = range(len(batches) - len(per_epoch[-1]), len(batches))
    step_of = {i: t for t in last_epoch for i in spec.batch(t)}
    return spec, (x_val, x_val), [(step_of[i], i) for i in samples], samples


def run_study(options: LMFidelityOptions, show_progress: bool = False) -> dict:
    """Every seed's fidelity result, summarised per setting and method."""
    start = time.perf_counter()
    configs = with_extras({"dvemb": {"projection_dim": options.projection_dim},  # names checked before any work
                           "dvemb-paper": {"projection_dim": options.projection_dim, **PAPER}},
                          options.extra_configs, options.projection_dim)
    _, tokens = tokenized_windows(options.data, options.vocab_size, options.seq_len)
    baselines = {"tracin-cp": tracin_cp, "grad-dot": grad_dot, "exact-first-order": exact_first_order}
    results: list[FidelityResult] = []
    for seed in range(options.seeds):
        spec, validation, records, samples = build_run(options, tokens, seed)
        print(f"seed {seed}: {spec.num_steps} AdamW steps, {len(samples)} windows", flush=True)
        results.append(evaluate_fidelity(spec, validation, records=records, samples=samples, dvemb_configs=configs,
                                         baselines=baselines, resamples=options.resamples, seed=seed,
                                         show_progress=show_progress))
    summary = summarise(results, options.resamples)
    stored = {**asdict(options), "extra_configs": {n: jsonable_config(c) for n, c in options.extra_configs.items()}}
    return {"options": stored, "source": corpus_name(options.data),
            "windows": len(tokens), "seconds": time.perf_counter() - start,
            "summary": {s: [m.to_dict() for m in methods] for s, methods in summary.items()},
            "seeds": [r.to_dict() for r in results]}


def format_table(result: dict) -> str:
    """Markdown: methods x settings, Spearman and Pearson (mean over seeds, 95% interval)."""
    o = result["options"]
    lines = [f"GPT-2 {o['n_layer']} layers x {o['n_embd']}, {o['n_train']} windows of {o['seq_len']} tokens "
             f"({result['source']}), AdamW lr {o['lr']} weight decay {o['weight_decay']}, {o['epochs']} epochs; "
             f"{o['records']} windows x {o['seeds']} seeds", "",
             f"| method | {SETTING_LABELS[SINGLE]} Spearman | Pearson | {SETTING_LABELS[ALL_EPOCH]} Spearman | Pearson |",
             "| --- | --- | --- | --- | --- |"]
    by_setting = {s: {m["method"]: m for m in methods} for s, methods in result["summary"].items()}
    for name in by_setting[SINGLE]:
        cells = []
        for s in (SINGLE, ALL_EPOCH):
            m = by_setting[s][name]
            sp = m["spearman"]
            cells += [f"{sp['value']:.3f} [{sp['low']:.3f}, {sp['high']:.3f}]", f"{m['pearson']['value']:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of `dvemb evaluate lm-fidelity` to ``parser``."""
    parser.add_argument("--data", metavar="PATH", default=None,
                        help="a .tar.gz of plain-text files, e.g. the Shakespeare plays (default: CPython's pydoc topics)")
    parser.add_argument("--seeds", type=positive_int, default=3, metavar="N")
    parser.add_argument("--records", type=positive_int, default=64, metavar="N")
    parser.add_argument("--out", metavar="DIR", default="lm-fidelity-results")
    parser.add_argument("--config", action="append", default=[], metavar="NAME=JSON", type=config_argument,
                        help="an extra DVEmb configuration, as in `dvemb evaluate fidelity --config` (repeatable)")
    parser.add_argument("--quick", action="store_true", help="a small run for smoke tests")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def main(args: argparse.Namespace) -> int:
    """Runs the study; prints the table and writes JSON and Markdown."""
    options = LMFidelityOptions(data=args.data, seeds=args.seeds, records=args.records,
                                extra_configs=dict(args.config))
    if args.quick:
        options = replace(options, vocab_size=300, seq_len=16, n_train=48, n_val=16, records=8, seeds=1,
                          n_embd=16, n_head=2, n_layer=1, resamples=100, projection_dim=64)
    result = run_study(options, show_progress=not args.no_progress)
    table = format_table(result)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm-fidelity.json").write_text(json.dumps(result, indent=1))
    (out / "lm-fidelity.md").write_text(table + "\n")
    print(f"\nwall time {result['seconds']:.0f} s; wrote {out / 'lm-fidelity.json'} and .md")
    return 0
