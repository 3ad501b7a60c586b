"""Capture cost of the curvature options, on the MLP of the fidelity study (or the paper's MNIST MLP).

Model 784-128-10 with GELU (``dvemb evaluate fidelity --dataset mnist``'s), batch 32 of
random MNIST-shaped data, mean cross-entropy, plain SGD lr 0.1 by hand, 1024 dims per layer;
``--model paper``: 784-512-256-10 with GELU, batch 64 (the capture benchmark's shapes).
``--optimizer adamw``: torch's AdamW (lr 1e-3, weight decay 0.01) instead, given to the Recorder,
which then also whitens the projected rows and captures the second moment's factors each step.
Each variant trains blocks of steps into a fresh store (made outside the timing, as are the
first steps on which fitted projections are fitted; every block ends with ``Recorder.flush``
so all commits are inside it). Variants alternate in one process on the same model. Reported
per variant: median ms per step, the median over runs of its ratio to the recorded step of
the paper's configuration (gradient outer product, seeded projections) of the same run,
which is the "capture cost" of the fidelity issue, in wall-clock time and in this process's CPU
time (all its threads; less disturbed by other work on a shared machine), and its ratio to a
plain step.

    python benchmarks/curvature_cost.py [--runs 7] [--steps 40] [--model fidelity|paper] [--optimizer adamw]
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Callable

from common import (Batch, Elapsed, alternate, backward, base_parser, configure, elapsed, median, mnist_mlp,
                    print_table, ratios, sgd_step, write_results)

import torch
from torch import nn

import dvemb

MODELS = {"fidelity": ((784, 128, 10), 32), "wide": ((784, 512, 10), 32),  # sizes, batch
          "paper": ((784, 512, 256, 10), 64)}
LR = 0.1
DIM = 1024
PAPER = "paper (gradient outer, gaussian)"
CONFIGS: dict[str, dict] = {
    PAPER: {"curvature": "gradient_outer", "projection": "gaussian"},
    "default (ggn 3 passes, fitted)": {},
    "ggn 2 passes, fitted": {"curvature_samples": 2},
    "ggn 1 pass, fitted": {"curvature_samples": 1},
    "fisher 1 label, fitted": {"curvature": "fisher", "curvature_samples": 1},
    "ggn exact (9 passes), fitted": {"curvature_samples": None},
}
FIT_STEPS = 8


def train(model: nn.Module, batches: list[Batch], rec: dvemb.Recorder | None,
          optimizer: torch.optim.Optimizer | None = None) -> None:
    """Steps over the batches (plain SGD, or ``optimizer``'s), recorded when ``rec`` is given (then flushed)."""
    for t, batch in enumerate(batches):
        if optimizer is None:
            sgd_step(model, batch, rec, first_id=t * len(batch[0]), lr=LR)
            continue
        backward(model, batch, rec, first_id=t * len(batch[0]))
        optimizer.step()
        optimizer.zero_grad()
    if rec is not None:
        rec.flush()


def block(model: nn.Module, batches: list, config: dict | None, root: str,
          optimizer: torch.optim.Optimizer | None = None) -> Elapsed:
    """Time per step of one block: plain when ``config`` is None, else recorded with those Recorder options."""
    if config is None:
        return elapsed(lambda: train(model, batches, None, optimizer)).per(len(batches))
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        rec = dvemb.Recorder(model, Path(tmp) / "store", projection_dim=DIM, fit_steps=FIT_STEPS, optimizer=optimizer,
                             **config)
        try:
            train(model, batches[:FIT_STEPS], rec, optimizer)  # the bases' fit, once per run: not a per-step cost
            return elapsed(lambda: train(model, batches, rec, optimizer)).per(len(batches))
        finally:
            rec.close()


def main() -> None:
    """Time every curvature option against the default and plain steps; print and write JSON."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per timed block")
    parser.add_argument("--store-dir", default=tempfile.gettempdir(), help="where the recorded stores go")
    parser.add_argument("--model", choices=sorted(MODELS), default="fidelity",
                        help="fidelity: 784-128-10, batch 32 (default); wide: 784-512-10, batch 32 "
                             "(the study with --hidden 512); paper: 784-512-256-10, batch 64")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                        help="sgd: plain SGD lr 0.1 by hand (default); adamw: torch's AdamW, lr 1e-3, weight decay 0.01")
    args = parser.parse_args()
    configure(args)
    sizes, batch = MODELS[args.model]
    model = mnist_mlp(0, sizes, nn.GELU)
    optimizer = (torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01) if args.optimizer == "adamw"
                 else None)
    # every block continues the same AdamW run: its moments before a block's store are known to be unknown
    warnings.filterwarnings("ignore", message=".*already has state")
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, sizes[0], generator=gen), torch.randint(0, sizes[-1], (batch,), generator=gen))
               for _ in range(args.steps)]
    timed: dict[str, Callable[[], Elapsed]] = {"plain": lambda: block(model, batches, None, args.store_dir, optimizer)}
    for name, config in CONFIGS.items():
        timed[name] = lambda config=config: block(model, batches, config, args.store_dir, optimizer)
    alternate(timed, 1)  # warm-up
    measured = alternate(timed, args.runs)
    wall = {k: [t.wall for t in v] for k, v in measured.items()}
    cpu = {k: [t.cpu for t in v] for k, v in measured.items()}  # all threads: the writer's and worker's work too
    cases = {name: {"options": CONFIGS[name], "step_ms": 1e3 * median(wall[name]),
                    "cost_vs_paper": median(ratios(wall[name], wall[PAPER])),
                    "cpu_cost_vs_paper": median(ratios(cpu[name], cpu[PAPER])),
                    "ratio_to_plain": median(ratios(wall[name], wall["plain"])),
                    "costs_vs_paper": ratios(wall[name], wall[PAPER]),
                    "cpu_costs_vs_paper": ratios(cpu[name], cpu[PAPER])} for name in CONFIGS}
    print(f"MLP {'-'.join(map(str, sizes))} GELU, {args.optimizer}, batch {batch}, {DIM} dims/layer, "
          f"{torch.get_num_threads()} thread(s), median of {args.runs} runs of {args.steps} steps; "
          f"plain step {1e3 * median(wall['plain']):.3g} ms")
    print_table(["configuration", "ms/step", "x paper's capture", "cpu x paper's", "x plain step"],
                [[n, c["step_ms"], c["cost_vs_paper"], c["cpu_cost_vs_paper"], c["ratio_to_plain"]]
                 for n, c in cases.items()])
    name = f"curvature_cost_{args.model}" + ("_adamw" if optimizer is not None else "")
    write_results(name, args, {"model": args.model, "sizes": sizes, "activation": "gelu", "optimizer": args.optimizer,
                               "batch": batch, "projection_dim": DIM,
                                           "plain_step_ms": 1e3 * median(wall["plain"]), "cases": cases})


if __name__ == "__main__":
    main()
