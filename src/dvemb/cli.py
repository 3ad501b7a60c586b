"""The `dvemb` command: run the demo, inspect a store, compute its embeddings."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from typing import Sequence

from . import Store, StoreError, __version__, compute_embeddings
from .projection import DEFAULT_PROJECTION_DIM

EXIT_ERROR = 2
STORE_COMMANDS = ("info", "embed")  # commands that read a store given on the command line: one line for any failure


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def projection_dim(text: str) -> int | None:
    """argparse type: a projection size per layer, or 'none' for exact per-sample gradients."""
    if text.lower() == "none":
        return None
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'none', got {text!r}") from None


# Studies behind `dvemb evaluate ...` and `dvemb experiment ...`: (module, one-line help). Each module
# exposes add_arguments(parser) and main(args) -> int, and is imported only when its study runs.
STUDIES: dict[str, dict[str, tuple[str, str]]] = {
    "evaluate": {
        "fidelity": ("dvemb.studies.fidelity", "every estimator against replayed training: the paper's "
                                                    "MNIST fidelity study (Spearman/Pearson with 95% intervals)"),
        "lm-fidelity": ("dvemb.studies.lm_fidelity", "a GPT-2 trained with AdamW on a text corpus: every "
                                                          "estimator against replayed training"),
        "ablation": ("dvemb.studies.ablation", "fidelity of each approximation (curvature, blocking, "
                                                    "projection, Adam's second moment) against replayed training"),
    },
    "experiment": {
        "dynamics": ("dvemb.studies.dynamics", "influence of records vs training step: warm-up, basin and "
                                                   "ascent regimes, decay of early influence, top-k evolution"),
        "selection": ("dvemb.studies.selection", "online gradient-alignment data selection in training "
                                                     "windows (none, all, early, late, early+late)"),
        "lm-self": ("dvemb.studies.lm", "GPT-2-style LM on Shakespeare: does DVEmb rank a test sequence's own "
                                            "training records first, per epoch, vs the influence function"),
    },
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `dvemb` command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    try:
        return args.run(args)
    except (StoreError, ValueError, ImportError, OSError) as exc:
        print(f"dvemb {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"dvemb {args.command}: interrupted", file=sys.stderr)
        return 130
    except (RecursionError, MemoryError, ArithmeticError, LookupError, TypeError, RuntimeError) as exc:
        if args.command not in STORE_COMMANDS or os.environ.get("DVEMB_DEBUG"):
            raise
        print(f"dvemb {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} (a bug, or a damaged "
              "store that dvemb failed to recognise; set DVEMB_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_ERROR


def _one_line(exc: BaseException) -> str:
    """An error's message on one line (at most 2,000 characters)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 2000 else text[:1997] + "..."


def _parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvemb",
        description="Training-data attribution with data value embeddings: estimate how much each "
                    "(training step, sample) record changed a test loss.",
        epilog="Exit status: 0 on success, 2 on an error (bad arguments, missing or invalid store, "
               "missing optional dependency). Run 'dvemb COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"dvemb {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="train a digits classifier, attribute test predictions to training records, save a figure",
        description="Train a small MLP with SGD on scikit-learn's 8x8 digits while recording per-sample "
                    "gradients, compute data value embeddings, print each test image's most helpful and "
                    "most harmful training records and save DIR/demo.png (store in DIR/store, replaced on "
                    "each run). Needs the 'demo' extra: pip install 'dvemb[demo]'.")
    demo.add_argument("--out", metavar="DIR", default="dvemb-demo", help="output directory (default: ./dvemb-demo)")
    demo.add_argument("--quick", action="store_true", help="train on a few hundred images only (a few seconds)")
    demo.add_argument("--epochs", type=positive_int, default=3, metavar="N", help="training epochs (default: 3)")
    demo.add_argument("--projection-dim", type=projection_dim, default=DEFAULT_PROJECTION_DIM, metavar="K|none",
                      help="projected gradient size per layer, or 'none' for exact per-sample gradients "
                           f"(default: {str(DEFAULT_PROJECTION_DIM).lower()})")
    demo.add_argument("--seed", type=int, default=0, metavar="S", help="seed of data split, init and batch order "
                                                                       "(default: 0)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(run=_demo)

    info = sub.add_parser("info", help="describe a store: steps, records, layers, embeddings, size",
                          description="Print a summary of the dvemb store in directory STORE.")
    info.add_argument("store", metavar="STORE", help="store directory (as given to dvemb.Recorder)")
    info.set_defaults(run=_info)

    embed = sub.add_parser("embed", help="compute (or recompute) a store's data value embeddings",
                           description="Run the backward recursion (Algorithm 1) over every committed step of "
                                       "STORE, or Algorithm 2 with --checkpoints, and write the embeddings into it.")
    embed.add_argument("store", metavar="STORE", help="store directory")
    embed.add_argument("--precision", choices=("float32", "float64"), default=None,
                       help="arithmetic of the recursion (default: float64 for float64 stores, else float32)")
    embed.add_argument("--checkpoints", type=positive_int, default=None, metavar="K",
                       help="split the run into K segments computed independently and composed (Algorithm 2); "
                            "their boundaries become checkpoints for influence(..., checkpoint=l)")
    embed.add_argument("--blocking", choices=("auto", "layer", "global", "hierarchical"), default="auto",
                       help="which curvature the propagators keep: auto (default: one over all layers when it fits "
                            "--memory, else one per layer plus a global one over each layer's leading coordinates), "
                            "layer (the paper's), global, hierarchical")
    embed.add_argument("--memory", type=positive_int, default=768, metavar="MiB",
                       help="budget for the propagators beyond one per layer (default: 768)")
    embed.add_argument("--second-moment", choices=("followed", "frozen"), default="followed",
                       help="Adam's second moment: followed (default: a record's effect on v is followed, exactly in "
                            "exact layers and factored in projected layers) or frozen (held fixed; cheaper)")
    embed.add_argument("--workers", type=positive_int, default=1, metavar="N",
                       help="processes sharing the segments and layers (default: 1)")
    embed.add_argument("--device", default=None, metavar="DEVICE",
                       help="where the recursion runs: cpu (default), cuda, cuda:N (cuda with --workers N: one GPU each)")
    embed.add_argument("--allow-tf32", action="store_true", help="let float32 products on CUDA use TF32 (faster)")
    embed.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    embed.set_defaults(run=_embed)
    _add_studies(sub, argv)
    return parser


def _add_studies(sub: argparse._SubParsersAction, argv: Sequence[str]) -> None:
    """`dvemb evaluate STUDY` and `dvemb experiment STUDY`; only the invoked study's module is imported."""
    for group, studies in STUDIES.items():
        group_parser = sub.add_parser(group, help=f"{group} studies: {', '.join(studies)}",
                                      description=f"Reproducible {group} studies; each writes JSON and figures.")
        group_sub = group_parser.add_subparsers(dest="study", metavar="STUDY", required=True)
        for name, (module, text) in studies.items():
            study = group_sub.add_parser(name, help=text, description=text)
            if list(argv[:2]) == [group, name]:
                loaded = importlib.import_module(module)
                loaded.add_arguments(study)
                study.set_defaults(run=loaded.main)


def _demo(args: argparse.Namespace) -> int:
    from .studies.demo import run_demo  # the studies load only when asked for

    run_demo(args.out, epochs=args.epochs, projection_dim=args.projection_dim, seed=args.seed, quick=args.quick,
             show_progress=not args.no_progress)
    return 0


def _info(args: argparse.Namespace) -> int:
    from .embed.layout import check_embeddings

    print(Store(args.store).summary(check_embeddings))
    return 0


def _embed(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    info = compute_embeddings(args.store, checkpoints=args.checkpoints, workers=args.workers,
                              precision=args.precision, blocking=args.blocking, memory=args.memory << 20,
                              second_moment=args.second_moment, show_progress=not args.no_progress,
                              device=args.device, allow_tf32=args.allow_tf32)
    print(f"embeddings of {info.committed_records} records over {info.committed_steps} steps "
          f"({info.precision}) written to {info.path} in {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":  # python -m dvemb.cli
    raise SystemExit(main())
