"""Store format: crash consistency, resume, dtypes, validation, no pickle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dvemb
from dvemb.store import HEADER_BYTES, Store, StoreError, StoreWriter, to_torch

WRITER = textwrap.dedent("""
    import os, signal, sys, torch, torch.nn.functional as F
    from torch import nn
    import dvemb
    from dvemb.store import StoreWriter
    path, kill_at = sys.argv[1], int(sys.argv[2])
    if kill_at >= 0:  # die right after the rows of step `kill_at` are written, before its commit
        original = StoreWriter._write_manifest
        def write_manifest(self):
            if self.manifest["committed_steps"] == kill_at + 1:
                os.kill(os.getpid(), signal.SIGKILL)
            original(self)
        StoreWriter._write_manifest = write_manifest
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 4))
    rec = dvemb.Recorder(model, path, projection_dim=64, projection="gaussian")  # commits from the first step
    step = 0
    while True:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 20, generator=g), torch.randint(0, 4, (8,), generator=g)
        with rec.step(range(8 * step, 8 * step + 8), lr=0.1):
            F.cross_entropy(model(x), y).backward()
        model.zero_grad()
        if kill_at >= 0:
            rec.flush()  # one commit per step, so the kill lands on step `kill_at` exactly
        print(rec.steps, flush=True)
        step += 1
""")


def run_writer(path, kill_at: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(kill_at)],
                            stdout=subprocess.PIPE, text=True)


def assert_consistent(store: Store, batch: int = 8) -> None:
    """Exactly the committed steps are visible, with whole, finite rows."""
    rec = store.records
    assert store.n_records == batch * store.n_steps
    assert rec["step"].tolist() == [t for t in range(store.n_steps) for _ in range(batch)]
    assert rec["sample_id"].tolist() == list(range(batch * store.n_steps))
    for i in range(len(store.layers)):
        assert np.isfinite(store.grads(i)).all()


def test_killed_between_write_and_commit_opens_with_committed_steps(tmp_path):
    proc = run_writer(tmp_path / "s", kill_at=3)
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    store = Store(tmp_path / "s")
    assert store.n_steps == 3  # step 3's rows hit the disk but were never committed
    assert_consistent(store)
    # the uncommitted rows are on disk beyond the committed ones
    grads_file = store.path / "grads" / f"{store.layers[0].name}.npy"
    assert grads_file.stat().st_size > HEADER_BYTES + 3 * 8 * store.layers[0].dim * 4


def test_killed_at_random_moment_then_resumed(tmp_path):
    proc = run_writer(tmp_path / "s", kill_at=-1)
    for line in proc.stdout:  # let it commit a few steps (in the background), then kill it while it keeps writing
        if int(line) >= 5 and Store(tmp_path / "s").n_steps >= 5:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    store = Store(tmp_path / "s")
    assert store.n_steps >= 5
    assert_consistent(store)
    committed = store.n_steps

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 4))
    with pytest.warns(UserWarning, match="cannot check that the model continues"), \
            dvemb.Recorder(model, tmp_path / "s", projection_dim=64, projection="gaussian", mode="resume") as rec:
        assert rec.steps == committed
        with rec.step(range(8 * committed, 8 * committed + 8), lr=0.1):
            F.cross_entropy(model(torch.randn(8, 20)), torch.randint(0, 4, (8,))).backward()
    store = Store(tmp_path / "s")
    assert store.n_steps == committed + 1
    assert_consistent(store)
    for i, spec in enumerate(store.layers):  # garbage beyond the commit was truncated
        size = (store.path / "grads" / f"{spec.name}.npy").stat().st_size
        assert size == HEADER_BYTES + store.n_records * spec.dim * 4


def tiny_run(path, steps=3, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(4 * steps, 6), torch.randint(0, 3, (4 * steps,))
    with dvemb.Recorder(model, path, dtype=dtype, **kw) as rec:
        for t in range(steps):
            ids = list(range(4 * t, 4 * t + 4))
            with rec.step(ids, lr=0.1):
                F.cross_entropy(model(x[ids]), y[ids]).backward()
            model.zero_grad()
    return model, x, y


def test_files_are_plain_npy_and_json(tmp_path):
    tiny_run(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["committed_steps"] == 3 and manifest["format_version"] == 3
    assert [layer["name"] for layer in manifest["layers"]] == ["0", "2"]
    records = np.load(tmp_path / "s" / "records.npy", allow_pickle=False)
    assert records.shape == (12,) and records["step"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    grads = np.load(tmp_path / "s" / "grads" / "0.npy", allow_pickle=False)
    assert grads.shape == (12, 35)  # 5 x (6 + bias), unprojected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_storage_dtypes_round_trip(tmp_path, dtype):
    tiny_run(tmp_path / "ref", dtype=torch.float64)
    tiny_run(tmp_path / "s", dtype=dtype)
    ref, store = Store(tmp_path / "ref"), Store(tmp_path / "s")
    assert store.dtype == str(dtype).removeprefix("torch.")
    got = to_torch(store.grads(0), store.dtype)
    assert got.dtype == dtype
    want = to_torch(ref.grads(0), "float64")
    # half precisions keep 8 (bf16) or 11 (fp16) mantissa bits: relative error <= 2^-8
    assert ((got.double() - want).norm() / want.norm()) < 4e-3


def test_float64_model_float32_model_both_work(tmp_path):
    model, x, y = tiny_run(tmp_path / "s")
    inf = dvemb.influence(tmp_path / "s", model, lambda: F.cross_entropy(model(x[:2]), y[:2], reduction="none"))
    model64 = model.double()
    inf64 = dvemb.influence(tmp_path / "s", model64,
                            lambda: F.cross_entropy(model64(x[:2].double()), y[:2], reduction="none"))
    np.testing.assert_allclose(inf.scores, inf64.scores, rtol=1e-4, atol=1e-7)


def test_mismatched_model_is_a_clear_error_naming_the_layer(tmp_path):
    tiny_run(tmp_path / "s")
    other = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match=r"layer '2' does not match the store: recorded linear 5->3 \+bias, "
                                         r"model has linear 5->4 \+bias"):
        dvemb.influence(tmp_path / "s", other, lambda: other(x).sum(1))
    missing = nn.Sequential(nn.Linear(6, 5))
    with pytest.raises(ValueError, match="store tracks layer '2'"):
        dvemb.influence(tmp_path / "s", missing, lambda: missing(x).sum(1))
    with pytest.raises(StoreError, match="cannot resume: layer '2'"):
        dvemb.Recorder(other, tmp_path / "s", mode="resume")
    tiny_run(tmp_path / "p", projection_dim=8, projection="gaussian")
    with pytest.raises(StoreError, match="projection"):
        tiny_run(tmp_path / "p", projection_dim=8, projection="rademacher", mode="resume")


def test_non_finite_gradients_commit_nothing(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    with dvemb.Recorder(model, tmp_path / "s") as rec:
        with rec.step(range(4), lr=0.1):
            F.cross_entropy(model(x), y).backward()
        bad = x.clone()
        bad[1, 2] = float("nan")
        with pytest.raises(dvemb.NonFiniteGradientError, match="layer '0' at step 1"):
            with rec.step(range(4, 8), lr=0.1):
                F.cross_entropy(model(bad), y).backward()
        rec.flush()  # commits run in a background thread
        assert Store(tmp_path / "s").n_steps == 1
        model.zero_grad()
        with rec.step(range(8, 12), lr=0.1):  # recording continues after the error
            F.cross_entropy(model(x), y).backward()
    store = Store(tmp_path / "s")
    assert store.n_steps == 2 and store.records["sample_id"].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]


def test_exception_inside_step_commits_nothing(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    with dvemb.Recorder(model, tmp_path / "s") as rec:
        with pytest.raises(KeyError):
            with rec.step([0, 1], lr=0.1):
                model(torch.randn(2, 3)).sum().backward()
                raise KeyError("user code failed")
    assert Store(tmp_path / "s").n_steps == 0


def test_invalid_stores(tmp_path):
    with pytest.raises(StoreError, match="not a dvemb store"):
        Store(tmp_path)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        dvemb.Recorder(nn.Linear(2, 2), tmp_path / "junk")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        Store(tmp_path / "bad")


def test_info_summary(tmp_path):
    tiny_run(tmp_path / "s", projection_dim=8)
    text = Store(tmp_path / "s").summary()
    assert "steps      3" in text and "records    12" in text and "embeddings not computed" in text
    assert "update     SGD\n" in text
    dvemb.compute_embeddings(tmp_path / "s", show_progress=False)
    assert "embeddings up to date" in Store(tmp_path / "s").summary()


def test_manifest_missing_keys_is_a_store_error(tmp_path):
    (tmp_path / "manifest.json").write_text('{"format_version": 1}')
    with pytest.raises(StoreError, match="missing library_version"):
        Store(tmp_path)


def test_shard_rolls_back_to_the_global_commit(tmp_path):
    """A distributed shard that committed one step more than rank 0's manifest drops it on resume."""
    from dvemb.store import StoreWriter

    model, x, y = tiny_run(tmp_path / "s", steps=3)
    config = Store(tmp_path / "s").config
    writer = StoreWriter(tmp_path / "s", config, rollback_to_steps=2, mode="resume")
    writer.close()
    store = Store(tmp_path / "s")
    assert store.n_steps == 2 and store.n_records == 8
    assert (store.path / "records.npy").stat().st_size == HEADER_BYTES + 8 * store.records.dtype.itemsize


def test_background_commits_group_steps_and_catch_up_when_idle(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    commits = []
    original = StoreWriter._write_manifest

    def counting(self):
        commits.append(self.n_steps)
        original(self)

    StoreWriter._write_manifest = counting
    try:
        with dvemb.Recorder(model, tmp_path / "s") as rec:
            rec._sink._writer.commit_interval = 10.0  # nothing commits by time during the steps below
            for t in range(3):
                with rec.step(range(4 * t, 4 * t + 4), lr=0.1):
                    F.cross_entropy(model(x[4 * t: 4 * t + 4]), y[4 * t: 4 * t + 4]).backward()
            rec.flush()  # the three steps, one commit
            assert commits == [0, 3] and Store(tmp_path / "s").n_steps == 3
            rec._sink._writer.commit_interval = 0.02
            with rec.step([12, 13], lr=0.1):
                F.cross_entropy(model(x[:2]), y[:2]).backward()
            deadline = time.monotonic() + 5
            while Store(tmp_path / "s").n_steps < 4 and time.monotonic() < deadline:  # no flush: the timer commits
                time.sleep(0.005)
            assert Store(tmp_path / "s").n_steps == 4
    finally:
        StoreWriter._write_manifest = original


def test_prefetched_rows_yield_each_range_in_order_and_close_early(tmp_path):
    from dvemb.store import AppendableArray, PrefetchedRows
    arrays = []
    for i, dim in enumerate((3, 5)):
        arr = AppendableArray(tmp_path / f"a{i}.npy", np.float32, (dim,))
        arr.open_for_append(0)
        arr.append(np.arange(20 * dim, dtype=np.float32).reshape(20, dim) + 1000 * i)
        arr.close(20)
        arrays.append(arr)
    ranges = [(0, 7), (7, 14), (14, 20), (2, 3)]
    rows = PrefetchedRows(arrays, ranges, max_rows=7)
    try:
        for (r0, r1), got in zip(ranges, rows):
            for arr, block in zip(arrays, got):  # equal to the .npy file's rows (np.load: independent reader)
                np.testing.assert_array_equal(block, np.load(arr.path)[r0:r1])
    finally:
        rows.close()
    early = PrefetchedRows(arrays, ranges, max_rows=7)
    next(iter(early))
    early.close()  # returns although the reader thread was waiting for a free buffer
    broken = PrefetchedRows(arrays, [(0, 7), (15, 22)], max_rows=7)  # the second range runs past the end
    try:
        with pytest.raises(StoreError, match="ends before row 22"):
            list(broken)
    finally:
        broken.close()


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident set read from Linux /proc")
@pytest.mark.parametrize("release", [False, True])
def test_mapped_scans_read_every_row_and_release_scanned_pages(tmp_path, release):
    from dvemb.store import AppendableArray, MappedArrays
    arr = AppendableArray(tmp_path / "a.npy", np.float32, (1024,))
    arr.open_for_append(0)
    for block in range(8):  # 32 MiB in 8 appends
        arr.append(np.full((1024, 1024), block, dtype=np.float32) + np.arange(1024, dtype=np.float32))
    arr.close(8192)
    ranges = [(r, min(r + 300, 8192)) for r in range(0, 8192, 300)]  # ranges not aligned to pages
    mapped = MappedArrays(release_scanned=release)
    before, peak = _resident_bytes(), 0
    for (r0, r1), (rows,) in zip(ranges, mapped.scan([arr], ranges, 300)):
        np.testing.assert_array_equal(rows, np.load(arr.path, mmap_mode="r")[r0:r1])  # an independent reader
        peak = max(peak, _resident_bytes() - before)
    grown = _resident_bytes() - before
    if release:  # one range (1.2 MiB) and np.load's pages at most, never the 32 MiB file
        assert grown < 8 << 20 and peak < 8 << 20
    else:  # the mapping keeps what was scanned
        assert grown > 24 << 20
    mapped.close()


def test_reallocated_array_leaves_open_mappings_intact(tmp_path):
    from dvemb.store import AppendableArray
    arr = AppendableArray(tmp_path / "a.npy", np.float32, (4,))
    arr.allocate(3)
    rows = arr.row_file()
    rows[0:3] = np.ones((3, 4), dtype=np.float32)
    rows.close()
    old = arr.read(3)
    arr.allocate(1)  # recomputed embeddings: a new, shorter file under the same name
    np.testing.assert_array_equal(old, np.ones((3, 4)))  # the old mapping still reads its own file (no SIGBUS)
    assert np.load(arr.path).shape == (1, 4)
