"""Capture under mixed precision and on devices: autocast bfloat16, GradScaler, asynchronous host copies.

Each test compares stored rows with an independent recording of the same step (float32, unscaled,
or the synchronous path), or checks what the store holds after a skipped or non-finite step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dvemb
from dvemb.capture import transfer
from dvemb.store import Store, to_torch
from reference import rel_err

# bfloat16 keeps 8 significant bits: unit roundoff u = 2^-8 ~ 3.9e-3. Under autocast every Linear /
# Conv rounds its input, its weight and its output to bfloat16 (products accumulate in float32), and
# the backward pass rounds the output gradients again: a row (output gradient x input, projected in
# float32) carries a few such roundings from each of the <= 3 layers it depends on. Independent
# roundings add in quadrature, so the relative (Frobenius) error of a layer's rows is a small multiple
# of u: measured 3e-3 to 7e-3 here. 5u ~ 2e-2 bounds it with margin, and is far below what a wrong
# row gives (another sample's row, or a missed factor: relative errors of order 1).
BF16_TOL = 5 * 2.0 ** -8


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 5))


def cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 3, stride=2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(3 * 2 * 2, 5))


class TokenStack(nn.Module):
    """GPT-2-like: per-token Linear layers (inputs [B, T, d]) with a residual MLP block and an LM head."""

    def __init__(self, d: int = 8, vocab: int = 7) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.inp = nn.Linear(d, d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = h + self.proj(F.gelu(self.fc(h)))
        return self.head(h)


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1))


def record_step(make, path, x, y, amp: bool, **kw) -> Store:
    """One recorded step of a fresh model on (x, y), the forward under bfloat16 autocast or not."""
    model = make()
    with dvemb.Recorder(model, path, **kw) as rec, rec.step(range(len(x)), lr=0.1):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        assert out.dtype == (torch.bfloat16 if amp else torch.float32)  # autocast did run in bfloat16
        _loss(out, y).backward()
    return Store(path)


def sample_curvature(store: Store, layer: int) -> torch.Tensor:
    """Each record's curvature matrix sum_s c_s c_s^T [n, dim, dim] from its stored rows."""
    rows = to_torch(store.curvature(layer), store.dtype).double()
    factors = rows.reshape(rows.shape[0], store.curvature_passes, -1)
    return factors.transpose(1, 2) @ factors


CASES = {
    "mlp": (mlp, lambda g: (torch.randn(6, 12, generator=g), torch.randint(0, 5, (6,), generator=g))),
    "cnn": (cnn, lambda g: (torch.randn(5, 2, 6, 6, generator=g), torch.randint(0, 5, (5,), generator=g))),
    "tokens": (TokenStack, lambda g: (torch.randn(4, 5, 8, generator=g), torch.randint(0, 7, (4, 5), generator=g))),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("settings", [dict(projection="gaussian", projection_dim=16), dict(projection_dim=None)],
                         ids=["gaussian16", "exact"])
def test_autocast_bfloat16_rows_match_float32(tmp_path, case, settings):
    make, data = CASES[case]
    x, y = data(torch.Generator().manual_seed(3))
    # exact output factors (C - 1 passes): the default's last pass sums the smaller factors with random
    # signs, a draw that changes when bf16 rounding rotates nearly tied eigenvectors (the same in law, not
    # row by row); the exact factors' sum_s c c^T does not depend on the rotation
    settings = {**settings, "curvature_samples": None}
    full = record_step(make, tmp_path / "f32", x, y, amp=False, **settings)
    half = record_step(make, tmp_path / "bf16", x, y, amp=True, **settings)
    assert half.n_records == full.n_records == len(x)
    for i, spec in enumerate(full.layers):
        want = to_torch(full.grads(i), full.dtype).double()
        assert want.norm() > 0
        assert rel_err(to_torch(half.grads(i), half.dtype).double(), want) < BF16_TOL, spec.name
        # ggn rows (from a nested bf16 backward) are each sample's factors c_is with H_i = sum_s c_is c_is^T,
        # defined up to a rotation among the passes s: where the output curvature's eigenvalues nearly tie (a
        # near-uniform softmax here) bf16 rounding rotates them freely. H_i is what the recursion uses: it is
        # quadratic in the rows, so its relative error is at most about twice theirs.
        assert rel_err(*(sample_curvature(s, i) for s in (half, full))) < 2 * BF16_TOL, spec.name


def test_autocast_bfloat16_with_bfloat16_storage_and_fitted_bases(tmp_path):
    """The default fitted projection fits its bases on bfloat16 factors; rows stored as bfloat16 too."""
    x, y = CASES["tokens"][1](torch.Generator().manual_seed(4))
    kw = dict(projection_dim=8, fit_steps=1, dtype=torch.bfloat16)
    full = record_step(TokenStack, tmp_path / "f32", x, y, amp=False, **kw)
    half = record_step(TokenStack, tmp_path / "bf16", x, y, amp=True, **kw)
    for i, spec in enumerate(full.layers):
        assert spec.proj_in.kind == "fitted" or spec.proj_in.is_identity
        # the bases are eigenvectors of bf16-perturbed second moments: compare the basis-independent Gram
        # matrices of the rows (g_i . g_j), plus one more bf16 rounding of the stored rows (2u)
        a, b = (to_torch(s.grads(i), s.dtype).double() for s in (full, half))
        assert rel_err(b @ b.T, a @ a.T) < 2 * BF16_TOL, spec.name


# -- torch.amp.GradScaler ------------------------------------------------------------------------------

def _batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(6, 12, generator=gen), torch.randint(0, 5, (6,), generator=gen)) for _ in range(n)]


def train_scaled(path, batches, scale: float | None, give_scaler: bool = True, adam: bool = False,
                 amp: bool = False, **kw) -> tuple[Store, float]:
    """Train an MLP with a GradScaler (``scale`` None: disabled), recording with ``scaler=`` if asked."""
    model = mlp()
    opt = (torch.optim.Adam if adam else torch.optim.SGD)(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None)
    with dvemb.Recorder(model, path, optimizer=opt, scaler=scaler if give_scaler else None, **kw) as rec:
        for t, (x, y) in enumerate(batches):
            opt.zero_grad()
            with rec.step(range(10 * t, 10 * t + len(x))):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    out = model(x)
                scaler.scale(_loss(out, y)).backward()
            scaler.step(opt)
            scaler.update()
        rec.flush()
        assert rec.steps == Store(path).n_steps
    return Store(path), scaler.get_scale()


def assert_same_rows(got: Store, want: Store, tol: float) -> None:
    assert got.n_steps == want.n_steps and got.n_records == want.n_records
    np.testing.assert_array_equal(got.records["sample_id"], want.records["sample_id"])
    np.testing.assert_array_equal(got.records["step"], want.records["step"])
    for i in range(len(want.layers)):
        for rows in (Store.grads, Store.curvature):
            a, b = (to_torch(rows(s, i), s.dtype).double() for s in (got, want))
            assert rel_err(a, b) <= tol


@pytest.mark.parametrize("settings", [dict(projection="gaussian", projection_dim=16),
                                      dict(projection_dim=8, fit_steps=2), dict(projection_dim=8, adam=True)],
                         ids=["gaussian", "fitted", "fitted-adam-whitened"])
def test_scaled_rows_equal_unscaled_rows(tmp_path, settings):
    batches = _batches()
    plain, _ = train_scaled(tmp_path / "plain", batches, None, **settings)
    scaled, final = train_scaled(tmp_path / "scaled", batches, 2.0 ** 10, **settings)
    assert final == 2.0 ** 10  # no step was skipped: the scale stayed
    # a power-of-two scale multiplies float32 gradients exactly (no overflow here), and dividing the rows by it
    # (the curvature rows by its square root, also a power of two) is exact: the rows agree to float32
    # rounding of the few operations that differ in order (1e-6 leaves a margin; they are in fact equal)
    assert_same_rows(scaled, plain, 1e-6)


def test_scale_reaches_gradient_rows_and_the_root_of_it_curvature_rows(tmp_path):
    """Without scaler= the hooks see the scaled backward: gradient rows x S, curvature rows x sqrt(S)."""
    batches = _batches(1)
    plain, _ = train_scaled(tmp_path / "plain", batches, None, projection_dim=None)
    raw, _ = train_scaled(tmp_path / "raw", batches, 2.0 ** 10, give_scaler=False, projection_dim=None)
    for i in range(len(plain.layers)):
        assert rel_err(to_torch(raw.grads(i), "float32").double() / 2 ** 10,
                       to_torch(plain.grads(i), "float32").double()) < 1e-6
        assert rel_err(to_torch(raw.curvature(i), "float32").double() / 2 ** 5,
                       to_torch(plain.curvature(i), "float32").double()) < 1e-6


def test_bfloat16_autocast_with_scaler_matches_unscaled(tmp_path):
    batches = _batches()
    settings = dict(projection="gaussian", projection_dim=16, amp=True)
    plain, _ = train_scaled(tmp_path / "plain", batches, None, **settings)
    scaled, _ = train_scaled(tmp_path / "scaled", batches, 2.0 ** 8, **settings)
    # a power-of-two scale is exact in bfloat16 as in float32 (no overflow or underflow at these sizes)
    assert_same_rows(scaled, plain, 1e-6)


@pytest.mark.parametrize("bad_step", [0, 2, 4])
def test_steps_the_scaler_skips_are_not_recorded(tmp_path, bad_step):
    batches = _batches(5)
    x, y = batches[bad_step]
    x = x.clone()
    x[1, 3] = float("inf")  # an overflow in one sample: inf/NaN gradients, scaler.step skips optimizer.step()
    poisoned = batches[:bad_step] + [(x, y)] + batches[bad_step + 1:]
    store, final = train_scaled(tmp_path / "s", poisoned, 2.0 ** 10, projection="gaussian", projection_dim=16)
    assert final == 2.0 ** 9  # the scaler saw the inf once and backed off
    assert store.n_steps == 4 and store.n_records == 24
    kept = [t for t in range(5) if t != bad_step]
    np.testing.assert_array_equal(store.records["sample_id"], np.concatenate([np.arange(10 * t, 10 * t + 6)
                                                                            for t in kept]))
    np.testing.assert_array_equal(store.records["step"], np.repeat(np.arange(4), 6))
    # the skipped step changed nothing: the others are recorded as in a run without it (unscaled)
    want, _ = train_scaled(tmp_path / "want", [batches[t] for t in kept], None, projection="gaussian",
                           projection_dim=16)
    for i in range(len(want.layers)):
        assert rel_err(to_torch(store.grads(i), "float32").double(), to_torch(want.grads(i), "float32").double()) < 1e-6


def test_scaler_needs_the_optimizer(tmp_path):
    with pytest.raises(ValueError, match="scaler= needs optimizer="):
        dvemb.Recorder(mlp(), tmp_path / "s", scaler=torch.amp.GradScaler("cpu"))


# -- asynchronous host copies ---------------------------------------------------------------------------

def train_plain(path, batches, async_copies: bool | None, model=None, **kw) -> Store:
    """SGD steps recorded with the asynchronous copy path forced on (or the default choice: None)."""
    model = model or mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = dvemb.Recorder(model, path, optimizer=opt, **kw)
    rec._async_copies = async_copies
    try:
        for t, (x, y) in enumerate(batches):
            opt.zero_grad()
            with rec.step(range(10 * t, 10 * t + len(x))):
                _loss(model(x.to(next(model.parameters()).device)), y.to(next(model.parameters()).device)).backward()
            opt.step()
    finally:
        rec.close()
    return Store(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("settings", [dict(projection="gaussian", projection_dim=16), dict(projection_dim=8)],
                         ids=["gaussian", "fitted"])
def test_pending_copies_on_cpu_store_what_the_synchronous_path_stores(tmp_path, dtype, settings):
    """The asynchronous path (flags computed beside the rows, resolved in the writer thread; on the CPU no copy
    and no event) writes the very bytes the synchronous path writes."""
    batches = _batches()
    sync = train_plain(tmp_path / "sync", batches, False, dtype=dtype, **settings)
    pend = train_plain(tmp_path / "async", batches, True, dtype=dtype, **settings)
    assert pend.n_steps == sync.n_steps == 4
    np.testing.assert_array_equal(pend.records, sync.records)
    for i in range(len(sync.layers)):
        np.testing.assert_array_equal(np.asarray(pend.grads(i)), np.asarray(sync.grads(i)))
        np.testing.assert_array_equal(np.asarray(pend.curvature(i)), np.asarray(sync.curvature(i)))


def test_pending_step_resolves_rows_and_names_a_non_finite_layer():
    grads = [torch.randn(3, 4), torch.randn(3, 2)]
    curv = [torch.randn(3, 8), torch.randn(3, 4)]
    made = {}

    def make(g, c):
        made["rows"] = (g, c)
        return "record"

    pending = transfer.PendingStep.start(7, ["a", "b"], "bfloat16", grads, curv, make)
    assert isinstance(pending.event, transfer._NoEvent) and pending.finite.tolist() == [True] * 4
    assert pending.resolve() == "record"
    g, c = made["rows"]
    from dvemb.store import to_numpy
    for got, want in zip([*g, *c], [*grads, *curv]):
        np.testing.assert_array_equal(got, to_numpy(want, "bfloat16"))
    curv[1][2, 1] = float("nan")
    with pytest.raises(dvemb.NonFiniteGradientError, match="curvature rows in layer 'b' at step 7"):
        transfer.PendingStep.start(7, ["a", "b"], "float32", grads, curv, make).resolve()


@pytest.mark.parametrize("bad_step", [0, 2, 5])
def test_non_finite_rows_found_after_the_copy_stop_the_store_at_that_step(tmp_path, bad_step):
    batches = _batches(6)
    x = batches[bad_step][0].clone()
    x[0, 0] = float("nan")
    batches[bad_step] = (x, batches[bad_step][1])
    with pytest.raises(dvemb.NonFiniteGradientError, match=f"in layer '0' at step {bad_step};"):
        train_plain(tmp_path / "s", batches, True, projection="gaussian", projection_dim=16)  # raised at a later
        # step, or at close
    store = Store(tmp_path / "s")
    assert store.n_steps == bad_step  # the steps before it committed; none after it (no gap)
    np.testing.assert_array_equal(store.records["sample_id"],
                                  np.concatenate([np.arange(10 * t, 10 * t + 6) for t in range(bad_step)] +
                                                 [np.zeros(0, np.int64)]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_capture_copies_asynchronously_and_matches_cpu(tmp_path):
    batches = _batches()
    settings = dict(projection="gaussian", projection_dim=16, curvature="gradient_outer")
    cpu = train_plain(tmp_path / "cpu", batches, None, **settings)
    model = mlp().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with dvemb.Recorder(model, tmp_path / "cuda", optimizer=opt, **settings) as rec:
        try:
            for t, (x, y) in enumerate(batches):
                x, y = x.cuda(), y.cuda()
                if t >= 1:  # after the first step has built the projection matrices on the device
                    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation in a recorded step raises
                opt.zero_grad()
                with rec.step(range(10 * t, 10 * t + len(x)), lr=0.01):
                    _loss(model(x), y).backward()
                opt.step()
                torch.cuda.set_sync_debug_mode(0)  # (the next batch's copy to the device waits for the host)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert rec._copies_async(torch.zeros(1, device="cuda"))
    gpu = Store(tmp_path / "cuda")
    np.testing.assert_array_equal(gpu.records["sample_id"], cpu.records["sample_id"])
    for i in range(len(cpu.layers)):  # float32 on two devices: different summation orders, ~1e-7 relative
        assert rel_err(to_torch(gpu.grads(i), "float32").double(), to_torch(cpu.grads(i), "float32").double()) < 1e-5


def test_hf_trainer_hands_its_grad_scaler_to_the_recorder(tmp_path):
    """DVEmbTrainer with a loss-scaling Accelerator records the rows the unscaled plain loop records.

    Accelerate makes a GradScaler only for fp16 on an accelerator; on the CPU the test gives the Trainer's
    Accelerator a CPU GradScaler, which its backward and optimizer wrapper then use as they would fp16's.
    """
    pytest.importorskip("transformers")
    import importlib.util
    from pathlib import Path

    from dvemb.integrations.hf import DVEmbCallback, DVEmbTrainer

    spec = importlib.util.spec_from_file_location("hf_cases", Path(__file__).parent / "lm" / "test_hf_callback.py")
    hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hf)
    data, trained = hf.Sequences(), hf.model()
    callback = DVEmbCallback(tmp_path / "hf", projection_dim=hf.PROJECTION, modules=hf.LAYERS)
    trainer = DVEmbTrainer(model=trained, args=hf.arguments(tmp_path), train_dataset=data, data_collator=hf.collate,
                           callbacks=[callback])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    trainer.accelerator.scaler = scaler
    trainer.train()
    assert scaler._get_scale_async() is not None  # the Trainer did scale its losses with it
    assert scaler.get_scale() == 2.0 ** 12  # and skipped no step
    assert callback._scaler is scaler
    hf.plain_loop(hf.model(), data, hf.expected_steps(data.reads), tmp_path / "plain")
    got, want = Store(tmp_path / "hf"), Store(tmp_path / "plain")
    assert got.n_steps == want.n_steps
    np.testing.assert_array_equal(got.records["sample_id"], want.records["sample_id"])
    for layer in range(len(got.layers)):  # as the unscaled Trainer test: float32 sums in another order
        a, b = (to_torch(s.grads(layer), s.dtype).double() for s in (got, want))
        assert rel_err(a, b) < 1e-5, got.layers[layer].name
        c, d = (to_torch(s.curvature(layer), s.dtype).double() for s in (got, want))
        assert rel_err(c, d) < 1e-5, got.layers[layer].name
