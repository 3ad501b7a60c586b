"""Writing a store: appending committed steps, in the background, and a distributed store's global commits.

A step is committed when its rows are written and flushed and ``manifest.json`` is atomically
replaced (temp file + rename). Readers trust only the manifest's counts, so a store whose
writer died opens with exactly its committed steps, and a new writer truncates what lies beyond
them.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Literal, Protocol, Sequence

import numpy as np
import torch

from ..update import SGD, Adam, UpdateRule
from .lock import LOCK_FILE, StoreLock
from .arrays import AppendableArray, read_json, write_json_atomic, write_text_atomic
from .reader import Store
from .schema import (_VOLATILE, ADAM_STATE, MANIFEST, PROJECTIONS, RECORD_DTYPE, WHITENING_DTYPE, LayerSpec,
                     StepRecord, StoreConfig, StoreError, _spec_difference, check_name, new_manifest, save_tensors,
                     write_projections)


def _check_new_dir(path: Path) -> None:
    if path.exists() and any(p.name != LOCK_FILE for p in path.iterdir()):
        raise StoreError(f"{path} exists, is not empty and holds no dvemb store")


Mode = Literal["new", "resume", "overwrite"]
MODES = ("new", "resume", "overwrite")
InitialMoments = Callable[[], dict[str, torch.Tensor]]
"""Returns Adam's moments before a new store's first step (read from the optimizer only when the store is created)."""
_ENTRIES = (MANIFEST, PROJECTIONS, ADAM_STATE, "records.npy", "grads", "curv", "whitening", "embeddings", "checkpoints",
            "shards")


def prepare(path: Path, mode: Mode) -> bool:
    """Make ``path`` ready for a writer in ``mode``; True when an existing store is to be resumed.

    ``"new"`` refuses a store that already holds steps (a re-run would append a second run to the
    first); ``"resume"`` continues it (or starts one where there is none); ``"overwrite"`` deletes the
    store's files first. A non-empty directory that holds no store is never touched.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    exists = (path / MANIFEST).exists()
    if not exists:
        _check_new_dir(path)
        return False
    steps = 0 if mode == "overwrite" else Store(path).n_steps
    if mode == "new" and steps:
        raise StoreError(f"{path} already holds a recorded run of {steps} steps: pass mode='resume' to continue it, "
                         "mode='overwrite' to replace it, or record into another path")
    if mode == "resume" and steps:
        return True
    _clear(path)  # overwritten, or a store that never committed a step
    return False


def check_names(config: StoreConfig) -> None:
    """Refuse, before anything is written, layer names that cannot be file stems or that repeat."""
    names = [check_name(spec.name) for spec in config.layers]
    if len(set(names)) != len(names):
        raise StoreError(f"layer names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")


def _clear(path: Path) -> None:
    """Delete a store's own files (nothing else in the directory)."""
    for name in _ENTRIES:
        entry = path / name
        if entry.is_dir():
            shutil.rmtree(entry)
        elif entry.exists():
            entry.unlink()


def _write_failure(path: Path, exc: OSError, steps: int) -> str:
    """One line for a failed write: the store, the cause (a full disk said so) and what is kept."""
    cause = "the disk is full" if exc.errno == errno.ENOSPC else f"{exc.strerror or exc}"
    return (f"{path}: writing failed: {cause}; the store keeps its committed steps ({steps} or more) and "
            "recording can resume once the cause is fixed (mode='resume')")


def _check_rule_resumes(found: UpdateRule, wanted: UpdateRule, steps: int) -> None:
    """The optimizer continues the store's rule: the same settings (SGD: its momentum buffer is filled by now;
    Adam: its step count is the store's start plus its ``steps``)."""
    if isinstance(found, SGD) and isinstance(wanted, SGD):
        same = dataclasses.replace(found, fresh=True) == dataclasses.replace(wanted, fresh=True)
    elif isinstance(found, Adam) and isinstance(wanted, Adam):
        same = dataclasses.replace(wanted, initial_step=found.initial_step) == found
        if same and wanted.initial_step != found.initial_step + steps:
            raise StoreError(f"cannot resume: the optimizer has taken {wanted.initial_step} steps, the store "
                             f"continues from step {found.initial_step + steps} ({steps} recorded after "
                             f"{found.initial_step}): load the optimizer state the recorded run ended with "
                             "(optimizer.load_state_dict) before resuming")
    else:
        same = found == wanted
    if not same:
        raise StoreError(f"cannot resume: store was recorded with {found.describe()}, the optimizer has "
                         f"{wanted.describe()}")


class _Committed:
    """Committed counts read from a writer's manifest."""

    manifest: dict

    @property
    def n_steps(self) -> int:
        """Committed steps."""
        return self.manifest["committed_steps"]

    @property
    def n_records(self) -> int:
        """Committed records (of all ranks, for a distributed index)."""
        return self.manifest["committed_records"]


class StoreWriter(_Committed):
    """Appends committed steps to a store; creates it or resumes after its last commit.

    ``rollback_to_steps`` drops steps committed beyond that count (a distributed shard
    that ran ahead of the global commit). ``initial_moments`` returns Adam's moments before the first step, by
    ``<layer>.exp_avg`` / ``<layer>.exp_avg_sq``: called, and written, only when the store is created (its rule
    starts at ``initial_step`` > 0; ``Store.initial_moments`` reads them).
    """

    def __init__(self, path: str | os.PathLike, config: StoreConfig, *, fsync: bool = False,
                 rollback_to_steps: int | None = None, mode: Mode = "new",
                 initial_moments: InitialMoments | None = None) -> None:
        self.path = Path(path)
        self.fsync = fsync
        check_names(config)
        self._lock = StoreLock(self.path)
        try:
            self._open(config, rollback_to_steps, mode, initial_moments)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, config: StoreConfig, rollback_to_steps: int | None, mode: Mode,
              initial_moments: InitialMoments | None) -> None:
        """Resume the store at ``path`` (its settings must match) or create it, as ``mode`` allows."""
        if prepare(self.path, mode):
            store = Store(self.path)
            self.check_resume(store.config, config, store.n_steps)
            self.manifest = store.manifest
            if rollback_to_steps is not None and rollback_to_steps < store.n_steps:  # (whitening rows follow)
                self.manifest["committed_steps"] = rollback_to_steps
                self.manifest["committed_records"] = int(store.step_starts[rollback_to_steps])
        else:
            (self.path / "grads").mkdir(parents=True, exist_ok=True)
            write_projections(self.path, config.layers, self.fsync)
            if initial_moments is not None:
                save_tensors(self.path / ADAM_STATE, initial_moments(), self.fsync)
            self.manifest = new_manifest(config)
        self.config = config
        self._static_json: str | None = None
        self._records = Store.records_array(self.path)
        self._grads = [Store.grads_array(self.path, s, config.dtype) for s in config.layers]
        self._curv: list[AppendableArray] = []
        if self.manifest.get("curvature_passes", 0):
            self._open_curvature(self.manifest["curvature_passes"])
        self._white = ([Store.whitening_array(self.path, s, config.second_factors) for s in config.layers]
                       if config.whitening else [])
        if self._white:
            self._white[0].path.parent.mkdir(exist_ok=True)
        for arr in self._white:
            arr.open_for_append(self.n_steps)
        for arr in (self._records, *self._grads):
            arr.open_for_append(self.n_records)
        self._written = (self.n_steps, self.n_records)  # steps and records written, committed or not
        self._write_manifest()

    @staticmethod
    def check_resume(found: StoreConfig, wanted: StoreConfig, steps: int) -> None:
        """Raise a StoreError naming what differs between a store's settings and the requested ones (an optimizer
        with state must have taken the store's ``steps`` since it started)."""
        for a, b in zip(found.layers, wanted.layers):
            if a != b:
                raise StoreError(f"cannot resume: layer {b.name!r} differs from the store's {a.name!r}: "
                                 f"{_spec_difference(a, b)}")
        if len(found.layers) != len(wanted.layers):
            names = {s.name for s in found.layers} ^ {s.name for s in wanted.layers}
            raise StoreError(f"cannot resume: tracked layers differ ({sorted(names)})")
        exact = all(spec.exact for spec in found.layers)
        for key in ("dtype", "reduction", "curvature", "projection", "seed", "whitening", "whitened_exact",
                    "second_factors"):
            if key in ("projection", "seed") and exact:  # no projection: its kind and seed do not matter
                continue
            if getattr(found, key) != getattr(wanted, key):
                raise StoreError(f"cannot resume: store has {key}={getattr(found, key)!r}, "
                                 f"recorder asks {getattr(wanted, key)!r}")
        _check_rule_resumes(found.update, wanted.update, steps)

    def set_layers(self, layers: Sequence[LayerSpec]) -> None:
        """Replace the layers' projections (fitted bases) of a store that has no step yet."""
        if self._written != (0, 0):
            raise StoreError(f"{self.path}: the projections of a store with steps cannot change")
        self.config = dataclasses.replace(self.config, layers=tuple(layers))
        write_projections(self.path, layers, self.fsync)
        self.manifest["layers"] = [spec.to_dict() for spec in layers]
        self._static_json = None
        self._write_manifest()

    def set_metadata(self, key: str, value: object) -> None:
        """Record a JSON value in the manifest (with the next commit's counts, now)."""
        self.manifest[key] = value
        self._static_json = None
        self._write_manifest()

    @property
    def _arrays(self) -> list[AppendableArray]:
        """Arrays with one row per record."""
        return [self._records, *self._grads, *self._curv]

    def _open_curvature(self, passes: int) -> None:
        self._curv = [Store.curvature_array(self.path, s, self.config.dtype, passes) for s in self.config.layers]
        self._curv[0].path.parent.mkdir(exist_ok=True)
        for arr in self._curv:
            arr.open_for_append(self.n_records)
        self.manifest["curvature_passes"] = passes
        self._static_json = None

    def append_step(self, step: StepRecord) -> None:
        """Write one step, then commit."""
        self.append_steps([step])

    def append_steps(self, steps: Sequence[StepRecord]) -> None:
        """Write several steps, then commit them with one manifest replace."""
        self.write_steps(steps)
        self.commit()

    def write_steps(self, steps: Sequence[StepRecord]) -> None:
        """Append steps' records and rows after those already written; they count once :meth:`commit` runs.

        On an error, every written but uncommitted step is dropped.
        """
        for step in steps:
            n_steps, n_records = self._written
            try:
                self._write_step(step, n_steps, n_records)
            except BaseException as exc:
                self._drop_partial()  # the steps written before this one stay, to be committed
                if isinstance(exc, OSError):
                    raise StoreError(_write_failure(self.path, exc, n_steps)) from None
                raise
            self._written = (n_steps + 1, n_records + len(step.sample_ids))

    def _write_step(self, step: StepRecord, n_steps: int, n_records: int) -> None:
        """Append one step's records and rows."""
        if step.curvature is not None:
            self._check_curvature(step.curvature, n_records)
        if bool(self._white) != (step.whitening is not None):
            raise StoreError("a step's whitening factors do not match the store's whitening setting")
        records = np.zeros(len(step.sample_ids), dtype=RECORD_DTYPE)
        records["step"], records["sample_id"], records["weight"] = n_steps, step.sample_ids, step.weights
        records["lr"], records["rank"] = step.lr, step.rank
        self._records.append(records)
        for arr, rows in zip(self._grads + self._curv, [*step.grads, *(step.curvature or [])]):
            arr.append(rows)
        for arr, row in zip(self._white, step.whitening or []):
            arr.append(np.asarray(row, dtype=WHITENING_DTYPE)[None])

    def commit(self) -> None:
        """Make every written step durable: flush the rows, then atomically replace the manifest."""
        if self._written == (self.n_steps, self.n_records):
            return
        try:
            for arr in self._arrays + self._white:
                arr.flush(self.fsync)
        except BaseException as exc:
            self._drop_uncommitted()
            if isinstance(exc, OSError):
                raise StoreError(_write_failure(self.path, exc, self.n_steps)) from None
            raise
        self.manifest["committed_steps"], self.manifest["committed_records"] = self._written
        self._write_manifest()

    def _drop_uncommitted(self) -> None:
        for arr in self._arrays:
            arr.rollback(self.n_records)
        for arr in self._white:
            arr.rollback(self.n_steps)
        self._written = (self.n_steps, self.n_records)

    def _drop_partial(self) -> None:
        """Truncate the files to the whole steps written so far (committed or not)."""
        n_steps, n_records = self._written
        for arr in self._arrays:
            arr.rollback(n_records)
        for arr in self._white:
            arr.rollback(n_steps)

    def _check_curvature(self, curvature: Sequence[np.ndarray], rows_written: int) -> None:
        """Open the curvature arrays on the first step that has them; refuse a change of shape."""
        passes = curvature[0].shape[1] // self.config.layers[0].dim
        if not self._curv and rows_written == 0:
            self._open_curvature(passes)
        if not self._curv or passes != self.manifest["curvature_passes"]:
            raise StoreError(f"curvature rows changed: {passes} passes per record, store has "
                             f"{self.manifest.get('curvature_passes', 0)}")

    def _write_manifest(self) -> None:
        """Commit: atomically replace the manifest (its static part is encoded once)."""
        if self._static_json is None:
            static = {k: v for k, v in self.manifest.items() if k not in _VOLATILE}
            self._static_json = json.dumps(static, separators=(",", ":"))[:-1]
        counts = {"committed_steps": self.n_steps, "committed_records": self.n_records, "updated": time.time()}
        write_text_atomic(self.path / MANIFEST, self._static_json + "," + json.dumps(counts)[1:], self.fsync)

    @property
    def submitted(self) -> int:
        """Steps handed to the writer (all committed: this writer is synchronous)."""
        return self.n_steps

    def flush(self) -> None:
        """Nothing is pending in a synchronous writer."""

    def close(self) -> None:
        """Bring the .npy headers up to date and close all files (committed data stays, the rest is dropped)."""
        try:
            if self._written != (self.n_steps, self.n_records):
                self._drop_uncommitted()
            for arr in self._arrays:
                arr.close(self.n_records)
            for arr in self._white:
                arr.close(self.n_steps)
        finally:
            self._lock.release()


class PendingRecord(Protocol):
    """A step whose rows are still on their way to the host (e.g. an asynchronous device copy)."""

    def resolve(self) -> StepRecord:
        """Wait for the rows and return the step (or raise: the step cannot be written)."""


class BackgroundWriter:
    """Writes a StoreWriter's steps in a worker thread, in order, with at most ``depth`` waiting.

    Training does not wait for the disk. Rows are written as steps arrive; commits (one
    manifest replace each) group the steps of up to ``commit_interval`` seconds, and
    :meth:`flush` and :meth:`close` commit at once. A crash loses only uncommitted steps:
    at most the last ``commit_interval`` seconds of training, never a partial step. An error
    in the thread drops the uncommitted steps, stops all further writing (later steps would leave
    a gap) and is raised at every later call; the committed steps stay, for a resumed run.
    """

    _FLUSH = object()  # queue marker: commit now

    def __init__(self, writer: StoreWriter, depth: int = 4, commit_interval: float = 0.05) -> None:
        self.writer = writer
        self.submitted = writer.n_steps
        self.commit_interval = commit_interval
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self.stopped = False  # the thread's error was raised to the caller: nothing more is written
        self._thread = threading.Thread(target=self._run, name="dvemb-store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        uncommitted = 0  # queue items taken but not yet marked done: they complete at the next commit
        last_commit = time.monotonic()
        while True:
            timeout = None if uncommitted == 0 else max(0.0, last_commit + self.commit_interval - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = self._FLUSH  # the interval is over: commit what was written
            else:
                uncommitted += 1
            if item is not None and item is not self._FLUSH and self._error is None:
                self._guarded(self._write_item, item)
            if item is None or item is self._FLUSH or time.monotonic() - last_commit >= self.commit_interval:
                if self._error is None:
                    self._guarded(self.writer.commit)
                last_commit = time.monotonic()
                for _ in range(uncommitted):
                    self._queue.task_done()
                uncommitted = 0
            if item is None:
                return

    def _write_item(self, item: "StepRecord | PendingRecord") -> None:
        """Write a step; a pending one is resolved first (waiting for its rows' copy to the host)."""
        resolve = getattr(item, "resolve", None)  # (a StepRecord has none)
        try:
            step = item if resolve is None else resolve()
        except FloatingPointError:  # the step's rows are not finite: the steps before it are whole, commit them
            self.writer.commit()
            raise
        self.writer.write_steps([step])

    def _guarded(self, call, *args: object) -> None:
        """Run a writer call, keeping its error for the training thread."""
        try:
            call(*args)
        except BaseException as exc:  # handed to the training thread
            self._error = exc

    def _check_open(self) -> None:
        """Raise the thread's error, or that the writer was closed (nothing would take the queue)."""
        self._raise()
        if not self._thread.is_alive():
            raise StoreError(f"{self.writer.path}: the store writer was closed")

    def _raise(self) -> None:
        if self._error is not None:
            error, self.stopped = self._error, True
            if isinstance(error, StoreError):
                raise StoreError(str(error))
            if isinstance(error, FloatingPointError):  # a pending step's rows were not finite: says which step
                raise type(error)(str(error))
            raise StoreError(f"{self.writer.path}: writing failed: {error}") from error

    def set_layers(self, layers: Sequence[LayerSpec]) -> None:
        """:meth:`StoreWriter.set_layers` once every queued step is written."""
        self.flush()
        self.writer.set_layers(layers)

    def append_step(self, step: "StepRecord | PendingRecord") -> None:
        """Queue a step for :meth:`StoreWriter.write_steps` (blocks while ``depth`` steps wait); a
        :class:`PendingRecord` is resolved in the writer thread, and its error raised like a write's."""
        self._check_open()
        self._queue.put(step)
        self.submitted += 1

    def flush(self) -> None:
        """Wait until every queued step is committed."""
        self._check_open()
        self._queue.put(self._FLUSH)
        self._queue.join()
        self._raise()

    def close(self) -> None:
        """Commit what is queued, stop the thread and close the store (idempotent)."""
        if not self._thread.is_alive():
            return
        try:
            if not self.stopped:  # an error already raised is not raised again
                self.flush()
        finally:
            self._queue.put(None)
            self._thread.join()
            self.writer.close()


class DistributedIndex(_Committed):
    """Rank 0's top-level manifest of a distributed store: the global committed counts."""

    def __init__(self, path: str | os.PathLike, config: StoreConfig, world_size: int, *, fsync: bool = False,
                 mode: Mode = "new") -> None:
        self.path = Path(path)
        self.fsync = fsync
        check_names(config)
        self._lock = StoreLock(self.path)
        try:
            self._open(config, world_size, mode)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, config: StoreConfig, world_size: int, mode: Mode) -> None:
        if prepare(self.path, mode):
            self.manifest = read_json(self.path / MANIFEST)
            if self.manifest.get("world_size", 1) != world_size:
                raise StoreError(f"cannot resume: {self.path} was recorded by {self.manifest.get('world_size', 1)} "
                                 f"ranks, this run has {world_size}")
            store = Store(self.path)
            StoreWriter.check_resume(store.config, config, store.n_steps)
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            write_projections(self.path, config.layers, self.fsync)
            self.manifest = {**new_manifest(config), "world_size": world_size}
            self.commit(0, 0)

    def close(self) -> None:
        """Release the store's lock."""
        self._lock.release()

    def set_layers(self, layers: Sequence[LayerSpec]) -> None:
        """Replace the layers' projections (fitted bases) before the first step."""
        if self.n_steps:
            raise StoreError(f"{self.path}: the projections of a store with steps cannot change")
        write_projections(self.path, layers, self.fsync)
        self.manifest["layers"] = [spec.to_dict() for spec in layers]
        self.commit(0, 0)

    def commit(self, steps: int, records: int) -> None:
        """Atomically record that every rank's shard holds ``steps`` steps."""
        self.manifest.update(committed_steps=steps, committed_records=records, updated=time.time())
        write_json_atomic(self.path / MANIFEST, self.manifest, self.fsync)
