"""Reading a store: its committed records, gradients, curvature and whitening rows, shards presented as one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..update import Adam
from ..update.adam import EXP_AVG, EXP_AVG_SQ
from .arrays import AppendableArray, check_array, read_json, release_pages
from .schema import (_STORAGE, ADAM_STATE, EMBEDDINGS_DIR, EMBEDDINGS_LAYOUT, MANIFEST, READABLE_VERSIONS,
                     RECORD_DTYPE, WHITENING_DTYPE, LayerSpec, StoreConfig, StoreError, _show,
                     check_embeddings_manifest, load_tensors, read_config, read_layers, store_fingerprint,
                     validate_manifest, whitening_width)


SHARDS_DIR = "shards"


def shard_path(path: str | os.PathLike, rank: int) -> Path:
    """Directory of one rank's shard in a distributed store."""
    return Path(path) / SHARDS_DIR / f"rank-{rank:05d}"


class ShardedRows:
    """Rows of one layer gathered from several shards in the store's global record order."""

    def __init__(self, parts: Sequence[np.ndarray], src_shard: np.ndarray, src_row: np.ndarray) -> None:
        self.parts, self.src_shard, self.src_row = list(parts), src_shard, src_row
        self.shape = (len(src_row), *parts[0].shape[1:])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice):
            raise TypeError("ShardedRows supports slices only")
        shard, row = self.src_shard[index], self.src_row[index]
        out = np.empty((len(row), *self.shape[1:]), dtype=self.dtype)
        for s, part in enumerate(self.parts):
            sel = shard == s
            if sel.any():
                out[sel] = part[row[sel]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class Store:
    """Read access to a store's committed records, gradients and embeddings."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        source = self.path / MANIFEST
        self.manifest = read_json(source)
        version = self.manifest.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise StoreError(f"{source}: store format {_show(version)} is not supported (expected one of "
                             f"{READABLE_VERSIONS})")
        validate_manifest(self.manifest, source)
        self.layers = read_layers(self.path, self.manifest["layers"], version)
        unfitted = [s.name for s in self.layers for p in (s.proj_in, s.proj_out) if p.unfitted and not p.is_identity]
        if unfitted and self.manifest["committed_records"]:
            raise StoreError(f"{source} is invalid: layer {unfitted[0]!r} has rows but its fitted projection has no "
                             "fingerprint")
        try:
            self._config = read_config(self.manifest, self.layers)
        except (KeyError, TypeError, ValueError) as exc:
            rule = self.manifest.get("update", self.manifest.get("sgd"))
            raise StoreError(f"{source} is invalid: its update rule {_show(rule)} cannot be read ({exc})") from None
        self.dtype: str = self.manifest["dtype"]
        self.n_steps: int = self.manifest["committed_steps"]
        self.n_records: int = self.manifest["committed_records"]
        self.world_size: int = self.manifest.get("world_size", 1)
        self._step_starts: np.ndarray | None = None
        self._shards: list[Store] = []
        if self.world_size > 1:
            self._open_shards()
        else:
            self._check_files()
        self._initial = self._read_initial_moments()

    def _read_initial_moments(self) -> dict[str, torch.Tensor]:
        """Adam's moments before step 0 of the layers it follows elementwise, checked (a StoreError names what is
        missing); empty when the optimizer started fresh."""
        rule = self._config.update
        layers = [s for i, s in enumerate(self.layers) if self._config.elementwise(i)]
        if not (isinstance(rule, Adam) and rule.initial_step and layers):
            return {}
        if self._shards:
            return self._shards[0]._initial
        file = self.path / ADAM_STATE
        values = load_tensors(file, "optimizer state before its first step") if file.exists() else {}
        for spec in layers:
            for name in (EXP_AVG, EXP_AVG_SQ):
                value = values.get(f"{spec.name}.{name}")
                if value is None or value.shape != (spec.dim,) or value.dtype != torch.float64:
                    raise StoreError(f"{file}: the store starts at optimizer step {rule.initial_step}, but its "
                                     f"{spec.name}.{name} [{spec.dim}] float64 is missing or malformed")
        return values

    def initial_moments(self, layer: int) -> dict[str, torch.Tensor] | None:
        """Adam's ``exp_avg`` and ``exp_avg_sq`` [dim] (float64) of a layer it follows elementwise, as they were
        before the store's first step; None when the optimizer started fresh or the layer is not followed
        elementwise."""
        name = self.layers[layer].name
        if f"{name}.{EXP_AVG}" not in self._initial:
            return None
        return {k: self._initial[f"{name}.{k}"] for k in (EXP_AVG, EXP_AVG_SQ)}

    def _check_files(self) -> None:
        """Each array file against the committed counts (headers and sizes only), and the records' steps.

        Cheap: one read of the records table (its step column gives :attr:`step_starts`), nothing else scanned.
        """
        records = self.records_array(self.path)
        arrays = [records] + [self.grads_array(self.path, s, self.dtype) for s in self.layers]
        if self.curvature_passes:
            arrays += [self.curvature_array(self.path, s, self.dtype, self.curvature_passes) for s in self.layers]
        for array in arrays:
            check_array(array, self.n_records)
        if self._config.whitening:
            for spec in self.layers:
                check_array(self.whitening_array(self.path, spec, self._config.second_factors), self.n_steps)
        table = records.read(self.n_records)
        steps = np.asarray(table["step"])
        if self.n_records and ((np.diff(steps) < 0).any() or steps[0] != 0 or steps[-1] != self.n_steps - 1):
            raise StoreError(f"{records.path}: the records' steps do not rise from 0 to committed_steps - 1 = "
                             f"{self.n_steps - 1} (found steps {int(steps.min())}..{int(steps.max())}, "
                             f"{'not ' if (np.diff(steps) < 0).any() else ''}in order)")
        bad = ~(np.isfinite(table["weight"]) & np.isfinite(table["lr"]))
        if bad.any():
            raise StoreError(f"{records.path}: record {int(np.argmax(bad))} has a non-finite weight or learning rate")
        self._step_starts = np.searchsorted(steps, np.arange(self.n_steps + 1), side="left")
        release_pages(table)

    def _open_shards(self) -> None:
        """Map the global record order onto the ranks' shards (clipped to the global commit)."""
        self._shards = [Store(shard_path(self.path, r)) for r in range(self.world_size)]
        for shard in self._shards:
            if shard.layers != self.layers or shard.dtype != self.dtype:
                raise StoreError(f"{shard.path}: the shard's layers or dtype differ from the store's ({self.path})")
        steps, shard_ids, rows = [], [], []
        for r, shard in enumerate(self._shards):
            if shard.n_steps < self.n_steps:
                raise StoreError(f"{shard.path} has {shard.n_steps} committed steps, the store {self.n_steps}")
            n = int(shard.step_starts[self.n_steps])
            steps.append(np.asarray(shard.records["step"][:n]))
            shard_ids.append(np.full(n, r, dtype=np.int32))
            rows.append(np.arange(n))
        order = np.argsort(np.concatenate(steps), kind="stable")  # step-major, rank-minor
        self._src_shard, self._src_row = np.concatenate(shard_ids)[order], np.concatenate(rows)[order]
        if len(order) != self.n_records:
            raise StoreError(f"{self.path}: shards hold {len(order)} committed records, manifest says {self.n_records}")

    def _rows(self, read: Callable[["Store"], np.ndarray]) -> np.ndarray | ShardedRows:
        """Rows of one array: the file itself, or gathered from the shards."""
        if not self._shards:
            return read(self)
        return ShardedRows([read(s) for s in self._shards], self._src_shard, self._src_row)
    # -- layout ------------------------------------------------------------------------
    @staticmethod
    def records_array(path: Path) -> AppendableArray:
        """The records table of the store at ``path``."""
        return AppendableArray(path / "records.npy", RECORD_DTYPE, ())

    @staticmethod
    def grads_array(path: Path, spec: LayerSpec, dtype: str) -> AppendableArray:
        """The gradient rows of one layer."""
        return AppendableArray(path / "grads" / f"{spec.name}.npy", _STORAGE[dtype][0], (spec.dim,))

    @staticmethod
    def curvature_array(path: Path, spec: LayerSpec, dtype: str, passes: int) -> AppendableArray:
        """The curvature rows of one layer (``passes`` pseudo-gradients per record)."""
        return AppendableArray(path / "curv" / f"{spec.name}.npy", _STORAGE[dtype][0], (passes * spec.dim,))

    @staticmethod
    def whitening_array(path: Path, spec: LayerSpec, second_factors: bool = False) -> AppendableArray:
        """One row per step: the log row and column whitening factors of one layer (and the second moment's)."""
        return AppendableArray(path / "whitening" / f"{spec.name}.npy", WHITENING_DTYPE,
                               (whitening_width(spec, second_factors),))

    def _whitening_rows(self, layer: int) -> np.ndarray:
        source = self._shards[0] if self._shards else self
        return source.whitening_array(source.path, source.layers[layer], self.config.second_factors).read(self.n_steps)

    def whitening(self, layer: int) -> np.ndarray | None:
        """[n_steps, d_out + d_in (+1)] log whitening factors of a layer per step, or None without whitening."""
        if not self.config.whitening:
            return None
        return self._whitening_rows(layer)[:, : whitening_width(self.layers[layer], False)]

    def second_factors(self, layer: int) -> np.ndarray | None:
        """Per step, the rows whose second-moment part :func:`~dvemb.store.second_moment_factors` reads, or None
        for stores without them."""
        return self._whitening_rows(layer) if self.config.second_factors else None

    @property
    def curvature_passes(self) -> int:
        """Curvature rows per record (0: the gradients themselves are used)."""
        if self._shards:
            return self._shards[0].curvature_passes
        return self.manifest.get("curvature_passes", 0)

    def curvature(self, layer: int) -> np.ndarray | ShardedRows | None:
        """Read-only [n_records, passes * dim] curvature rows of a layer, or None under gradient_outer."""
        if not self.curvature_passes:
            return None
        return self._rows(lambda s: s.curvature_array(s.path, s.layers[layer], s.dtype, s.curvature_passes)
                          .read(s.n_records))

    @property
    def config(self) -> StoreConfig:
        """The creation settings."""
        return self._config

    # -- records -------------------------------------------------------------------------
    @property
    def records(self) -> np.ndarray:
        """Structured array of committed records: step, sample_id, weight, lr, rank."""
        return np.asarray(self._rows(lambda s: s.records_array(s.path).read(s.n_records)))

    @property
    def step_starts(self) -> np.ndarray:
        """Row index where each committed step starts, plus the total at the end ([n_steps + 1])."""
        if self._step_starts is None:
            steps = np.asarray(self.records["step"])
            self._step_starts = np.searchsorted(steps, np.arange(self.n_steps + 1), side="left")
        return self._step_starts

    def grads(self, layer: int) -> np.ndarray | ShardedRows:
        """Read-only [n_records, dim] rows of one layer's stored gradients (storage dtype)."""
        return self._rows(lambda s: s.grads_array(s.path, s.layers[layer], s.dtype).read(s.n_records))

    def iter_steps_backward(
        self, arrays: Sequence[np.ndarray], chunk_rows: int, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, int, int, list[np.ndarray]]]:
        """Yield (step, row_begin, row_end, [rows of each array]) from step stop-1 down to start.

        Rows are read in chunks of whole steps of about ``chunk_rows`` rows, so memory
        stays bounded by one chunk however long the run.
        """
        stop = self.n_steps if stop is None else stop
        starts = self.step_starts
        hi = stop
        while hi > start:
            lo = hi - 1
            while lo > start and starts[hi] - starts[lo - 1] <= chunk_rows:
                lo -= 1
            base = starts[lo]
            chunk = [np.array(a[base: starts[hi]]) for a in arrays]
            for a in arrays:  # memory stays one chunk, however large the store
                release_pages(a)
            for t in range(hi - 1, lo - 1, -1):
                r0, r1 = starts[t], starts[t + 1]
                yield t, r0, r1, [c[r0 - base: r1 - base] for c in chunk]
            hi = lo

    def nbytes(self) -> int:
        """Bytes on disk of the whole store directory."""
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def summary(self, check_embeddings: Callable[["Store", dict], None] | None = None) -> str:
        """Human-readable description (used by ``dvemb info``); ``check_embeddings(store, info)`` (see
        ``embed/layout.py``) checks the files of current embeddings, raising a StoreError when they are damaged."""
        m = self.manifest
        lines = [
            f"store      {self.path}",
            f"format     v{m['format_version']} (dvemb {m['library_version']})",
            f"steps      {self.n_steps}" + (f"  (recorded by {self.world_size} ranks)" if self.world_size > 1 else ""),
            f"records    {self.n_records}  ({len(np.unique(self.records['sample_id'])) if self.n_records else 0} distinct samples)",
            f"dtype      {self.dtype}   reduction {m['reduction']}   curvature {m['curvature']}   "
            f"projection {m['projection']} (seed {m['seed']})",
            f"update     {self.config.update.describe()}" + self._whitening_summary(),
            f"layers     {len(self.layers)}, {sum(s.dim for s in self.layers)} values per record",
        ]
        for s in self.layers:
            lines.append(f"  {s.name:<32} {s.describe():<24} k_in={s.proj_in.k:<6} k_out={s.proj_out.k:<6} dim={s.dim}")
        per_record = sum(s.dim for s in self.layers) * _STORAGE[self.dtype][0].itemsize + RECORD_DTYPE.itemsize
        lines.append(f"embeddings {self._embeddings_summary(check_embeddings)}")
        lines.append(f"bytes      {self.nbytes():,} on disk, {per_record:,} per record")
        return "\n".join(lines)

    def _whitening_summary(self) -> str:
        if not self.config.whitening:
            return ""
        return ("; rows whitened" + (" (exact layers too)" if self.config.whitened_exact else
                                     " in projected layers, exact layers followed elementwise")
                + ("; second moment factored per layer" if self.config.second_factors else ""))

    def _embeddings_summary(self, check: Callable[["Store", dict], None] | None) -> str:
        """The embeddings line of :meth:`summary`: up to date, stale (why), unusable (why) or not computed."""
        source = self.path / EMBEDDINGS_DIR / MANIFEST
        if not source.exists():
            return "not computed (dvemb embed STORE)"
        try:
            info = check_embeddings_manifest(read_json(source), source, EMBEDDINGS_LAYOUT)
            stale = self.embeddings_staleness(info)
            if stale is None and check is not None:
                check(self, info)
        except StoreError as exc:
            return f"unusable: {exc}" + ("" if "dvemb embed" in str(exc) else " (dvemb embed STORE recomputes them)")
        frozen = ", second moment held fixed" if info["plan"].get("second_moment") == "frozen" else ""
        return f"stale: {stale}" if stale else f"up to date ({info['precision']} recursion{frozen})"

    def embeddings_staleness(self, info: dict) -> str | None:
        """Why embeddings described by ``info`` (a checked embeddings manifest) do not fit this store as it is
        now, or None when they do: an older layout, another store (or this one before it was overwritten),
        other committed counts."""
        if info.get("layout_version", 1) != EMBEDDINGS_LAYOUT:
            return f"computed by an older dvemb (layout {info.get('layout_version', 1)}, now {EMBEDDINGS_LAYOUT})"
        if "store_fingerprint" not in info:
            return "computed by an older dvemb, which did not note the store they came from"
        if info["store_fingerprint"] != store_fingerprint(self.manifest):
            return "computed from another store, or from this path before the store was replaced"
        if (info["committed_steps"], info["committed_records"]) != (self.n_steps, self.n_records):
            return (f"they cover {info['committed_steps']} of {self.n_steps} steps "
                    f"({info['committed_records']} of {self.n_records} records)")
        return None
