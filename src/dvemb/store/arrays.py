"""Array I/O of a store: fixed-header .npy files that grow by rows, and the ways to read them back.

Every array is a standard .npy file with a fixed 256-byte header, so its row count can be
rewritten in place when the writer closes (``np.load`` then sees every committed row). While a
store is written, readers trust the manifest's committed counts, not the headers.
"""

from __future__ import annotations

import ast
import contextlib
import json
import mmap
import os
import queue
import threading
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .schema import StoreError

HEADER_BYTES = 256  # fixed .npy header size so the shape can be rewritten in place


def release_pages(array: object) -> None:
    """Drop a memmap's pages from this process's resident set (the data stays in the page cache / file).

    Streaming through a store touches every page of its files; without this, the mapped
    pages count towards the process's RSS until the map is closed. Shared dirty pages are
    kept by the kernel and written back as usual.
    """
    parts = getattr(array, "parts", None)  # rows gathered from a distributed store's shards
    if parts is not None:
        for part in parts:
            release_pages(part)
        return
    mm = getattr(array, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


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
        """Drop uncommitted rows (also after a failed write, whose buffered bytes cannot be flushed)."""
        assert self._file is not None
        try:
            self._file.flush()
        except OSError:  # e.g. the disk is full: drop the buffer with the file object
            with contextlib.suppress(OSError):
                self._file.close()  # closes the descriptor even when its final flush fails
            self._file = open(self.path, "r+b")
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
    """Load a JSON object from a file, as a clear StoreError when missing, unreadable or not a JSON object."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{path} not found: not a dvemb store (or not yet written)") from None
    except UnicodeDecodeError as exc:
        raise StoreError(f"{path} is corrupt: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path} is corrupt: {exc}") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of thousands of digits, nesting too deep
        raise StoreError(f"{path} is corrupt: {' '.join(str(exc).split()) or type(exc).__name__}") from None
    except OSError as exc:
        raise StoreError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path} is invalid: a JSON object was expected, got a JSON {type(data).__name__}")
    return data


def npy_header(path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, data offset) of a .npy file, read from its header alone (no data; the header is parsed
    as Python literals, so no object is ever deserialised); a StoreError says what is wrong with a file that
    is not a plain C-ordered .npy array."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise StoreError(f"{path} is missing") from None
    except OSError as exc:
        raise StoreError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if len(head) < 10 or head[:6] != b"\x93NUMPY" or head[6] not in (1, 2, 3):
        raise StoreError(f"{path} is not a .npy array (bad header magic)")
    size_bytes = 2 if head[6] == 1 else 4
    start = 8 + size_bytes
    offset = start + int.from_bytes(head[8:start], "little")
    if offset > HEADER_BYTES:
        raise StoreError(f"{path}: its .npy header is {offset} bytes, the store writes {HEADER_BYTES}")
    if offset > len(head):
        raise StoreError(f"{path} is truncated inside its .npy header")
    try:
        text = head[start:offset].decode("utf-8" if head[6] == 3 else "latin1")
        header = ast.literal_eval(text)  # literals only: never runs code
        if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
            raise ValueError("not a .npy header")
        dtype = np.lib.format.descr_to_dtype(header["descr"])
        shape = header["shape"]
        if header["fortran_order"] is not False or not isinstance(shape, tuple) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise ValueError("not a C-ordered array")
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: unreadable .npy header ({' '.join(str(exc).split())[:80]})") from None
    return dtype, shape, offset


def check_array(array: "AppendableArray", rows: int) -> None:
    """That ``array``'s file holds at least ``rows`` rows of its dtype and row shape after the store's fixed
    header (its header's row count is not trusted: the manifest's committed counts are). Reads the header only."""
    if rows == 0 and not array.path.exists():  # nothing committed: the file may not be written yet
        return
    dtype, shape, offset = npy_header(array.path)
    if dtype.hasobject or dtype != array.dtype:
        raise StoreError(f"{array.path} holds {dtype} values, the store expects {array.dtype}")
    if tuple(shape[1:]) != array.row_shape:
        raise StoreError(f"{array.path} has rows of shape {tuple(shape[1:])}, the store expects {array.row_shape}")
    if offset != HEADER_BYTES:
        raise StoreError(f"{array.path}: its .npy header is {offset} bytes, the store writes {HEADER_BYTES}")
    size = os.path.getsize(array.path)
    if size < HEADER_BYTES + rows * array.row_bytes:
        raise StoreError(f"{array.path} is truncated: {(size - HEADER_BYTES) // max(1, array.row_bytes)} complete "
                         f"rows, the store has committed {rows}")
