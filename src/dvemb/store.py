"""The on-disk store: a directory of append-only .npy arrays and a JSON manifest.

Layout::

    manifest.json          format, tracked layers (sizes, projection seeds), dtype, committed counts
    records.npy            one row per record: step, sample_id, weight, lr, rank
    grads/<layer>.npy      per-layer projected per-sample gradients, rows = records
    curv/<layer>.npy       curvature rows (passes x dim per record) for curvature='fisher'/'ggn'
    embeddings/            manifest.json + <layer>.npy once computed
    shards/rank-NNNNN/     under torch.distributed: each rank's records as a store of its own

A distributed store's top manifest (written by rank 0) carries ``world_size`` and the
global committed counts; readers present the shards as one store whose records are in
step-major, rank-minor order.

A step is committed when its rows are written and flushed and ``manifest.json`` is
atomically replaced (temp file + rename). Readers trust only the manifest's counts, so
a store whose writer died opens with exactly its committed steps, and a new writer
truncates what lies beyond them. The .npy headers are brought up to the committed row
count when the writer closes (so ``np.load`` sees every row of a closed store).
No Python objects are serialised: arrays are plain .npy, metadata is JSON.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ._version import __version__
from .capture.selection import LayerSpec
from .update import SGD, UpdateRule, legacy_rule, rule_from_dict

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 stored the update rule as 'sgd' and 'adam'
MANIFEST = "manifest.json"
PROJECTIONS = "projections.safetensors"  # fitted projection bases (see capture/fitting.py)
HEADER_BYTES = 256  # fixed .npy header size so the shape can be rewritten in place

RECORD_DTYPE = np.dtype([("step", "<i8"), ("sample_id", "<i8"), ("weight", "<f8"), ("lr", "<f8"), ("rank", "<i4")])

# Storage dtypes. numpy has no bfloat16: it is stored as its raw 16 bits.
_STORAGE = {
    "float16": (np.dtype("<f2"), torch.float16),
    "bfloat16": (np.dtype("<u2"), torch.bfloat16),
    "float32": (np.dtype("<f4"), torch.float32),
    "float64": (np.dtype("<f8"), torch.float64),
}


_REQUIRED_KEYS = ("library_version", "dtype", "reduction", "curvature", "projection", "seed", "layers",
                  "committed_steps", "committed_records")


_VOLATILE = ("committed_steps", "committed_records", "updated")  # manifest keys that change per commit


class StoreError(RuntimeError):
    """The store is missing, corrupt, or does not fit the request."""


def dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical storage dtype name ('float32', ...) for a torch dtype or name."""
    name = str(dtype).removeprefix("torch.")
    if name not in _STORAGE:
        raise ValueError(f"unsupported storage dtype {dtype}; use one of {sorted(_STORAGE)}")
    return name


def to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    """View stored rows as a torch tensor of the store's dtype (no copy where possible)."""
    if not isinstance(array, np.ndarray):  # a distributed store's rows, gathered from the shards
        array = np.asarray(array)
    if not array.flags.writeable:  # torch tensors cannot be read-only
        array = np.array(array)
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def to_numpy(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """Convert rows to the store's numpy storage dtype."""
    tensor = tensor.detach().to(device="cpu", dtype=_STORAGE[dtype][1]).contiguous()
    return (tensor.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else tensor.numpy())


def release_pages(array: object) -> None:
    """Drop a memmap's pages from this process's resident set (the data stays in the page cache / file).

    Streaming through a store touches every page of its files; without this, the mapped
    pages count towards the process's RSS until the map is closed. Shared dirty pages are
    kept by the kernel and written back as usual.
    """
    if isinstance(array, ShardedRows):
        for part in array.parts:
            release_pages(part)
        return
    mm = getattr(array, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def all_finite(rows: np.ndarray, dtype: str) -> bool:
    """Whether stored rows hold no NaN or infinity (bfloat16: exponent bits not all set)."""
    if dtype == "bfloat16":
        return not ((rows & 0x7F80) == 0x7F80).any()
    return bool(np.isfinite(rows).all())


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    descr = np.lib.format.dtype_to_descr(dtype)
    text = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    body = text.encode("latin1")
    prefix = b"\x93NUMPY\x01\x00"
    pad = HEADER_BYTES - len(prefix) - 2 - len(body) - 1
    if pad < 0:
        raise StoreError("array header too long")
    header_len = HEADER_BYTES - len(prefix) - 2
    return prefix + header_len.to_bytes(2, "little") + body + b" " * pad + b"\n"


class AppendableArray:
    """A 2-D (or record) .npy file that grows by rows and is read through a memmap."""

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.row_shape = path, np.dtype(dtype), tuple(row_shape)
        self.row_bytes = self.dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
        self._file = None

    def open_for_append(self, committed_rows: int) -> None:
        """Open for writing after ``committed_rows``; anything beyond them is discarded."""
        if not self.path.exists():
            self.path.write_bytes(_npy_header(self.dtype, (0, *self.row_shape)))
        self._file = open(self.path, "r+b")
        self._file.truncate(HEADER_BYTES + committed_rows * self.row_bytes)
        self._file.seek(0, os.SEEK_END)

    def append(self, rows: np.ndarray) -> None:
        """Write rows at the end (not yet committed)."""
        assert self._file is not None, "array not open for appending"
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise StoreError(f"{self.path.name}: row shape {rows.shape[1:]} != {self.row_shape}")
        self._file.write(memoryview(rows).cast("B"))  # no intermediate copy

    def rollback(self, committed_rows: int) -> None:
        """Drop uncommitted rows."""
        assert self._file is not None
        self._file.truncate(HEADER_BYTES + committed_rows * self.row_bytes)
        self._file.seek(0, os.SEEK_END)

    def flush(self, fsync: bool) -> None:
        """Flush the written rows to the OS (or to disk with ``fsync``)."""
        assert self._file is not None
        self._file.flush()
        if fsync:
            os.fsync(self._file.fileno())

    def close(self, rows: int) -> None:
        """Write the header for ``rows`` committed rows and close the file."""
        if self._file is not None:
            self._file.seek(0)
            self._file.write(_npy_header(self.dtype, (rows, *self.row_shape)))
            self._file.close()
            self._file = None

    def allocate(self, rows: int) -> None:
        """Create the file at its full size (rows to be filled with :meth:`row_file` or :meth:`writable`)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(_npy_header(self.dtype, (rows, *self.row_shape)))
            f.truncate(HEADER_BYTES + rows * self.row_bytes)
        os.replace(tmp, self.path)  # a new file: readers that hold the old one open or mapped keep it intact

    def row_file(self) -> "RowFile":
        """Positional writer of an allocated file's rows (plain writes: no pages stay mapped)."""
        return RowFile(self)

    def writable(self, rows: int) -> np.ndarray | None:
        """Writable memmap of an allocated file's ``rows`` rows (None when empty)."""
        if rows == 0:
            return None
        return np.memmap(self.path, dtype=self.dtype, mode="r+", offset=HEADER_BYTES, shape=(rows, *self.row_shape))

    def read(self, rows: int) -> np.ndarray:
        """Memmap of the first ``rows`` rows, copy-on-write: views reach torch without a copy, the file never changes."""
        if rows == 0:
            return np.empty((0, *self.row_shape), dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="c", offset=HEADER_BYTES, shape=(rows, *self.row_shape))


class RowReader:
    """Reads row ranges of a .npy file into one reused buffer with positional reads.

    Used for streaming scans: unlike a fresh memmap, nothing is mapped, so there are no
    page faults (they cost more than the reading itself for a matrix-vector product) and
    the resident set does not grow; the buffer is small enough to stay in cache.
    """

    def __init__(self, array: AppendableArray, max_rows: int) -> None:
        self.array = array
        self._buffer = np.empty((max(1, max_rows), *array.row_shape), dtype=array.dtype)
        self._bytes = memoryview(self._buffer).cast("B")
        self._fd = os.open(array.path, os.O_RDONLY)

    def read(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1`` as a view of the buffer, valid until the next read."""
        want, done = (r1 - r0) * self.array.row_bytes, 0
        while done < want:
            got = os.preadv(self._fd, [self._bytes[done:want]], HEADER_BYTES + r0 * self.array.row_bytes + done)
            if got == 0:
                raise StoreError(f"{self.array.path}: file ends before row {r1}")
            done += got
        return self._buffer[: r1 - r0]

    def close(self) -> None:
        """Close the file descriptor."""
        os.close(self._fd)


class PrefetchedRows:
    """Row ranges of several arrays, read ahead in a background thread into reused buffers.

    Iterating yields, per range, one array per file: views of a buffer that stays valid
    until the next item is requested. The positional reads release the GIL, so reading
    the next range overlaps the caller's work on this one; ``depth`` buffer sets bound memory.
    """

    _END = object()

    def __init__(self, arrays: Sequence[AppendableArray], ranges: Sequence[tuple[int, int]], max_rows: int,
                 depth: int = 2) -> None:
        self._ranges = list(ranges)
        self._sets = [[RowReader(a, max_rows) for a in arrays] for _ in range(depth)]
        self._free = threading.Semaphore(depth)
        self._ready: queue.Queue = queue.Queue()
        self._stop = False
        self._thread = threading.Thread(target=self._produce, name="dvemb-row-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for i, (r0, r1) in enumerate(self._ranges):
                self._free.acquire()
                if self._stop:
                    return
                self._ready.put([reader.read(r0, r1) for reader in self._sets[i % len(self._sets)]])
        except BaseException as exc:  # handed to the consumer
            self._ready.put(exc)
        self._ready.put(self._END)

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        while True:
            item = self._ready.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            self._free.release()  # the consumer is done with this buffer set

    def close(self) -> None:
        """Stop reading ahead and close the files."""
        self._stop = True
        self._free.release()
        self._thread.join()
        for readers in self._sets:
            for reader in readers:
                reader.close()


class MappedArrays:
    """Whole arrays mapped once, for scans without copies.

    The rows are the kernel's page-cache pages mapped into this process (copy-on-write,
    never written): shared with other readers and dropped by the kernel under memory
    pressure, so stores larger than RAM still work (at disk speed). A page's first scan
    pays a page fault. Kept mapped (``release_scanned=False``), they count towards the
    resident set; with ``release_scanned=True`` each range leaves the resident set once the
    consumer moves on, so a scan's footprint is one range whatever the file sizes.
    """

    def __init__(self, release_scanned: bool = False) -> None:
        self.release_scanned = release_scanned
        self._maps: dict[Path, np.ndarray] = {}

    def array(self, array: AppendableArray) -> np.ndarray:
        """Every row in ``array``'s file, mapped on first use."""
        mapped = self._maps.get(array.path)
        if mapped is None:
            rows = (os.path.getsize(array.path) - HEADER_BYTES) // array.row_bytes
            mapped = self._maps[array.path] = array.read(rows)
        return mapped

    def scan(self, arrays: Sequence[AppendableArray], ranges: Sequence[tuple[int, int]],
             max_rows: int) -> Iterator[list[np.ndarray]]:
        """Per range, one view per array (``max_rows`` is unused: nothing is buffered)."""
        for r0, r1 in ranges:
            yield [self.array(a)[r0:r1] for a in arrays]
            if self.release_scanned:  # the consumer asked for the next range: it is done with this one
                for a in arrays:
                    _release_rows(self._maps[a.path], a.row_bytes, r0, r1)

    def close(self) -> None:
        """Forget the mappings (each is unmapped once no view of it is left)."""
        self._maps.clear()


def _release_rows(mapped: np.ndarray, row_bytes: int, r0: int, r1: int) -> None:
    """Drop the whole pages of a memmap's rows ``r0:r1`` from the resident set (the file is untouched)."""
    mm = getattr(mapped, "_mmap", None)
    if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    base = mapped.offset % mmap.ALLOCATIONGRANULARITY  # where row 0 lies in the mapping
    start = -(-(base + r0 * row_bytes) // mmap.PAGESIZE) * mmap.PAGESIZE
    stop = (base + r1 * row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if stop > start:
        mm.madvise(mmap.MADV_DONTNEED, start, stop - start)


class RowFile:
    """Writes rows of an allocated .npy file at their positions: ``rows_file[r0:r1] = block``."""

    def __init__(self, array: AppendableArray) -> None:
        self.array = array
        self._fd = os.open(array.path, os.O_WRONLY)

    def __setitem__(self, index: slice, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows, dtype=self.array.dtype)
        os.pwrite(self._fd, memoryview(data).cast("B"), HEADER_BYTES + index.start * self.array.row_bytes)

    def close(self) -> None:
        """Close the file descriptor."""
        os.close(self._fd)


def write_text_atomic(path: Path, text: str, fsync: bool = False) -> None:
    """Replace ``path`` with ``text`` atomically (temp file in the same directory + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict, fsync: bool = False) -> None:
    """Replace ``path`` with ``data`` as JSON, atomically."""
    write_text_atomic(path, json.dumps(data, separators=(",", ":")), fsync)


def read_json(path: Path) -> dict:
    """Load a JSON file, as a clear StoreError when missing or corrupt."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path} not found: not a dvemb store (or not yet written)") from None
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path} is corrupt: {exc}") from None


@dataclass(frozen=True)
class StoreConfig:
    """Settings fixed when a store is created."""

    layers: tuple[LayerSpec, ...]
    dtype: str
    reduction: str
    curvature: str = "gradient_outer"
    projection: str = "gaussian"
    seed: int = 0
    update: UpdateRule = SGD()
    whitening: bool = False  # rows whitened by Adam's factored preconditioner; one factor row per layer and step


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step as the writer appends it: records, and per layer its rows in the storage dtype.

    ``whitening`` (stores with whitening): per layer one row, the log row and column factors
    [d_out + d_in (+1)] its rows were whitened with.
    """

    sample_ids: np.ndarray
    weights: np.ndarray
    lr: float
    grads: Sequence[np.ndarray]
    curvature: Sequence[np.ndarray] | None = None
    rank: int = 0
    whitening: Sequence[np.ndarray] | None = None


WHITENING_DTYPE = np.dtype("<f8")


def whitening_factors(row: np.ndarray, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """A whitening row's (log row factor [d_out], log column factor [d_in (+1)])."""
    row = torch.from_numpy(np.array(row, dtype=np.float64))
    return row[: spec.d_out], row[spec.d_out:]


def whitening_level(row: np.ndarray, spec: LayerSpec) -> float:
    """The mean log whitening of a layer at a step (its log row plus column factors, averaged)."""
    r, c = whitening_factors(row, spec)
    return float(r.mean() + c.mean())


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
        self.manifest = read_json(self.path / MANIFEST)
        version = self.manifest.get("format_version")
        if version not in READABLE_VERSIONS:
            raise StoreError(f"{self.path}: store format {version} is not supported (expected one of "
                             f"{READABLE_VERSIONS})")
        missing = [k for k in _REQUIRED_KEYS if k not in self.manifest]
        if missing:
            raise StoreError(f"{self.path / MANIFEST} is invalid: missing {', '.join(missing)}")
        self.layers = read_layers(self.path, self.manifest["layers"])
        self.dtype: str = self.manifest["dtype"]
        self.n_steps: int = self.manifest["committed_steps"]
        self.n_records: int = self.manifest["committed_records"]
        self.world_size: int = self.manifest.get("world_size", 1)
        self._step_starts: np.ndarray | None = None
        self._shards: list[Store] = []
        if self.world_size > 1:
            self._open_shards()

    def _open_shards(self) -> None:
        """Map the global record order onto the ranks' shards (clipped to the global commit)."""
        self._shards = [Store(shard_path(self.path, r)) for r in range(self.world_size)]
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
    def whitening_array(path: Path, spec: LayerSpec) -> AppendableArray:
        """One row per step: the log row and column whitening factors of one layer."""
        return AppendableArray(path / "whitening" / f"{spec.name}.npy", WHITENING_DTYPE,
                               (spec.d_out + spec.d_in + spec.bias,))

    def whitening(self, layer: int) -> np.ndarray | None:
        """[n_steps, d_out + d_in (+1)] log whitening factors of a layer per step, or None without whitening."""
        if not self.config.whitening:
            return None
        source = self._shards[0] if self._shards else self
        return source.whitening_array(source.path, source.layers[layer]).read(self.n_steps)

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
        m = self.manifest
        update = rule_from_dict(m["update"]) if "update" in m else legacy_rule(m)
        return StoreConfig(tuple(self.layers), m["dtype"], m["reduction"], m["curvature"], m["projection"], m["seed"],
                           update, bool(m.get("whitening", False)))

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

    def summary(self) -> str:
        """Human-readable description (used by ``dvemb info``)."""
        m = self.manifest
        lines = [
            f"store      {self.path}",
            f"format     v{m['format_version']} (dvemb {m['library_version']})",
            f"steps      {self.n_steps}" + (f"  (recorded by {self.world_size} ranks)" if self.world_size > 1 else ""),
            f"records    {self.n_records}  ({len(np.unique(self.records['sample_id'])) if self.n_records else 0} distinct samples)",
            f"dtype      {self.dtype}   reduction {m['reduction']}   curvature {m['curvature']}   "
            f"projection {m['projection']} (seed {m['seed']})",
            f"update     {self.config.update.describe()}",
            f"layers     {len(self.layers)}, {sum(s.dim for s in self.layers)} values per record",
        ]
        for s in self.layers:
            lines.append(f"  {s.name:<32} {s.describe():<24} k_in={s.proj_in.k:<6} k_out={s.proj_out.k:<6} dim={s.dim}")
        per_record = sum(s.dim for s in self.layers) * _STORAGE[self.dtype][0].itemsize + RECORD_DTYPE.itemsize
        emb = self.path / "embeddings" / MANIFEST
        if emb.exists():
            info = read_json(emb)
            fresh = "up to date" if info["committed_steps"] == self.n_steps else f"stale: {info['committed_steps']} steps"
            lines.append(f"embeddings {fresh} ({info['precision']} recursion)")
        else:
            lines.append("embeddings not computed (dvemb embed STORE)")
        lines.append(f"bytes      {self.nbytes():,} on disk, {per_record:,} per record")
        return "\n".join(lines)


def _spec_difference(found: LayerSpec, wanted: LayerSpec) -> str:
    """The first field that differs between a stored layer and a requested one, in words."""
    if (found.name, found.kind, found.d_in, found.d_out, found.bias) != (wanted.name, wanted.kind, wanted.d_in,
                                                                        wanted.d_out, wanted.bias):
        return f"the store has {found.describe()}, the model {wanted.describe()}"
    for side in ("proj_in", "proj_out"):
        a, b = getattr(found, side), getattr(wanted, side)
        for key in ("k", "kind", "seed", "fingerprint"):
            if getattr(a, key) != getattr(b, key):
                what = {"proj_in": "input", "proj_out": "output"}[side]
                return (f"its {what} projection's {key} is {getattr(a, key)!r} in the store and {getattr(b, key)!r} "
                        "in the recorder (record with the store's projection_dim, projection and seed)")
    return "its description differs"


def read_layers(path: Path, layers: list[dict]) -> list[LayerSpec]:
    """The manifest's layer specs, with fitted bases from ``projections.safetensors`` (never executes code)."""
    fitted = any(d[side].get("kind") == "fitted" and d[side].get("fingerprint") for d in layers
                 for side in ("proj_in", "proj_out"))
    values = {}
    if fitted:
        from safetensors.torch import load_file

        try:
            values = load_file(str(path / PROJECTIONS))
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path / PROJECTIONS}: the store's fitted projections cannot be read ({exc})") from None
    try:
        return [LayerSpec.from_dict(d, values) for d in layers]
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{path / MANIFEST}: invalid layer description ({exc})") from None


def write_projections(path: Path, layers: Sequence[LayerSpec], fsync: bool = False) -> None:
    """Store the layers' fitted bases, atomically (temp file + rename); nothing when none is fitted."""
    values = {k: v.detach().to("cpu", torch.float64).contiguous() for s in layers for k, v in s.fitted_values().items()}
    if not values:
        return
    from safetensors.torch import save_file

    tmp = path / (PROJECTIONS + ".tmp")
    save_file(values, str(tmp))
    if fsync:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path / PROJECTIONS)


def new_manifest(config: StoreConfig) -> dict:
    """The manifest of an empty store."""
    return {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "created": time.time(),
        "dtype": config.dtype,
        "reduction": config.reduction,
        "curvature": config.curvature,
        "projection": config.projection,
        "seed": config.seed,
        "update": config.update.to_dict(),
        "whitening": config.whitening,
        "layers": [s.to_dict() for s in config.layers],
        "committed_steps": 0,
        "committed_records": 0,
    }


def _check_new_dir(path: Path) -> None:
    if path.exists() and any(path.iterdir()):
        raise StoreError(f"{path} exists, is not empty and holds no dvemb store")


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
    that ran ahead of the global commit).
    """

    def __init__(self, path: str | os.PathLike, config: StoreConfig, *, fsync: bool = False,
                 rollback_to_steps: int | None = None) -> None:
        self.path = Path(path)
        self.fsync = fsync
        manifest_path = self.path / MANIFEST
        if manifest_path.exists():
            store = Store(self.path)
            self.check_resume(store.config, config)
            self.manifest = store.manifest
            if rollback_to_steps is not None and rollback_to_steps < store.n_steps:  # (whitening rows follow)
                self.manifest["committed_steps"] = rollback_to_steps
                self.manifest["committed_records"] = int(store.step_starts[rollback_to_steps])
        else:
            _check_new_dir(self.path)
            (self.path / "grads").mkdir(parents=True, exist_ok=True)
            write_projections(self.path, config.layers, fsync)
            self.manifest = new_manifest(config)
        self.config = config
        self._static_json: str | None = None
        self._records = Store.records_array(self.path)
        self._grads = [Store.grads_array(self.path, s, config.dtype) for s in config.layers]
        self._curv: list[AppendableArray] = []
        if self.manifest.get("curvature_passes", 0):
            self._open_curvature(self.manifest["curvature_passes"])
        self._white = [Store.whitening_array(self.path, s) for s in config.layers] if config.whitening else []
        if self._white:
            self._white[0].path.parent.mkdir(exist_ok=True)
        for arr in self._white:
            arr.open_for_append(self.n_steps)
        for arr in (self._records, *self._grads):
            arr.open_for_append(self.n_records)
        self._written = (self.n_steps, self.n_records)  # steps and records written, committed or not
        self._write_manifest()

    @staticmethod
    def check_resume(found: StoreConfig, wanted: StoreConfig) -> None:
        """Raise a StoreError naming what differs between a store's settings and the requested ones."""
        for a, b in zip(found.layers, wanted.layers):
            if a != b:
                raise StoreError(f"cannot resume: layer {b.name!r} differs from the store's {a.name!r}: "
                                 f"{_spec_difference(a, b)}")
        if len(found.layers) != len(wanted.layers):
            names = {s.name for s in found.layers} ^ {s.name for s in wanted.layers}
            raise StoreError(f"cannot resume: tracked layers differ ({sorted(names)})")
        exact = all(spec.proj_in.is_identity and spec.proj_out.is_identity for spec in found.layers)
        for key in ("dtype", "reduction", "curvature", "projection", "seed", "whitening"):
            if key in ("projection", "seed") and exact:  # no projection: its kind and seed do not matter
                continue
            if getattr(found, key) != getattr(wanted, key):
                raise StoreError(f"cannot resume: store has {key}={getattr(found, key)!r}, "
                                 f"recorder asks {getattr(wanted, key)!r}")
        if not isinstance(wanted.update, SGD):
            raise StoreError(f"cannot resume: the store follows {found.update.describe()}, and the optimizer's state "
                             "before this run (its moments) cannot be recovered; record the run in one process")
        if not isinstance(found.update, SGD) or (dataclasses.replace(found.update, fresh=True)
                                                 != dataclasses.replace(wanted.update, fresh=True)):
            raise StoreError(f"cannot resume: store was recorded with {found.update.describe()}, the optimizer has "
                             f"{wanted.update.describe()}")

    def set_layers(self, layers: Sequence[LayerSpec]) -> None:
        """Replace the layers' projections (fitted bases) of a store that has no step yet."""
        if self._written != (0, 0):
            raise StoreError(f"{self.path}: the projections of a store with steps cannot change")
        self.config = dataclasses.replace(self.config, layers=tuple(layers))
        write_projections(self.path, layers, self.fsync)
        self.manifest["layers"] = [spec.to_dict() for spec in layers]
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
        n_steps, n_records = self._written
        try:
            for step in steps:
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
                n_steps, n_records = n_steps + 1, n_records + len(step.sample_ids)
        except BaseException:
            self._drop_uncommitted()
            raise
        self._written = (n_steps, n_records)

    def commit(self) -> None:
        """Make every written step durable: flush the rows, then atomically replace the manifest."""
        if self._written == (self.n_steps, self.n_records):
            return
        try:
            for arr in self._arrays + self._white:
                arr.flush(self.fsync)
        except BaseException:
            self._drop_uncommitted()
            raise
        self.manifest["committed_steps"], self.manifest["committed_records"] = self._written
        self._write_manifest()

    def _drop_uncommitted(self) -> None:
        for arr in self._arrays:
            arr.rollback(self.n_records)
        for arr in self._white:
            arr.rollback(self.n_steps)
        self._written = (self.n_steps, self.n_records)

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
        if self._written != (self.n_steps, self.n_records):
            self._drop_uncommitted()
        for arr in self._arrays:
            arr.close(self.n_records)
        for arr in self._white:
            arr.close(self.n_steps)


class BackgroundWriter:
    """Writes a StoreWriter's steps in a worker thread, in order, with at most ``depth`` waiting.

    Training does not wait for the disk. Rows are written as steps arrive; commits (one
    manifest replace each) group the steps of up to ``commit_interval`` seconds, and
    :meth:`flush` and :meth:`close` commit at once. A crash loses only uncommitted steps:
    at most the last ``commit_interval`` seconds of training, never a partial step. An error
    in the thread drops the uncommitted steps and is raised at the next call.
    """

    _FLUSH = object()  # queue marker: commit now

    def __init__(self, writer: StoreWriter, depth: int = 4, commit_interval: float = 0.05) -> None:
        self.writer = writer
        self.submitted = writer.n_steps
        self.commit_interval = commit_interval
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
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
                self._guarded(self.writer.write_steps, [item])
            if item is None or item is self._FLUSH or time.monotonic() - last_commit >= self.commit_interval:
                if self._error is None:
                    self._guarded(self.writer.commit)
                last_commit = time.monotonic()
                for _ in range(uncommitted):
                    self._queue.task_done()
                uncommitted = 0
            if item is None:
                return

    def _guarded(self, call, *args: object) -> None:
        """Run a writer call, keeping its error for the training thread."""
        try:
            call(*args)
        except BaseException as exc:  # handed to the training thread
            self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise StoreError(f"writing to {self.writer.path} failed: {error}") from error

    def set_layers(self, layers: Sequence[LayerSpec]) -> None:
        """:meth:`StoreWriter.set_layers` once every queued step is written."""
        self.flush()
        self.writer.set_layers(layers)

    def append_step(self, step: StepRecord) -> None:
        """Queue a step for :meth:`StoreWriter.write_steps` (blocks while ``depth`` steps wait)."""
        self._raise()
        self._queue.put(step)
        self.submitted += 1

    def flush(self) -> None:
        """Wait until every queued step is committed."""
        self._queue.put(self._FLUSH)
        self._queue.join()
        self._raise()

    def close(self) -> None:
        """Commit what is queued, stop the thread and close the store."""
        try:
            self.flush()
        finally:
            self._queue.put(None)
            self._thread.join()
            self.writer.close()


class DistributedIndex(_Committed):
    """Rank 0's top-level manifest of a distributed store: the global committed counts."""

    def __init__(self, path: str | os.PathLike, config: StoreConfig, world_size: int, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        manifest_path = self.path / MANIFEST
        if manifest_path.exists():
            self.manifest = read_json(manifest_path)
            if self.manifest.get("world_size", 1) != world_size:
                raise StoreError(f"cannot resume: {self.path} was recorded by {self.manifest.get('world_size', 1)} "
                                 f"ranks, this run has {world_size}")
            StoreWriter.check_resume(Store(self.path).config, config)
        else:
            _check_new_dir(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            write_projections(self.path, config.layers, fsync)
            self.manifest = {**new_manifest(config), "world_size": world_size}
            self.commit(0, 0)

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
