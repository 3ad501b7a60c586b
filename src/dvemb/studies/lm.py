"""`dvemb experiment lm-self`: does attribution find a test sequence's verbatim copy in the training set?

A small GPT-2 (Hugging Face ``GPT2LMHeadModel``, random init, no dropout, untied head) and a
byte-level BPE are trained from scratch on fixed-length windows of a local corpus
(Shakespeare's plays from a ``.tar.gz``, or CPython's pydoc topics). Training has two
phases: Adam on windows outside the training set (not recorded), then plain SGD over the
training set for a few epochs, every step recorded by a :class:`dvemb.Recorder` that saves
the model at each epoch boundary. Without the first phase, three epochs of SGD leave the
model near unigram statistics, where every sequence's gradient shares one dominant
direction and gradient-similarity scores favour large-gradient sequences over the copy.

The test points are verbatim copies of training windows. After each epoch l the records
used so far are ranked by DVEmb relative to the checkpoint after epoch l (Algorithm 2 with
the epoch boundaries as checkpoints), and the training samples by an influence function at
that checkpoint (LoGra-style: the same projected per-sample gradients, a damped empirical
Fisher per layer). The study reports where the copy lands: for DVEmb the rank of its most
recent record, of each of its records, and of the sample (its records summed); for the
influence function the rank of the sample. A JSON file holds every number; an HTML page
shows the top-3 training sequences per method and epoch for a few test points, with the
words they share with the test point highlighted.

Sample loss convention: every window has the same length, so the batch loss (the mean
token cross-entropy) is the mean of the windows' own mean token losses and ``w = 1/B``
holds exactly; a test point's loss is its window's mean token loss.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import Recorder, compute_embeddings, influence, load_checkpoint
from ..evaluate.baselines import damped_fisher_solve
from ..progress import ProgressBar
from ..query import query_gradients
from ..store import Store
from .text import corpus_name, highlight, tokenized_windows, words

TOP_K = 3
METHODS = {
    "dvemb_record": "DVEmb, the copy's most recent record among all records",
    "dvemb_sample": "DVEmb summed over each sample's records, the copy among all samples",
    "influence_function": "influence function at the checkpoint, the copy among all samples",
}


@dataclass(frozen=True)
class GPT2Size:
    """Shape of a small GPT-2."""

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4


def build_gpt2(vocab_size: int, n_positions: int, size: GPT2Size = GPT2Size(), seed: int = 0,
               tie_embeddings: bool = True) -> nn.Module:
    """A randomly initialised Hugging Face ``GPT2LMHeadModel`` without dropout (needs transformers).

    GPT-2 ties ``lm_head.weight`` to the token embedding; ``tie_embeddings=False`` gives the
    head its own weight, so it can be tracked and the model saved as safetensors.
    """
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise ImportError("the language-model experiments need transformers: pip install 'dvemb[hf]'") from None
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_layer=size.n_layer, n_embd=size.n_embd,
                        n_head=size.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=tie_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # the class name does not tell transformers which loss it uses
    return model


def sequence_losses(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean next-token cross-entropy, [n]."""
    logits = model(input_ids=input_ids).logits[:, :-1]
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none")
    return per_token.view(input_ids.shape[0], -1).mean(1)


@dataclass(frozen=True)
class LMSelfConfig:
    """Settings of the self-influence study (saved with its results)."""

    data: str | None = None  # .tar.gz of plain-text files; None: CPython's pydoc topics
    out: str = "results/lm"
    store: str = "runs/lm-self"
    vocab_size: int = 2048
    seq_len: int = 64
    n_train: int = 2048
    n_test: int = 24
    epochs: int = 3
    batch_size: int = 16
    lr: float = 0.5
    pretrain_steps: int = 1000  # Adam steps on windows outside the training set, not recorded
    pretrain_lr: float = 3e-3
    projection_dim: int | None = 256
    size: GPT2Size = field(default_factory=GPT2Size)
    damping: float = 0.1
    n_shown: int = 4
    seed: int = 0
    show_progress: bool = True


@dataclass(frozen=True)
class Corpus:
    """Training windows (token ids and text) and which of them the test points copy."""

    source: str
    n_windows: int
    tokens: torch.Tensor  # [n_train, seq_len] int64; sample id = row
    held_out: torch.Tensor  # the other windows, for pre-training
    texts: list[str]
    test_ids: np.ndarray  # [n_test] sample ids of the copied windows


@dataclass(frozen=True)
class Ranked:
    """One method at one checkpoint: the copy's rank and the top entries per test point."""

    ranks: np.ndarray  # [n_test], 1 = ranked first
    top: list[list[dict]]  # per test point, TOP_K entries {sample_id, step?, epoch?, score}


@dataclass(frozen=True)
class EpochResult:
    """Every method after one epoch, and DVEmb's rank of each of the copy's records."""

    methods: dict[str, Ranked]
    use_ranks: np.ndarray  # [n_test, epoch]: rank among all records of the copy's record of each epoch


def prepare_corpus(cfg: LMSelfConfig) -> Corpus:
    """The training windows, the held-out windows and the test copies, all seeded."""
    tokenizer, pool = tokenized_windows(cfg.data, cfg.vocab_size, cfg.seq_len)
    if len(pool) < cfg.n_train:
        raise ValueError(f"the corpus has {len(pool)} distinct windows of {cfg.seq_len} tokens; n_train={cfg.n_train}")
    if not 1 <= cfg.n_test <= cfg.n_train:
        raise ValueError(f"n_test must lie in [1, n_train={cfg.n_train}], got {cfg.n_test}")
    rng = np.random.default_rng(cfg.seed)
    chosen = np.sort(rng.choice(len(pool), cfg.n_train, replace=False))
    tokens = torch.from_numpy(pool[chosen])
    held_out = torch.from_numpy(np.delete(pool, chosen, axis=0))
    texts = [tokenizer.decode(row.tolist()) for row in tokens]
    test_ids = np.sort(rng.choice(cfg.n_train, cfg.n_test, replace=False))
    return Corpus(corpus_name(cfg.data), len(pool), tokens, held_out, texts, test_ids)


def pretrain(model: nn.Module, tokens: torch.Tensor, cfg: LMSelfConfig) -> float:
    """Adam on random batches of ``tokens`` for ``cfg.pretrain_steps`` steps (not recorded); returns the last loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.pretrain_lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    loss = torch.tensor(float("nan"))
    for _ in ProgressBar(range(cfg.pretrain_steps), desc="pre-training", unit="step", disable=not cfg.show_progress):
        batch = tokens[torch.randint(len(tokens), (cfg.batch_size,), generator=gen)]
        loss = sequence_losses(model, batch).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()


def train(model: nn.Module, tokens: torch.Tensor, store: Path, cfg: LMSelfConfig) -> tuple[int, list[float]]:
    """Plain SGD over a seeded shuffle per epoch, recorded; returns (steps per epoch, mean loss per epoch)."""
    params = [p for p in model.parameters() if p.requires_grad]
    per_epoch = math.ceil(len(tokens) / cfg.batch_size)
    order = torch.Generator().manual_seed(cfg.seed)
    losses = []
    boundaries = [e * per_epoch for e in range(1, cfg.epochs)]
    with Recorder(model, store, projection_dim=cfg.projection_dim, seed=cfg.seed,
                  save_checkpoints=boundaries) as rec:
        for epoch in range(cfg.epochs):
            perm = torch.randperm(len(tokens), generator=order)
            total = 0.0
            for ids in ProgressBar(perm.split(cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                                   disable=not cfg.show_progress):
                with rec.step(ids, lr=cfg.lr):
                    loss = sequence_losses(model, tokens[ids]).mean()
                    loss.backward()
                with torch.no_grad():
                    for p in params:
                        p.add_(p.grad, alpha=-cfg.lr)
                        p.grad = None
                total += loss.item() * len(ids)
            losses.append(total / len(tokens))
    return per_epoch, losses


def projected_gradients(store: Store, model: nn.Module, tokens: torch.Tensor, chunk: int = 256) -> list[torch.Tensor]:
    """Per-layer projected gradients [n, dim] of each window's own loss at the model, with the store's projections."""
    parts = [query_gradients(store, model, lambda: sequence_losses(model, tokens[k:k + chunk]))[0]
             for k in range(0, len(tokens), chunk)]
    return [torch.cat(layer).double() for layer in zip(*parts)]


def influence_function_scores(train_grads: list[torch.Tensor], test_grads: list[torch.Tensor],
                              damping: float) -> np.ndarray:
    """``sum_l g_test^T (F_l + lambda_l I)^-1 g_i`` with F_l the layer's empirical Fisher, [n_test, n_train].

    ``lambda_l`` is ``damping`` times the mean eigenvalue of F_l. The scores are the influence
    function's estimate of the test-loss increase from removing a sample, up to a positive
    factor shared by all samples.
    """
    scores = torch.zeros(test_grads[0].shape[0], train_grads[0].shape[0], dtype=torch.float64)
    for g_train, g_test in zip(train_grads, test_grads):
        scores += damped_fisher_solve(g_train, g_test, damping).T @ g_train.T
    return scores.numpy()


def rank_of(scores: np.ndarray, column: np.ndarray) -> np.ndarray:
    """Per row, 1 + the number of entries scoring strictly above the entry in ``column``."""
    own = scores[np.arange(len(scores)), column]
    return 1 + (scores > own[:, None]).sum(1)


def top_entries(scores: np.ndarray, describe: Callable[[int], dict]) -> list[list[dict]]:
    """The TOP_K highest-scoring columns of each row, as ``describe(column) | {score}`` dicts."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :TOP_K]
    return [[{**describe(int(c)), "score": float(scores[r, c])} for c in row] for r, row in enumerate(order)]


def evaluate_epoch(store: Path, model: nn.Module, corpus: Corpus, epoch: int, per_epoch: int,
                   damping: float) -> EpochResult:
    """Rank the copies after ``epoch`` (1-based) with each method, the model holding that checkpoint."""
    tests = corpus.tokens[corpus.test_ids]
    inf = influence(store, model, lambda: sequence_losses(model, tests), checkpoint=epoch - 1)
    uses = np.stack([np.flatnonzero(inf.sample_ids == i) for i in corpus.test_ids])  # one record per epoch so far
    ids, by_sample = inf.by_sample()
    assert np.array_equal(ids, np.arange(len(corpus.tokens)))  # every sample is used in every epoch

    def record(c: int) -> dict:
        step = int(inf.steps[c])
        return {"sample_id": int(inf.sample_ids[c]), "step": step, "epoch": step // per_epoch + 1}

    def sample(c: int) -> dict:
        return {"sample_id": c}

    opened = Store(store)
    if_scores = influence_function_scores(projected_gradients(opened, model, corpus.tokens),
                                          projected_gradients(opened, model, tests), damping)
    return EpochResult({
        "dvemb_record": Ranked(rank_of(inf.scores, uses[:, -1]), top_entries(inf.scores, record)),
        "dvemb_sample": Ranked(rank_of(by_sample, corpus.test_ids), top_entries(by_sample, sample)),
        "influence_function": Ranked(rank_of(if_scores, corpus.test_ids), top_entries(if_scores, sample)),
    }, np.stack([rank_of(inf.scores, uses[:, e]) for e in range(epoch)], 1))


def run_lm_self(cfg: LMSelfConfig) -> dict:
    """Run the whole study; write ``lm_self.json`` and ``lm_self.html`` under ``cfg.out``; return the JSON dict."""
    seconds: dict[str, float] = {}
    out, store = Path(cfg.out), Path(cfg.store)
    out.mkdir(parents=True, exist_ok=True)
    if store.exists():
        shutil.rmtree(store)
    with _timed(seconds, "total"):
        with _timed(seconds, "corpus"):
            corpus = prepare_corpus(cfg)
        model = build_gpt2(cfg.vocab_size, cfg.seq_len, cfg.size, cfg.seed, tie_embeddings=False)
        print(f"{corpus.source}: {corpus.n_windows} distinct windows of {cfg.seq_len} tokens, {len(corpus.tokens)} "
              f"trained on, {len(corpus.test_ids)} copied as test points; GPT-2 {cfg.size.n_layer} layers x "
              f"{cfg.size.n_embd}, {sum(p.numel() for p in model.parameters()):,} parameters; {cfg.pretrain_steps} "
              f"Adam steps on the other windows, then SGD lr {cfg.lr}, batch {cfg.batch_size}, {cfg.epochs} epochs")
        with _timed(seconds, "pretrain"):
            pretrain_loss = pretrain(model, corpus.held_out, cfg)
        with _timed(seconds, "train"):
            per_epoch, losses = train(model, corpus.tokens, store, cfg)
        with _timed(seconds, "embeddings"):
            compute_embeddings(store, checkpoints=[e * per_epoch for e in range(1, cfg.epochs)],
                               show_progress=cfg.show_progress)
        with _timed(seconds, "scoring"):
            by_epoch = []
            for epoch in range(1, cfg.epochs + 1):
                load_checkpoint(store, model, epoch * per_epoch)
                by_epoch.append(evaluate_epoch(store, model, corpus, epoch, per_epoch, cfg.damping))
    training = {"pretrain_final_loss": pretrain_loss, "steps_per_epoch": per_epoch, "steps": per_epoch * cfg.epochs,
                "mean_loss_per_epoch": losses}
    result = _summary(cfg, corpus, training, by_epoch, seconds)
    (out / "lm_self.json").write_text(json.dumps(result, indent=1))
    (out / "lm_self.html").write_text(render_html(result, corpus, by_epoch, cfg.n_shown))
    return result


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall time to ``seconds[name]``."""
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start


def _summary(cfg: LMSelfConfig, corpus: Corpus, training: dict, by_epoch: list[EpochResult],
             seconds: dict[str, float]) -> dict:
    """The JSON result: settings, training, and per method the copy's ranks after each epoch."""
    methods = {
        name: {"description": text,
               "fraction_ranked_first": [float(np.mean(e.methods[name].ranks == 1)) for e in by_epoch],
               "median_rank": [float(np.median(e.methods[name].ranks)) for e in by_epoch]}
        for name, text in METHODS.items()}
    uses = {"description": "DVEmb: rank among all records of the copy's record from each epoch so far",
            "median_rank": [np.median(e.use_ranks, 0).tolist() for e in by_epoch],
            "fraction_ranked_first": [np.mean(e.use_ranks == 1, 0).tolist() for e in by_epoch]}
    return {
        "experiment": "lm-self",
        "config": asdict(cfg),
        "data": {"source": corpus.source, "distinct_windows": corpus.n_windows, "train_windows": len(corpus.tokens)},
        "training": training,
        "methods": methods,
        "dvemb_each_use": uses,
        "test_points": [
            {"sample_id": int(i),
             "ranks": {name: [int(e.methods[name].ranks[k]) for e in by_epoch] for name in METHODS},
             "dvemb_each_use": [e.use_ranks[k].tolist() for e in by_epoch]}
            for k, i in enumerate(corpus.test_ids)],
        "seconds": seconds,
    }


_CSS = """body{font-family:sans-serif;max-width:1400px;margin:auto;padding:1em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
pre{white-space:pre-wrap;margin:2px 0;font-size:12px}mark{background:#ffe066}
.copy{background:#e6f4ea}.meta{font-size:12px;color:#444}"""


def render_html(result: dict, corpus: Corpus, by_epoch: list[EpochResult], n_shown: int) -> str:
    """The report page: the summary tables, then the top training sequences for the first test points."""
    epochs = range(1, len(by_epoch) + 1)
    head = "".join(f"<th>after epoch {e}</th>" for e in epochs)
    rows = "".join(
        f"<tr><td>{html.escape(m['description'])}</td>"
        + "".join(f"<td>{f:.0%} (median rank {r:g})</td>" for f, r in zip(m["fraction_ranked_first"],
                                                                          m["median_rank"]))
        + "</tr>" for m in result["methods"].values())
    uses = result["dvemb_each_use"]
    use_rows = "".join(
        f"<tr><td>record of epoch {u}</td>" + "".join(
            f"<td>{uses['median_rank'][e - 1][u - 1]:g}</td>" if u <= e else "<td></td>" for e in epochs) + "</tr>"
        for u in epochs)
    training = result["training"]
    parts = [f"<!doctype html><meta charset='utf-8'><title>dvemb lm-self</title><style>{_CSS}</style>",
             "<h1>Self-influence: is a test point's verbatim copy the top training record?</h1>",
             f"<p>Corpus: {html.escape(result['data']['source'])}. A GPT-2 pre-trained with Adam on windows outside "
             f"the training set (final loss {training['pretrain_final_loss']:.2f}) is trained with recorded SGD on "
             f"{result['data']['train_windows']} sequences for {training['steps']} steps (mean loss per epoch "
             f"{', '.join(f'{x:.2f}' for x in training['mean_loss_per_epoch'])}). Each test point is a verbatim "
             f"copy of a training sequence. Fraction of the {len(corpus.test_ids)} test points whose copy is "
             "ranked first:</p>",
             f"<table><tr><th>method</th>{head}</tr>{rows}</table>",
             f"<p>{html.escape(uses['description'])} (median over the test points):</p>",
             f"<table><tr><th></th>{head}</tr>{use_rows}</table>"]
    for k, sample_id in enumerate(corpus.test_ids[:n_shown]):
        parts.append(_test_point_html(k, int(sample_id), corpus, by_epoch))
    return "\n".join(parts)


def _test_point_html(k: int, sample_id: int, corpus: Corpus, by_epoch: list[EpochResult]) -> str:
    """One test point: its text and, per epoch and method, the top training sequences."""
    shared_with = words(corpus.texts[sample_id])
    head = "".join(f"<th>{html.escape(text)}</th>" for text in METHODS.values())
    rows = []
    for epoch, result in enumerate(by_epoch, 1):
        cells = "".join(f"<td>{_entries_html(r.top[k], sample_id, corpus, shared_with)}</td>"
                        for r in result.methods.values())
        rows.append(f"<tr><th>after epoch {epoch}</th>{cells}</tr>")
    return (f"<h2>Test point {k + 1}: a copy of training sequence {sample_id}</h2>"
            f"<pre>{html.escape(corpus.texts[sample_id])}</pre>"
            f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>")


def _entries_html(entries: list[dict], sample_id: int, corpus: Corpus, shared_with: set[str]) -> str:
    """Ranked training sequences with the words they share with the test point highlighted."""
    out = []
    for rank, e in enumerate(entries, 1):
        when = f", epoch {e['epoch']} (step {e['step']})" if "step" in e else ""
        copy = " &mdash; <b>the copy</b>" if e["sample_id"] == sample_id else ""
        text = corpus.texts[e["sample_id"]]
        out.append(f"<div class='{'copy' if copy else ''}'><div class='meta'>#{rank}: sequence {e['sample_id']}{when}, "
                   f"score {e['score']:+.3e}{copy}</div><pre>{highlight(text, shared_with & words(text))}</pre></div>")
    return "".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dvemb experiment lm-self`."""
    d = LMSelfConfig()
    parser.add_argument("--data", metavar="TAR_GZ", default=None,
                        help="archive of plain-text files, e.g. the Shakespeare plays "
                             "(default: CPython's pydoc topics)")
    parser.add_argument("--out", metavar="DIR", default=d.out, help=f"report directory (default: {d.out})")
    parser.add_argument("--store", metavar="DIR", default=d.store,
                        help=f"store and checkpoints, replaced on each run (default: {d.store})")
    for name, kind, help_text in (
            ("n_train", int, "training sequences"), ("n_test", int, "test points (verbatim copies)"),
            ("seq_len", int, "tokens per sequence"), ("vocab_size", int, "BPE vocabulary size"),
            ("epochs", int, "training epochs"), ("batch_size", int, "sequences per SGD step"),
            ("lr", float, "SGD learning rate"), ("pretrain_steps", int, "Adam steps before recording"),
            ("pretrain_lr", float, "Adam learning rate"), ("damping", float, "influence-function damping"),
            ("n_shown", int, "test points shown in the HTML report"), ("seed", int, "seed of data, init and order")):
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(d, name),
                            metavar="N" if kind is int else "X", help=f"{help_text} (default: {getattr(d, name)})")
    parser.add_argument("--projection-dim", type=_size_or_none, default=d.projection_dim, metavar="K|none",
                        help=f"projected gradient size per layer (default: {d.projection_dim})")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _size_or_none(text: str) -> int | None:
    """A positive int, or None for 'none'."""
    if text.lower() == "none":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'none', got {text}")
    return value


def main(args: argparse.Namespace) -> int:
    """Run `dvemb experiment lm-self` with parsed ``args``; print the summary table."""
    given = {f.name: getattr(args, f.name) for f in fields(LMSelfConfig) if hasattr(args, f.name)}
    cfg = LMSelfConfig(**given, show_progress=not args.no_progress)
    result = run_lm_self(cfg)
    print(format_summary(result))
    print(f"report {Path(cfg.out) / 'lm_self.html'}\njson   {Path(cfg.out) / 'lm_self.json'}")
    return 0


def format_summary(result: dict) -> str:
    """Fraction of test points whose copy is ranked first, per method and epoch, as a text table."""
    n = len(result["training"]["mean_loss_per_epoch"])
    lines = [f"{'ranked first after epoch':<26}" + "".join(f"{e:>8}" for e in range(1, n + 1)),
             f"{'mean training loss':<26}" + "".join(f"{x:>8.3f}" for x in result["training"]["mean_loss_per_epoch"])]
    for name, m in result["methods"].items():
        lines.append(f"{name:<26}" + "".join(f"{f:>8.0%}" for f in m["fraction_ranked_first"]))
    return "\n".join(lines)
