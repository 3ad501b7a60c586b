"""Scoring: test gradients at the current model against stored data value embeddings."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from . import gemm
from .cpus import spare_cpu
from .devices import Device, resolve_device, to_device
from .progress import ProgressBar

from .capture.ghost import GhostCapture
from .capture.selection import match_specs
from .embed.checkpointing import Checkpoints, segment_boundaries, segment_tests
from .embed.compute import compute_embeddings
from .embed.layout import (LAYOUT_VERSION, check_embeddings, embedding_info, embedding_plan, final_arrays,
                           propagator_arrays)
from .embed.plan import Blocking
from .store import AppendableArray, MappedArrays, PrefetchedRows, Store, StoreError, whitening_factors

LossClosure = Callable[[], torch.Tensor]

CHUNK_BYTES = 6 << 20  # embeddings per streamed chunk; two stay in cache (best of 512 KiB..16 MiB measured)
MAPPED_CHUNK_BYTES = 64 << 20  # per chunk of mapped rows: nothing is copied, so fewer, larger products


@dataclass(frozen=True)
class Ranking:
    """Per test point, k records ordered by score: record index, step, sample id, score ([n_test, k])."""

    index: np.ndarray
    step: np.ndarray
    sample_id: np.ndarray
    score: np.ndarray


@dataclass(frozen=True)
class TopK:
    """The most helpful (highest score) and most harmful (lowest score) records per test point."""

    helpful: Ranking
    harmful: Ranking


@dataclass(frozen=True)
class Influence:
    """Estimated TSLOO of every record on every test loss; positive means the record helped."""

    scores: np.ndarray      # [n_test, n_records]
    steps: np.ndarray       # [n_records]
    sample_ids: np.ndarray  # [n_records]

    def by_sample(self) -> tuple[np.ndarray, np.ndarray]:
        """All-epoch removal: (unique sample ids [n_ids], scores summed over each id's records [n_test, n_ids])."""
        ids, inverse = np.unique(self.sample_ids, return_inverse=True)
        summed = torch.zeros(self.scores.shape[0], len(ids), dtype=torch.float64)  # (np.add.at is ~50x slower)
        summed.index_add_(1, torch.from_numpy(inverse.astype(np.int64)), torch.from_numpy(self.scores).double())
        return ids, summed.numpy()

    def top_k(self, k: int) -> TopK:
        """The k most helpful and k most harmful records for each test point (all of them when fewer)."""
        k = _check_k(k)
        _warn_if_beyond(k, self.scores.shape[1], stacklevel=3)
        k = min(k, self.scores.shape[1])
        order = np.argsort(-self.scores, axis=1, kind="stable")
        return TopK(self._ranking(order[:, :k]), self._ranking(order[:, ::-1][:, :k]))

    def _ranking(self, index: np.ndarray) -> Ranking:
        return Ranking(index, self.steps[index], self.sample_ids[index], np.take_along_axis(self.scores, index, 1))


def query_gradients(store: Store, model: nn.Module, loss_fn: LossClosure,
                    step: int | None = None) -> tuple[list[torch.Tensor], int]:
    """Projected per-example gradients of the closure's losses at the model's current parameters.

    For a store with whitened rows the test gradients are whitened as the rows of the step before
    ``step`` (default: the last step), i.e. as theta_step moved: see :class:`~dvemb.update.adam.WhitenedAdam`.
    """
    modules = match_specs(model, store.layers)
    capture = GhostCapture(model, modules, store.layers, overlap=False)  # one backward: nothing to overlap
    if store.config.whitening:
        row = (store.n_steps if step is None else step) - 1
        factors = [whitening_factors(store.whitening(i)[max(row, 0)], s) for i, s in enumerate(store.layers)]
        capture.set_specs(store.layers, [(c.exp(), r.exp()) for r, c in factors])
    capture.attach()
    try:
        capture.begin()
        with torch.enable_grad():
            losses = loss_fn()
            if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
                raise ValueError("the loss closure must return a 1-D tensor of per-example losses "
                                 "(use reduction='none')")
            if not losses.requires_grad:
                raise ValueError(_NO_LAYER + " (the closure's losses do not depend on the model's parameters: "
                                 "compute them from model(...) with gradients enabled)")
            # autograd.grad leaves the parameters' .grad untouched
            torch.autograd.grad(losses.sum(), [m.weight for m in modules], allow_unused=True)
        try:
            grads, _ = capture.collect(n_rows=losses.shape[0])
        except (RuntimeError, ValueError) as exc:  # the capture speaks of recording steps: say it of the query
            raise ValueError(_query_capture_error(exc, losses.shape[0])) from None
    finally:
        capture.detach()
    bad = [s.name for s, g in zip(store.layers, grads) if not bool(torch.isfinite(g).all())]
    if bad:
        raise ValueError(f"the test loss has non-finite gradients at layer {bad[0]!r}: check the test inputs and the "
                         "model (a NaN or infinite loss?)")
    return grads, losses.shape[0]


_NO_LAYER = "the test loss reaches no tracked layer of the store"


def _query_capture_error(exc: Exception, n_losses: int) -> str:
    """A query's wording of the capture's error about its test losses."""
    text = str(exc)
    if "no gradients were captured" in text:
        return (f"{_NO_LAYER}: no tracked layer took part in the closure's forward pass with gradients enabled "
                "(call the model inside the closure, outside torch.no_grad())")
    if "received no gradient" in text:
        layer = text.split("'")[1] if text.count("'") >= 2 else "?"
        return (f"the test loss does not reach the tracked layer {layer!r}: every layer the store tracks must lie "
                "on the path from the model's inputs to the loss returned by the closure")
    if "samples but" in text:
        return (f"the loss closure returned {n_losses} losses but the model's forward passes inside it covered "
                f"another number of examples ({text}); return one loss per test example")
    return f"the test gradients cannot be taken: {text}"


def checkpoint_steps(path: str | os.PathLike) -> list[int]:
    """Steps t_l of the checkpoints available to ``influence(..., checkpoint=l)``; the last is T."""
    info = embedding_info(Store(path))
    if info is None:
        raise ValueError(f"{path}: embeddings not computed; run compute_embeddings(path, checkpoints=K)")
    return info["boundaries"][1:]


@dataclass(frozen=True)
class _Query:
    """A resolved query: the store, its embeddings, the checkpoint and the test gradients."""

    store: Store
    info: dict
    last: int          # index of the checkpoint segment scored against
    n_rows: int        # records before that checkpoint
    tests: list[torch.Tensor]  # on the device the scores are computed on


class _ReadAhead:
    """Rows read chunk by chunk with positional reads into reused buffers, the next by a read-ahead thread."""

    chunk_bytes = CHUNK_BYTES

    @staticmethod
    def scan(arrays: Sequence[AppendableArray], ranges: Sequence[tuple[int, int]], max_rows: int) -> PrefetchedRows:
        """Per range, one array per file (views of a buffer valid until the next range)."""
        return PrefetchedRows(arrays, ranges, max_rows)


class _MappedForever:
    """Rows of the files mapped once and kept mapped: a Scorer's source (each later query reads them in place)."""

    chunk_bytes = MAPPED_CHUNK_BYTES

    def __init__(self) -> None:
        self._mapped = MappedArrays()

    def scan(self, arrays: Sequence[AppendableArray], ranges: Sequence[tuple[int, int]],
             max_rows: int) -> Iterator[list[np.ndarray]]:
        """Per range, one view per file."""
        return self._mapped.scan(arrays, ranges, max_rows)

    def close(self) -> None:
        """Unmap the files."""
        self._mapped.close()


class _MappedOnce:
    """Rows of the files mapped for one query, each chunk's pages released once it is scored."""

    chunk_bytes = MAPPED_CHUNK_BYTES

    @staticmethod
    def scan(arrays: Sequence[AppendableArray], ranges: Sequence[tuple[int, int]],
             max_rows: int) -> Iterator[list[np.ndarray]]:
        """Per range, one view per file."""
        return MappedArrays(release_scanned=True).scan(arrays, ranges, max_rows)


class _OnDevice:
    """A Scorer's rows on a device: each chunk is copied there at its first query and kept while ``budget``
    bytes last; the chunks beyond it are copied from the mapped files at every query."""

    chunk_bytes = MAPPED_CHUNK_BYTES

    def __init__(self, device: torch.device, budget: int) -> None:
        self.device = device
        self._left = budget
        self._mapped = MappedArrays()
        self._held: dict[tuple[str, int, int], torch.Tensor] = {}

    def scan(self, arrays: Sequence[AppendableArray], ranges: Sequence[tuple[int, int]],
             max_rows: int) -> Iterator[list[torch.Tensor]]:
        """Per range, one tensor per file, on the device."""
        return ([self._rows(a, r0, r1) for a in arrays] for r0, r1 in ranges)

    def _rows(self, array: AppendableArray, r0: int, r1: int) -> torch.Tensor:
        key = (str(array.path), r0, r1)
        rows = self._held.get(key)
        if rows is None:
            rows = to_device(self._mapped.array(array)[r0:r1], self.device)
            if rows.numel() * rows.element_size() <= self._left:
                self._held[key] = rows
                self._left -= rows.numel() * rows.element_size()
        return rows

    def close(self) -> None:
        """Free the device copies and unmap the files."""
        self._held.clear()
        self._mapped.close()


def _device_budget(device: torch.device, device_memory: int | None) -> int:
    """Bytes of embeddings a Scorer keeps on ``device``: ``device_memory``, else half the free memory of a
    GPU (none on the CPU, where the mapped files are the page cache already)."""
    if device_memory is not None:
        if device_memory < 0:
            raise ValueError(f"device_memory must be >= 0 bytes, got {device_memory}")
        return int(device_memory)
    return torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else 0


def _streamed() -> "_RowSource":
    """How a one-off query reads the embeddings.

    With a CPU to spare, a read-ahead thread copies the next chunk while this one is scored
    (1.3x faster than mapping at 1 torch thread on 2 CPUs). When torch's threads take every
    CPU, that thread competes with them; mapping the files lets all threads score without a
    copy (1.6x faster than read-ahead for 1 test point at 2 threads on 2 CPUs).
    """
    return _ReadAhead() if spare_cpu() else _MappedOnce()


class _RowScan(Protocol):
    """Rows of several arrays per range, in order; ``close`` ends the scan early."""

    def __iter__(self) -> Iterator[list[np.ndarray]]: ...

    def close(self) -> None: ...


class _RowSource(Protocol):
    """Where scoring gets rows of embeddings: streamed from the files, or mapped once (``Scorer``)."""

    chunk_bytes: int

    def scan(self, arrays: Sequence[AppendableArray], ranges: Sequence[tuple[int, int]], max_rows: int) -> _RowScan:
        """Per range, one array (or tensor on the scoring device) of rows per file."""


def _ensure_embeddings(store: Store, checkpoints: Checkpoints, blocking: Blocking | None,
                       show_progress: bool) -> dict:
    """The embeddings manifest: computed first when missing; recomputed with their own options when the store
    has new steps; an error when they exist but were computed with other ``checkpoints`` or ``blocking``
    (queries never replace embeddings the user computed: compute_embeddings does)."""
    info = embedding_info(store)
    stale = None if info is None else store.embeddings_staleness(info)
    if info is None or stale is not None:
        options = {"checkpoints": checkpoints, "blocking": blocking or "auto"}
        if info is not None and info.get("layout_version") == LAYOUT_VERSION:
            options = {"checkpoints": checkpoints or _interior(info, store.n_steps),
                       "blocking": blocking or info["blocking"], "memory": info["memory"],
                       "step_rank": embedding_plan(info).step_rank, "second_moment": embedding_plan(info).second_moment}
            warnings.warn(f"{store.path}: the embeddings are stale ({stale}); recomputing them with the same "
                          "options", stacklevel=4)
        compute_embeddings(store.path, show_progress=show_progress, **options)
        info = embedding_info(store)
        check_embeddings(store, info)
        return info
    check_embeddings(store, info)
    wanted = None if checkpoints is None else segment_boundaries(store.n_steps, checkpoints)
    differs = [f"{name}={asked!r} (stored: {had!r})" for name, asked, had in
               (("checkpoints", wanted, info["boundaries"]), ("blocking", blocking, info["blocking"]))
               if asked is not None and asked != had]
    if differs:
        raise ValueError(f"{store.path}: the embeddings were computed with other options than asked: "
                         f"{', '.join(differs)}; call dvemb.compute_embeddings(path, ...) to recompute them")
    return info


def _interior(info: dict, n_steps: int) -> list[int] | None:
    """The checkpoint steps of earlier embeddings that still lie inside the run, or None (one segment)."""
    inner = [b for b in info["boundaries"][1:-1] if b < n_steps]
    return inner or None


def _resolve(store: Store, info: dict, model: nn.Module, loss_fn: LossClosure, checkpoint: int | None,
             device: torch.device) -> _Query:
    """Take the test gradients at the model, for the embeddings of ``checkpoint`` (None: the last step), and
    put them on the ``device`` that scores."""
    boundaries = info["boundaries"]
    last = len(boundaries) - 2 if checkpoint is None else _checkpoint_index(checkpoint, boundaries)
    grads, _ = query_gradients(store, model, loss_fn, boundaries[last + 1])
    dtype = torch.float64 if info["precision"] == "float64" else torch.float32
    tests = [g.detach().to(device=device, dtype=dtype) for g in grads]
    if not all(bool(torch.isfinite(t).all()) for t in tests):  # finite in the capture's dtype, not in this one
        raise ValueError(f"the test loss's gradients overflow the embeddings' {info['precision']} arithmetic")
    return _Query(store, info, last, int(store.step_starts[boundaries[last + 1]]), tests)


def _prepare(path: str | os.PathLike, model: nn.Module, loss_fn: LossClosure, checkpoint: int | None,
             checkpoints: Checkpoints, blocking: Blocking | None, show_progress: bool, device: Device) -> _Query:
    """Make sure fitting embeddings exist, then take the test gradients at the model."""
    device = resolve_device(device)
    store = Store(path)
    return _resolve(store, _ensure_embeddings(store, checkpoints, blocking, show_progress), model, loss_fn,
                    checkpoint, device)


def _score_chunks(q: _Query, chunk_rows: int | None, show_progress: bool,
                  source: _RowSource | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (row_begin, row_end, scores [n_test, rows]) over the records before the checkpoint.

    Memory when streaming (``source`` None): two chunks of embeddings read ahead (about
    CHUNK_BYTES each by default) or one mapped chunk (MAPPED_CHUNK_BYTES), and the scores of
    one chunk (n_test x chunk_rows), whatever the number of records.
    """
    store, info = q.store, q.info
    source = _streamed() if source is None else source
    if chunk_rows is None:
        row_bytes = sum(s.dim for s in store.layers) * q.tests[0].element_size()
        chunk_rows = max(1, source.chunk_bytes // row_bytes)
    n_segments = len(info["boundaries"]) - 1
    bar = ProgressBar(total=q.n_rows, desc="scoring", unit="record", disable=not show_progress)
    if q.last == n_segments - 1:  # relative to T: the composed embeddings
        arrays, plan = final_arrays(store, info["precision"]), [(0, q.n_rows, q.tests)]
    else:  # relative to checkpoint `last`: the test gradients carried back through the propagators
        arrays, plan = segment_tests(store, info, q.tests, q.last)
        if not all(bool(torch.isfinite(t).all()) for _, _, tests in plan for t in tests):
            raise StoreError(f"{propagator_arrays(store, embedding_plan(info), info['precision'])[0].path.parent}: "
                             "the segment propagators hold non-finite values (dvemb embed STORE recomputes them)")
    chunks = [(r0, min(r0 + chunk_rows, r_stop), tests)
              for r_start, r_stop, tests in plan for r0 in range(r_start, r_stop, chunk_rows)]
    rows = source.scan(arrays, [(r0, r1) for r0, r1, _ in chunks],
                       max((r1 - r0 for r0, r1, _ in chunks), default=1))
    try:
        for (r0, r1, tests), embeddings in zip(chunks, rows):
            acc = gemm.scores(tests, [to_device(e, tests[0].device) for e in embeddings])
            if not bool(torch.isfinite(acc).all()):
                _non_finite(arrays, [e.cpu().numpy() if isinstance(e, torch.Tensor) else e for e in embeddings], r0)
            bar.update(r1 - r0)
            yield r0, r1, acc
    finally:
        rows.close()
        bar.close()


def _non_finite(arrays: Sequence[AppendableArray], chunk: Sequence[np.ndarray], r0: int) -> None:
    """Raise for non-finite scores: a StoreError naming the embeddings file with a non-finite row, else a
    ValueError (finite inputs whose products overflow)."""
    for array, rows in zip(arrays, chunk):
        bad = ~np.isfinite(rows).all(axis=1)
        if bad.any():
            raise StoreError(f"{array.path}: row {r0 + int(np.argmax(bad))} of the embeddings is not finite (NaN or "
                             "infinite: a diverged run, or a damaged file; dvemb embed STORE recomputes them)")
    raise ValueError("the scores overflow: the test gradients times the embeddings exceed the float range")


def influence(
    path: str | os.PathLike,
    model: nn.Module,
    loss_fn: LossClosure,
    *,
    checkpoint: int | None = None,
    checkpoints: Checkpoints = None,
    blocking: Blocking | None = None,
    chunk_rows: int | None = None,
    show_progress: bool = False,
    device: Device = None,
) -> Influence:
    """Score stored records against the closure's per-example test losses.

    The closure is evaluated at ``model`` as it is now and must return a 1-D tensor of
    per-example losses. Without ``checkpoint`` the model is the final one and every
    record is scored. With ``checkpoint=l`` the model must hold theta at step
    ``checkpoint_steps(path)[l]`` and the records before that step are scored by their
    influence on that checkpoint. Embeddings are computed first if missing or stale, or
    when ``checkpoints`` or ``blocking`` ask for other ones than those stored.
    The embeddings are streamed from disk; for repeated queries a :class:`Scorer` is faster. ``device``
    scores there (``"cuda"``; default the CPU): the test gradients go to it and the embeddings stream in.
    """
    q = _prepare(path, model, loss_fn, checkpoint, checkpoints, blocking, show_progress, device)
    return _influence(q, _score_chunks(q, chunk_rows, show_progress))


def top_k(
    path: str | os.PathLike,
    model: nn.Module,
    loss_fn: LossClosure,
    k: int,
    *,
    checkpoint: int | None = None,
    checkpoints: Checkpoints = None,
    blocking: Blocking | None = None,
    chunk_rows: int | None = None,
    show_progress: bool = False,
    device: Device = None,
) -> TopK:
    """The k most helpful and most harmful records per test point, without the full score matrix.

    Same arguments as :func:`influence`; memory is O(n_test x (k + chunk_rows)) plus two
    read-ahead chunks of embeddings (6 MiB each by default) or, when torch's threads use
    every CPU, one mapped chunk (64 MiB), so stores far larger than RAM can be searched.
    """
    k = _check_k(k)
    q = _prepare(path, model, loss_fn, checkpoint, checkpoints, blocking, show_progress, device)
    return _top_k(q, _score_chunks(q, chunk_rows, show_progress), k)


class Scorer:
    """A store's embeddings held open for repeated queries: mapped once, then scored in place.

    ``influence`` and ``top_k`` stream the embedding files through small buffers, which
    costs a copy of every byte per query. A Scorer maps the files once and multiplies
    the test gradients with the mapped rows directly, so after the first query (which
    pays the page faults) a query reads each byte of the embeddings once, from memory.
    The mapped rows are the kernel's page cache (shared, reclaimable); the Scorer's own
    memory is the score matrix, or n_test x (k + chunk_rows) values for ``top_k``.
    Embeddings are computed at opening when missing, stale, or not the ones asked for
    (``checkpoints``, ``blocking``: as in :func:`influence`). Use as a context manager or
    call :meth:`close`. With a ``device`` (``"cuda"``) the scores are computed there, and the Scorer keeps
    up to ``device_memory`` bytes of embeddings on it (default: half its free memory) and copies the rest
    in at each query; ``top_k`` runs there too.
    """

    chunk_bytes = MAPPED_CHUNK_BYTES

    def __init__(self, path: str | os.PathLike, *, checkpoints: Checkpoints = None, blocking: Blocking | None = None,
                 show_progress: bool = False, device: Device = None, device_memory: int | None = None) -> None:
        if device_memory is not None and device is None:
            raise ValueError("device_memory applies to a Scorer with a device (Scorer(path, device=...))")
        self.device = resolve_device(device)
        self._source: _MappedForever | _OnDevice = (  # the budget is checked before the store is opened
            _MappedForever() if device is None else _OnDevice(self.device, _device_budget(self.device, device_memory)))
        self.store = Store(path)
        self.info = _ensure_embeddings(self.store, checkpoints, blocking, show_progress)
        self.show_progress = show_progress

    def influence(self, model: nn.Module, loss_fn: LossClosure, *, checkpoint: int | None = None,
                  chunk_rows: int | None = None) -> Influence:
        """Like :func:`influence` on this store."""
        q = self._query(model, loss_fn, checkpoint)
        return _influence(q, _score_chunks(q, chunk_rows, self.show_progress, self._source))

    def top_k(self, model: nn.Module, loss_fn: LossClosure, k: int, *, checkpoint: int | None = None,
              chunk_rows: int | None = None) -> TopK:
        """Like :func:`top_k` on this store."""
        k = _check_k(k)
        q = self._query(model, loss_fn, checkpoint)
        return _top_k(q, _score_chunks(q, chunk_rows, self.show_progress, self._source), k)

    def close(self) -> None:
        """Release the mappings."""
        self._source.close()

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _query(self, model: nn.Module, loss_fn: LossClosure, checkpoint: int | None) -> _Query:
        if embedding_info(self.store) != self.info:
            raise StoreError(f"{self.store.path}: the embeddings were recomputed since this Scorer was opened; "
                             "open a new Scorer")
        check_embeddings(self.store, self.info)  # whole files: a mapped row past the end would kill the process
        return _resolve(self.store, self.info, model, loss_fn, checkpoint, self.device)


def _check_k(k: int) -> int:
    """k as an int >= 1 (bools, floats and numpy floats refused: a k of 2.5 records means nothing)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an integer, got {type(k).__name__} {k!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


def _warn_if_beyond(k: int, n_rows: int, stacklevel: int = 4) -> None:
    """Warn that a top_k asks for more records than there are (it returns them all)."""
    if k > n_rows:
        warnings.warn(f"top_k: k={k} exceeds the {n_rows} records scored; all of them are returned",
                      stacklevel=stacklevel)


def _influence(q: _Query, chunks: Iterator[tuple[int, int, torch.Tensor]]) -> Influence:
    """Every record's score, gathered from the scored chunks."""
    scores = np.empty((q.tests[0].shape[0], q.n_rows), dtype=torch.empty(0, dtype=q.tests[0].dtype).numpy().dtype)
    for r0, r1, chunk in chunks:
        scores[:, r0:r1] = chunk.cpu().numpy()
    records = q.store.records[:q.n_rows]
    return Influence(scores, np.asarray(records["step"]).copy(), np.asarray(records["sample_id"]).copy())


def _top_k(q: _Query, chunks: Iterator[tuple[int, int, torch.Tensor]], k: int) -> TopK:
    """The k highest and k lowest scores per test point, kept as the chunks go by."""
    _warn_if_beyond(k, q.n_rows)
    best = {sign: (None, None) for sign in (1.0, -1.0)}  # sign -> (scores [n_test, <=k], record index)
    for r0, _, chunk in chunks:
        index = torch.arange(r0, r0 + chunk.shape[1], device=chunk.device).expand_as(chunk)
        for sign, (scores, idx) in best.items():
            cand = chunk * sign if scores is None else torch.cat([scores, chunk * sign], 1)
            cand_idx = index if idx is None else torch.cat([idx, index], 1)
            top = cand.topk(min(k, cand.shape[1]), dim=1)
            best[sign] = (top.values, cand_idx.gather(1, top.indices))
    records = q.store.records[:q.n_rows]
    steps, ids = np.asarray(records["step"]), np.asarray(records["sample_id"])

    def ranking(sign: float) -> Ranking:
        scores, idx = best[sign]
        idx = idx.cpu().numpy()
        return Ranking(idx, steps[idx], ids[idx], (scores * sign).cpu().numpy())

    return TopK(ranking(1.0), ranking(-1.0))


def _checkpoint_index(checkpoint: int, boundaries: list[int]) -> int:
    n = len(boundaries) - 1
    if not -n <= checkpoint < n:
        raise ValueError(f"checkpoint={checkpoint} out of range: the embeddings have {n} checkpoints at steps "
                         f"{boundaries[1:]} (compute_embeddings(..., checkpoints=K) sets them)")
    return checkpoint % n
