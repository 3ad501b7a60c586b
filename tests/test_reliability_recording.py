"""Recording under failure: kill -9 at random moments, two writers, a full disk, re-runs, bad inputs.

The store side (damaged files, crafted manifests) is in test_reliability_store.py.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dvemb
from dvemb.store import Store, StoreError
from dvemb.store.arrays import AppendableArray
from test_store import assert_consistent

# Records steps of 8 samples (ids 8t .. 8t+7) until killed, resuming whatever the path holds.
WRITER = textwrap.dedent("""
    import sys, warnings, torch, torch.nn.functional as F
    from torch import nn
    import dvemb
    warnings.simplefilter("ignore")  # a killed run cannot be checked for continuity: warned on resume
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 4))
    rec = dvemb.Recorder(model, sys.argv[1], projection_dim=64, projection="gaussian", mode="resume")
    while True:
        t = rec.steps
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(8, 20, generator=g), torch.randint(0, 4, (8,), generator=g)
        with rec.step(range(8 * t, 8 * t + 8), lr=0.1):
            F.cross_entropy(model(x), y).backward()
        model.zero_grad()
        print(rec.steps, flush=True)
""")


def kill_while_recording(path, rng: random.Random) -> None:
    """Start (or resume) a writer, let it record 1-6 steps plus 0-30 ms, then kill -9 it."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    wanted = rng.randint(1, 6)
    for k, _ in enumerate(proc.stdout, start=1):
        if k >= wanted:
            break
    time.sleep(rng.uniform(0, 0.03))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def crash_resume_cycles(path, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    previous = 0
    for _ in range(kills):
        kill_while_recording(path, rng)
        store = Store(path)
        assert store.n_steps >= previous  # committed steps survive every later crash
        assert_consistent(store)  # whole steps, ids in order, no gap where a run resumed
        previous = store.n_steps
    grads_file = path / "grads" / f"{store.layers[0].name}.npy"
    assert grads_file.stat().st_size >= store.n_records * store.layers[0].dim * 4


def test_kill_9_at_random_moments_then_resume(tmp_path):
    crash_resume_cycles(tmp_path / "s", kills=3, seed=0)


@pytest.mark.slow
def test_kill_9_at_many_random_moments_then_resume(tmp_path):
    crash_resume_cycles(tmp_path / "s", kills=24, seed=1)


def small_run(path, steps: int = 3, mode: str = "new", model: nn.Module | None = None, **kw) -> nn.Module:
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dvemb.Recorder(model, path, optimizer=opt, mode=mode, **kw) as rec:
        for _ in range(steps):
            t = rec.steps
            with rec.step(range(4 * t, 4 * t + 4)):
                F.cross_entropy(model(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
            opt.step()
            opt.zero_grad()
    return model


def test_a_rerun_into_the_same_path_is_refused_unless_asked_to_resume_or_overwrite(tmp_path):
    model = small_run(tmp_path / "s")
    with pytest.raises(StoreError, match="already holds a recorded run of 3 steps: pass mode='resume'"):
        small_run(tmp_path / "s")
    assert Store(tmp_path / "s").n_steps == 3  # untouched
    small_run(tmp_path / "s", mode="resume", model=model)  # the model the run ended with continues it
    assert Store(tmp_path / "s").n_steps == 6
    assert_consistent(Store(tmp_path / "s"), batch=4)
    small_run(tmp_path / "s", steps=2, mode="overwrite")
    assert Store(tmp_path / "s").n_steps == 2
    with pytest.raises(ValueError, match="mode must be one of"):
        small_run(tmp_path / "t", mode="append")


def test_resume_checks_the_model_continues_the_recorded_run(tmp_path):
    model = small_run(tmp_path / "s")
    with torch.no_grad():
        model[0].weight.add_(1e-3)
    with pytest.raises(StoreError, match="not those the recorded run ended with after step 3"):
        small_run(tmp_path / "s", mode="resume", model=model)
    assert Store(tmp_path / "s").n_steps == 3


def test_two_writers_on_one_store(tmp_path):
    model = nn.Linear(4, 2)
    with dvemb.Recorder(model, tmp_path / "s"):
        with pytest.raises(StoreError, match=rf"is being written by process {os.getpid()}: one writer at a time"):
            dvemb.Recorder(nn.Linear(4, 2), tmp_path / "s", mode="resume")
    with dvemb.Recorder(model, tmp_path / "s", mode="overwrite"):  # the lock went with the first writer
        pass


def test_a_writer_in_another_process_holds_the_store_until_it_dies(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "s")], stdout=subprocess.PIPE, text=True)
    try:
        assert int(proc.stdout.readline()) >= 1
        with pytest.raises(StoreError, match=rf"being written by process {proc.pid}"):
            dvemb.Recorder(nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 4)), tmp_path / "s",
                           projection_dim=64, projection="gaussian", mode="resume")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    crash_resume_cycles(tmp_path / "s", kills=1, seed=2)  # the kernel dropped the dead writer's lock


def fail_writes_after(monkeypatch, calls: int, error: int = errno.ENOSPC) -> None:
    """Make the store's row writes fail with ``error`` after ``calls`` successful ones."""
    original, count = AppendableArray.append, [0]

    def append(self, rows):
        count[0] += 1
        if count[0] > calls:
            raise OSError(error, os.strerror(error))
        original(self, rows)

    monkeypatch.setattr(AppendableArray, "append", append)


def test_a_full_disk_is_one_clear_error_and_keeps_whole_steps(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    rec = dvemb.Recorder(model, tmp_path / "s", projection_dim=None, curvature="gradient_outer")
    fail_writes_after(monkeypatch, calls=3 * 4 + 1)  # records + 2 layers per step: step 4 fails part-way
    with pytest.raises(StoreError, match="writing failed: the disk is full; the store keeps its committed steps") \
            as failure:
        for t in range(10):
            with rec.step(range(4 * t, 4 * t + 4), lr=0.1):
                F.cross_entropy(model(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
            model.zero_grad()
            rec.flush()
    assert "Traceback" not in str(failure.value) and "\n" not in str(failure.value)
    with pytest.raises(StoreError, match="the disk is full"):  # the writer stays stopped: no gap in the steps
        rec.flush()
    rec.close()  # the error was raised: closing keeps the committed steps without raising it again
    monkeypatch.undo()  # space was freed
    store = Store(tmp_path / "s")
    assert store.n_steps == 4
    assert_consistent(store, batch=4)
    with pytest.warns(UserWarning, match="cannot check"), \
            dvemb.Recorder(model, tmp_path / "s", projection_dim=None, curvature="gradient_outer", mode="resume") as rec:
        assert rec.steps == 4
    assert Store(tmp_path / "s").n_steps == 4


WRITE_LIMITED = textwrap.dedent("""
    import resource, signal, sys, torch, torch.nn.functional as F
    from torch import nn
    import dvemb
    from dvemb.store import StoreError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (40000, 40000))
    model = nn.Sequential(nn.Linear(30, 20), nn.Tanh(), nn.Linear(20, 3))
    with dvemb.Recorder(model, sys.argv[1], projection_dim=None, curvature="gradient_outer") as rec:
        try:
            for t in range(1000):
                with rec.step(range(4 * t, 4 * t + 4), lr=0.1):
                    F.cross_entropy(model(torch.randn(4, 30)), torch.randint(0, 3, (4,))).backward()
                model.zero_grad()
                rec.flush()
        except StoreError as exc:
            print(exc)
""")


def test_a_real_write_failure_from_the_kernel(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes past 40 kB (EFBIG), as a full disk would (ENOSPC): layer 0
    keeps 4 x 620 float32 values a step, so its file holds 4 steps (39,680 bytes + a 256-byte header) and not a fifth."""
    out = subprocess.run([sys.executable, "-c", WRITE_LIMITED, str(tmp_path / "s")], capture_output=True, text=True,
                         timeout=120)
    assert "writing failed: File too large; the store keeps its committed steps" in out.stdout, out.stderr
    assert "Traceback" not in out.stderr
    store = Store(tmp_path / "s")
    assert store.n_steps == 4 and (tmp_path / "s" / "grads" / "0.npy").stat().st_size <= 40000
    assert_consistent(store, batch=4)


@pytest.mark.parametrize("ids, message", [
    ([0, -1], "non-negative"),
    ([3, 3], r"distinct within a step: \[3\] repeat"),
    (np.array([0, 2 ** 63], dtype=np.uint64), "below 2\\^63"),
    ([0.5, 1.0], "1-D sequence of integers"),
    ([], "at least one sample id"),
])
def test_bad_sample_ids_are_refused_before_anything_is_written(tmp_path, ids, message):
    model = nn.Linear(3, 2)
    with dvemb.Recorder(model, tmp_path / "s") as rec:
        with pytest.raises((ValueError, TypeError), match=message):
            rec.begin_step(ids, lr=0.1)
    assert Store(tmp_path / "s").n_steps == 0


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -0.1])
def test_bad_learning_rates_are_refused(tmp_path, lr):
    with dvemb.Recorder(nn.Linear(3, 2), tmp_path / "s") as rec:
        with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
            rec.begin_step([0, 1], lr=lr)


def test_an_lr_the_optimizer_does_not_apply_is_warned_about_once(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dvemb.Recorder(model, tmp_path / "s", optimizer=opt) as rec:
        with pytest.warns(UserWarning, match=r"lr=0.2 was given to Recorder.step but the optimizer applies lr=0.1"):
            for t in range(3):
                with rec.step([2 * t, 2 * t + 1], lr=0.2):
                    model(torch.randn(2, 3)).sum().backward()
                opt.step()
        opt.zero_grad()
        with rec.step([6, 7], lr=0.1):  # the same lr: no warning
            model(torch.randn(2, 3)).sum().backward()
        opt.step()


def test_a_layer_too_large_for_memory_is_refused_up_front(tmp_path, monkeypatch):
    sysconf = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 64 if name == "SC_PHYS_PAGES" else sysconf(name))
    with pytest.raises(MemoryError, match=r"layer '0' keeps 1,010 values per record .* project it"):
        dvemb.Recorder(nn.Sequential(nn.Linear(100, 10)), tmp_path / "s", projection_dim=None)
    assert not (tmp_path / "s" / "manifest.json").exists()


ABANDONED = textwrap.dedent("""
    import sys, torch, torch.nn.functional as F
    from torch import nn
    import dvemb
    model = nn.Linear(5, 3)
    rec = dvemb.Recorder(model, sys.argv[1], projection_dim=None)
    for t in range(3):
        with rec.step(range(2 * t, 2 * t + 2), lr=0.1):
            F.cross_entropy(model(torch.randn(2, 5)), torch.tensor([0, 1])).backward()
    globals()["keep"] = rec  # never closed: the script just ends
""")


def test_a_recorder_never_closed_is_committed_at_exit(tmp_path):
    out = subprocess.run([sys.executable, "-c", ABANDONED, str(tmp_path / "s")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "was never closed: closed at exit" in out.stderr
    store = Store(tmp_path / "s")
    assert store.n_steps == 3 and store.manifest["parameters"]["step"] == 3


def test_module_names_that_are_no_file_names_are_stored_under_safe_stems(tmp_path):
    """ModuleDict keys may hold separators, spaces or any letter: the store names such a layer
    safe_name(module name), inside the store, and queries find the module by either name."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.ModuleDict({"in/up": nn.Linear(4, 3), "層 1": nn.Linear(3, 2)})

        def forward(self, x):
            return self.body["層 1"](torch.tanh(self.body["in/up"](x)))

    torch.manual_seed(0)
    model = Net()
    forward = model
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    with dvemb.Recorder(model, tmp_path / "s", projection_dim=None) as rec:
        with rec.step(range(6), lr=0.1):
            F.cross_entropy(forward(x), y).backward()
    names = [s.name for s in Store(tmp_path / "s").layers]
    assert names == [dvemb.store.safe_name("body.in/up"), dvemb.store.safe_name("body.層 1")]
    assert all("/" not in n and not n.startswith(".") for n in names)
    assert sorted(p.name for p in (tmp_path / "s" / "grads").iterdir()) == sorted(f"{n}.npy" for n in names)
    inf = dvemb.influence(tmp_path / "s", model, lambda: F.cross_entropy(forward(x), y, reduction="none"))
    assert inf.scores.shape == (6, 6) and np.isfinite(inf.scores).all()


# -- compute_embeddings --------------------------------------------------------------------------

# Computes a store's embeddings and kills itself (SIGKILL) at point argv[2]: after that many steps of the
# recursion, right after the files are allocated (-2), or with every file written but the manifest (-1).
COMPUTE = textwrap.dedent("""
    import os, signal, sys, dvemb
    from dvemb.embed import compute
    point = int(sys.argv[2])
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    if point == -1:
        compute.write_json_atomic = die
    elif point == -2:
        allocate = compute._allocate
        compute._allocate = lambda *args: (allocate(*args), die())
    else:
        update, done = compute.ProgressBar.update, []
        def counting(self, n=1):
            done.append(n)
            if len(done) > point:
                die()
            return update(self, n)
        compute.ProgressBar.update = counting
    dvemb.compute_embeddings(sys.argv[1], show_progress=False)
    print("done", flush=True)
""")


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A store of 240 steps (3 exact layers, one global block) and its scores."""
    path = tmp_path_factory.mktemp("long") / "s"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 20), nn.Tanh(), nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(64, 24), torch.randint(0, 4, (64,))
    with dvemb.Recorder(model, path, projection_dim=None) as rec:
        for t in range(240):
            ids = [(8 * t + k) % 64 for k in range(8)]
            with rec.step(range(8 * t, 8 * t + 8), lr=0.05):
                F.cross_entropy(model(x[ids]), y[ids]).backward()
            model.zero_grad()
    dvemb.compute_embeddings(path, show_progress=False)
    reference = dvemb.influence(path, model, lambda: F.cross_entropy(model(x[:4]), y[:4], reduction="none"))
    return path, model, x, y, reference.scores


def kill_while_computing(src, dst, point: int) -> None:
    """Copy the store without its embeddings, compute them, and kill -9 the computation at ``point``."""
    import shutil
    shutil.copytree(src, dst, ignore=lambda d, names: ["embeddings"] if d == str(src) else [])
    out = subprocess.run([sys.executable, "-c", COMPUTE, str(dst), str(point)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == -signal.SIGKILL and "done" not in out.stdout, out.stderr  # killed while computing


def check_kills_while_computing(tmp_path, long_run, kills: int, seed: int) -> None:
    path, model, x, y, want = long_run
    points = [-2, -1, *random.Random(seed).sample(range(240), kills - 2)]  # the 240 steps of the recursion
    for k, point in enumerate(points):
        dst = tmp_path / f"k{k}"
        kill_while_computing(path, dst, point)
        Store(dst)  # the store itself was only read
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # recomputed as missing, or as stale
            got = dvemb.influence(dst, model, lambda: F.cross_entropy(model(x[:4]), y[:4], reduction="none"))
        np.testing.assert_allclose(got.scores, want, rtol=1e-5, atol=1e-8)  # float32 recursion, same order


def test_kill_9_while_computing_embeddings(tmp_path, long_run):
    check_kills_while_computing(tmp_path, long_run, kills=3, seed=0)


@pytest.mark.slow
def test_kill_9_at_many_moments_while_computing_embeddings(tmp_path, long_run):
    check_kills_while_computing(tmp_path, long_run, kills=20, seed=1)


def test_one_computation_at_a_time_while_recording_goes_on(tmp_path):
    from dvemb.store.lock import StoreLock

    model = small_run(tmp_path / "s")
    lock = StoreLock(tmp_path / "s" / "embeddings", "computed")
    try:
        with pytest.raises(StoreError, match=rf"embeddings is being computed by process {os.getpid()}"):
            dvemb.compute_embeddings(tmp_path / "s", show_progress=False)
        small_run(tmp_path / "s", steps=1, mode="resume", model=model)  # the store's own lock is another
    finally:
        lock.release()
    dvemb.compute_embeddings(tmp_path / "s", show_progress=False)


def test_embeddings_that_cannot_fit_are_refused_before_any_file_is_written(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    small_run(tmp_path / "s", projection_dim=None)
    monkeypatch.setattr("dvemb.resources.physical_memory", lambda: 1000)
    with pytest.raises(MemoryError, match=r"compute_embeddings \(global plan, 1 blocks, float32, 1 worker\(s\)\) "
                                          r"needs .* GiB and this machine has 0.0 GiB: use blocking='layer'"):
        dvemb.compute_embeddings(tmp_path / "s", show_progress=False)
    monkeypatch.undo()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 6, 10 ** 6, 100))
    with pytest.raises(OSError, match="compute_embeddings needs .* GiB on disk and .* has 0.00 GiB free"):
        dvemb.compute_embeddings(tmp_path / "s", show_progress=False)
    assert not (tmp_path / "s" / "embeddings").exists()
