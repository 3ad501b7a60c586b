"""Captured per-sample gradients against torch.func, for every capture path."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dvemb
from dvemb.store import Store, to_torch
from reference import per_sample_gradients, project, rel_err

# float32 capture vs a float64 reference: sums of <100 float32 products carry ~1e-7
# relative error, so 1e-5 (the acceptance bound) leaves two orders of margin.
TOL32 = 1e-5


class Conv1D(nn.Module):
    """Same contract as Hugging Face's GPT-2 Conv1D: weight (d_in, d_out), y = x W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


def mlp(d_in: int = 12, hidden: int = 9, d_out: int = 5, bias_last: bool = True, inplace: bool = False) -> nn.Module:
    torch.manual_seed(0)
    act = nn.ReLU(inplace=True) if inplace else nn.Tanh()
    return nn.Sequential(nn.Linear(d_in, hidden), act, nn.Linear(hidden, d_out, bias=bias_last))


def token_ce(out: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction=reduction)


def record(model, path, batches, reduction="mean", accumulate=1, **kw):
    """Record one step per (x, y) batch, optionally split into micro-batches."""
    with dvemb.Recorder(model, path, reduction=reduction, **kw) as rec:
        for x, y in batches:
            with rec.step(range(len(x)), lr=0.1):
                for xs, ys in zip(x.chunk(accumulate), y.chunk(accumulate)):
                    loss = token_ce(model(xs), ys, reduction)
                    (loss / accumulate if reduction == "mean" else loss).backward()
            model.zero_grad()
    return Store(path)


def check_against_reference(store: Store, model: nn.Module, x, y, tol: float) -> None:
    ref_model = model.double() if tol < 1e-8 else _float64_copy(model)
    names = [s.name for s in store.layers]
    ref = per_sample_gradients(ref_model, lambda o, t: token_ce(o, t, "mean"), x.double(), y, names)
    for i, spec in enumerate(store.layers):
        got = to_torch(store.grads(i), store.dtype).double()
        want = project(spec, ref[spec.name])
        assert got.shape == want.shape
        assert rel_err(got, want) < tol, (spec.name, rel_err(got, want))


def _float64_copy(model: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(model).double()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("projection_dim", [None, 24])
def test_linear_2d(tmp_path, reduction, projection_dim):
    model = mlp()
    x, y = torch.randn(7, 12), torch.randint(0, 5, (7,))
    store = record(model, tmp_path / "s", [(x, y)], reduction, projection_dim=projection_dim)
    if reduction == "sum":  # own loss is the same per-sample CE; w = 1 instead of 1/B
        assert (store.records["weight"] == 1.0).all()
    else:
        assert (store.records["weight"] == 1 / 7).all()
    check_against_reference(store, model, x, y, TOL32)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_3d_sums_over_tokens(tmp_path, reduction):
    model = mlp()
    x, y = torch.randn(6, 4, 12), torch.randint(0, 5, (6, 4))
    store = record(model, tmp_path / "s", [(x, y)], reduction, projection_dim=30)
    names = [s.name for s in store.layers]
    # a sample's own loss is its share of the batch loss divided by w: the token mean under
    # reduction="mean" (w = 1/B), the token sum under reduction="sum" (w = 1)
    own = "mean" if reduction == "mean" else "sum"
    ref = per_sample_gradients(_float64_copy(model), lambda o, t: token_ce(o, t, own), x.double(), y, names)
    for i, spec in enumerate(store.layers):
        got = to_torch(store.grads(i), store.dtype).double()
        assert rel_err(got, project(spec, ref[spec.name])) < TOL32


def test_gradient_accumulation_matches_single_pass(tmp_path):
    model = mlp()
    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    store = record(model, tmp_path / "s", [(x, y)], accumulate=4, projection_dim=20)
    assert store.n_records == 8
    check_against_reference(store, model, x, y, TOL32)


def test_fitted_bases_are_fitted_early_when_held_factors_reach_the_byte_cap(tmp_path, monkeypatch):
    """Steps wait for the fitted bases; once their raw factors reach MAX_FIT_BYTES the fit happens at once
    (here after the first step, instead of the several that 12-dimensional bases on 7 samples would want)."""
    from dvemb.capture import fitting

    model = mlp()
    x, y = torch.randn(7, 12), torch.randint(0, 5, (7,))
    for cap, held in [(fitting.MAX_FIT_BYTES, 1), (1, 0)]:
        monkeypatch.setattr(fitting, "MAX_FIT_BYTES", cap)
        monkeypatch.setattr("dvemb.capture.recorder.MAX_FIT_BYTES", cap)
        with dvemb.Recorder(model, tmp_path / f"cap{cap}", projection_dim=24) as rec:
            with rec.step(range(7), lr=0.1):
                token_ce(model(x), y, "mean").backward()
            model.zero_grad()
            assert len(rec._pending) == held  # held for the fit, or fitted and handed to the store
    check_against_reference(Store(tmp_path / "cap1"), model, x, y, TOL32)  # rows on the bases fitted early


@pytest.mark.parametrize("conv, batch, dim", [(False, 1, 48), (False, 2, 36), (False, 40, 24), (True, 4, 24)])
def test_fitted_bases_wait_for_enough_tokens_per_direction(tmp_path, conv, batch, dim):
    """By default the bases are fitted once the held steps give each fitted direction of every layer
    TOKENS_PER_DIRECTION of that layer's tokens, after MIN_FIT_STEPS steps at least and MAX_FIT_STEPS at most
    (the cases want 72, 28, 1 and 8 steps: capped, between, and twice floored): the step count is read off the
    store's fitted sides, independently of the Recorder's own arithmetic. With a convolution (36 positions per
    sample) before the classifier layer (one token per sample), the classifier's tokens decide."""
    from dvemb.capture import fitting

    torch.manual_seed(0)
    if conv:
        model, shape, tokens = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                             nn.Linear(144, 5)), (1, 6, 6), [36 * batch, batch]
    else:
        model, shape, tokens = mlp(), (12,), [batch, batch]
    with dvemb.Recorder(model, tmp_path / "s", projection_dim=dim) as rec:
        held = 0
        for t in range(fitting.MAX_FIT_STEPS + 1):
            x, y = torch.randn(batch, *shape), torch.randint(0, 5, (batch,))
            with rec.step(range(t * batch, (t + 1) * batch), lr=0.1):
                token_ce(model(x), y, "mean").backward()
            model.zero_grad()
            if not rec._pending:
                break
            held = len(rec._pending)
    fitted = [max([side.k for side in (spec.proj_in, spec.proj_out) if side.kind == "fitted"], default=0)
              for spec in Store(tmp_path / "s").layers]
    wanted = max(-(-fitting.TOKENS_PER_DIRECTION * k // n) for k, n in zip(fitted, tokens))
    assert held + 1 == max(fitting.MIN_FIT_STEPS, min(fitting.MAX_FIT_STEPS, wanted))  # the fitting step empties them


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "orthogonal"])
def test_float64_is_exact(tmp_path, kind):
    model = mlp().double()
    x, y = torch.randn(5, 12, dtype=torch.float64), torch.randint(0, 5, (5,))
    store = record(model, tmp_path / "s", [(x, y)], projection_dim=16, dtype=torch.float64, projection=kind)
    check_against_reference(store, model, x, y, 1e-10)  # float64 throughout: round-off only


def test_hf_conv1d_and_no_bias(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(Conv1D(9, 12), nn.GELU(), nn.Linear(9, 5, bias=False))
    x, y = torch.randn(5, 3, 12), torch.randint(0, 5, (5, 3))
    store = record(model, tmp_path / "s", [(x, y)], projection_dim=None)
    assert [s.kind for s in store.layers] == ["hf_conv1d", "linear"]
    assert [s.bias for s in store.layers] == [True, False]
    check_against_reference(store, model, x, y, TOL32)


def test_inplace_activation_after_layer(tmp_path):
    model = mlp(inplace=True)
    x, y = torch.randn(6, 12), torch.randint(0, 5, (6,))
    store = record(model, tmp_path / "s", [(x, y)], projection_dim=None)
    check_against_reference(store, model, x, y, TOL32)


def test_layer_used_twice_sums_both_uses(tmp_path):
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(6, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))

    model = Twice()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    store = record(model, tmp_path / "s", [(x, y)], projection_dim=None)
    check_against_reference(store, model, x, y, TOL32)


def test_close_removes_hooks_and_model_is_unchanged(tmp_path):
    model = mlp()
    x = torch.randn(4, 12)
    before = model(x).detach()
    rec = dvemb.Recorder(model, tmp_path / "s")
    assert any(m._forward_hooks for m in model.modules())
    rec.close()
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert torch.equal(model(x), before)


def test_module_selection(tmp_path):
    model = nn.Sequential()
    model.add_module("enc", nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
    model.add_module("head", nn.Linear(4, 2))
    assert dvemb.Recorder(model, tmp_path / "a", modules="enc.*").layers == ["enc.0"]
    assert dvemb.Recorder(model, tmp_path / "b", modules=["head"]).layers == ["head"]
    with pytest.raises(ValueError, match="no supported layer"):
        dvemb.Recorder(model, tmp_path / "c", modules="dec.*")
    with pytest.raises(ValueError, match="not a supported layer"):
        dvemb.Recorder(model, tmp_path / "d", modules=["enc.1"])
    model.head.weight.requires_grad_(False)
    assert dvemb.Recorder(model, tmp_path / "e").layers == ["enc.0"]


def test_lr_from_optimizer_and_errors(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(4, 12), torch.randint(0, 5, (4,))
    with dvemb.Recorder(model, tmp_path / "s", optimizer=opt) as rec:
        with rec.step([0, 1, 2, 3]):
            F.cross_entropy(model(x), y).backward()
        opt.param_groups[0]["lr"] = 0.01
        with rec.step([0, 1, 2, 3]):
            F.cross_entropy(model(x), y).backward()
        with pytest.raises(ValueError, match="ids were given"):
            with rec.step([0, 1, 2]):
                F.cross_entropy(model(x), y).backward()
        with pytest.raises(RuntimeError, match="no gradients"):
            with rec.step([0]):
                pass
    assert Store(tmp_path / "s").records["lr"].tolist() == [0.05] * 4 + [0.01] * 4
    other = mlp()
    with pytest.raises(ValueError, match="give lr"):
        with dvemb.Recorder(other, tmp_path / "t") as rec, rec.step([0, 1, 2, 3]):
            F.cross_entropy(other(x), y).backward()
    with pytest.warns(UserWarning, match="RMSprop is not SGD"):
        dvemb.Recorder(mlp(), tmp_path / "u", optimizer=torch.optim.RMSprop(model.parameters()))


def test_no_grad_forward_inside_step_is_ignored(tmp_path):
    model = mlp()
    x, y = torch.randn(5, 12), torch.randint(0, 5, (5,))
    with dvemb.Recorder(model, tmp_path / "s") as rec:
        with rec.step(range(5), lr=0.1):
            with torch.no_grad():
                model(torch.randn(3, 12))  # e.g. an evaluation pass: not part of the step
            F.cross_entropy(model(x), y).backward()
    check_against_reference(Store(tmp_path / "s"), model, x, y, TOL32)


def test_tied_weights_are_skipped_by_default_and_refused_by_name(tmp_path):
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(11, 6)
            self.mlp = nn.Linear(6, 6)
            self.lm_head = nn.Linear(6, 11, bias=False)
            self.lm_head.weight = self.wte.weight

        def forward(self, ids):
            return self.lm_head(torch.tanh(self.mlp(self.wte(ids))))

    model = TiedLM()
    with pytest.warns(UserWarning, match=r"'lm_head' shares its weight with \['wte'\]"):
        assert dvemb.Recorder(model, tmp_path / "a").layers == ["mlp"]
    with pytest.raises(ValueError, match="tied weights.*leave it out"):
        dvemb.Recorder(model, tmp_path / "b", modules=["mlp", "lm_head"])


def test_per_sample_weights_for_token_mean_loss_with_padding(tmp_path):
    """Under a token-mean loss over padded sequences, w_i = n_i / N and g_i is the sample's own mean-token gradient."""
    model = mlp()
    x, y = torch.randn(4, 5, 12), torch.randint(0, 5, (4, 5))
    lengths = torch.tensor([5, 2, 3, 1])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    y_masked = y.masked_fill(~mask, -100)
    weights = lengths / lengths.sum()
    with dvemb.Recorder(model, tmp_path / "s", projection_dim=30) as rec:
        with rec.step(range(4), lr=0.1, weights=weights):
            F.cross_entropy(model(x).reshape(-1, 5), y_masked.reshape(-1), ignore_index=-100).backward()
    store = Store(tmp_path / "s")
    np.testing.assert_allclose(store.records["weight"], weights.numpy(), rtol=1e-12)
    ref_model = mlp().double()
    ref_model.load_state_dict(model.state_dict())
    names = [s.name for s in store.layers]
    own = lambda o, t: F.cross_entropy(o.reshape(-1, 5), t.reshape(-1), ignore_index=-100)  # noqa: E731
    ref = per_sample_gradients(ref_model, own, x.double(), y_masked, names)
    for i, spec in enumerate(store.layers):
        got = to_torch(store.grads(i), store.dtype).double()
        assert rel_err(got, project(spec, ref[spec.name])) < TOL32
    with pytest.raises(ValueError, match="weights must be 4"):
        with dvemb.Recorder(model, tmp_path / "t") as rec, rec.step(range(4), lr=0.1, weights=[1.0, 2.0]):
            pass


def small_cnn(padding=1, padding_mode="zeros", stride=1, dilation=1, bias=True, groups=1) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=stride, padding=padding, dilation=dilation, bias=bias, padding_mode=padding_mode,
                  groups=groups),
        nn.Tanh(), nn.Conv2d(4, 3, (2, 3), padding="same"), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("conv", [dict(), dict(padding=0, stride=2, bias=False), dict(padding=2, dilation=2),
                                  dict(padding_mode="reflect"), dict(padding_mode="circular", stride=2)])
@pytest.mark.parametrize("projection_dim", [None, 12])
def test_conv2d_patches_against_torch_func(tmp_path, conv, projection_dim):
    model = small_cnn(**conv)
    x, y = torch.randn(6, 2, 7, 6), torch.randint(0, 5, (6,))
    model(x)  # materialise the lazy head
    store = record(model, tmp_path / "s", [(x, y)], projection_dim=projection_dim)
    assert [s.kind for s in store.layers] == ["conv2d", "conv2d", "linear"]
    assert (store.layers[0].d_in, store.layers[0].d_out) == (18, 4)
    check_against_reference(store, model, x, y, TOL32)


@pytest.mark.parametrize("conv", [dict(), dict(padding=0, stride=2, dilation=2, bias=False),
                                  dict(padding="same", padding_mode="reflect"), dict(padding_mode="circular")])
@pytest.mark.parametrize("projection_dim", [None, 10])
def test_conv1d_patches_against_torch_func(tmp_path, conv, projection_dim):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv1d(3, 4, 3, **{"padding": 1, **conv}), nn.Tanh(), nn.Flatten(), nn.LazyLinear(5))
    x, y = torch.randn(5, 3, 11), torch.randint(0, 5, (5,))
    model(x)
    store = record(model, tmp_path / "s", [(x, y)], projection_dim=projection_dim)
    assert [s.kind for s in store.layers] == ["conv1d", "linear"]
    assert (store.layers[0].d_in, store.layers[0].d_out) == (9, 4)
    check_against_reference(store, model, x, y, TOL32)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("groups", [1, 2])
def test_conv2d_float64_projected_is_exact(tmp_path, groups):
    model = small_cnn(groups=groups).double()
    x, y = torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.randint(0, 5, (4,))
    model(x)
    store = record(model, tmp_path / "s", [(x, y)], projection_dim=9, dtype=torch.float64)
    check_against_reference(store, model, x, y, 1e-10)


@pytest.mark.parametrize("conv", [
    dict(in_channels=4, out_channels=6, groups=2, padding=1),                        # 2 groups of 2 -> 3
    dict(in_channels=4, out_channels=4, groups=4, padding=1, bias=False),            # depthwise
    dict(in_channels=3, out_channels=6, groups=3, stride=2, dilation=2),             # depthwise, multiplier 2
    dict(in_channels=4, out_channels=8, groups=2, padding="same", padding_mode="reflect"),
])
@pytest.mark.parametrize("projection_dim", [None, 8])
def test_grouped_conv2d_against_torch_func(tmp_path, conv, projection_dim):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(kernel_size=3, **conv), nn.Tanh(), nn.Flatten(), nn.LazyLinear(5))
    x, y = torch.randn(5, conv["in_channels"], 7, 6), torch.randint(0, 5, (5,))
    model(x)
    store = record(model, tmp_path / "s", [(x, y)], projection_dim=projection_dim)
    assert [s.kind for s in store.layers] == ["conv2d", "linear"]
    per_group_in = conv["in_channels"] // conv["groups"]
    assert (store.layers[0].d_in, store.layers[0].d_out) == (per_group_in * 9, conv["out_channels"])
    check_against_reference(store, model, x, y, TOL32)


@pytest.mark.parametrize("conv", [dict(), dict(stride=2, padding=0, bias=False), dict(groups=2, dilation=(1, 2, 1)),
                                  dict(padding="same", padding_mode="circular")])
@pytest.mark.parametrize("projection_dim", [None, 10])
def test_conv3d_against_torch_func(tmp_path, conv, projection_dim):
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv3d(2, 4, (2, 3, 3), **{"padding": 1, **conv}), nn.Tanh(), nn.Flatten(),
                          nn.LazyLinear(5))
    x, y = torch.randn(4, 2, 4, 5, 5), torch.randint(0, 5, (4,))
    model(x)
    store = record(model, tmp_path / "s", [(x, y)], projection_dim=projection_dim)
    assert [s.kind for s in store.layers] == ["conv3d", "linear"]
    assert (store.layers[0].d_in, store.layers[0].d_out) == (2 // conv.get("groups", 1) * 18, 4)
    check_against_reference(store, model, x, y, TOL32)


@pytest.mark.parametrize("projection_dim", [None, 6])
def test_grouped_conv1d_against_torch_func(tmp_path, projection_dim):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv1d(4, 6, 3, groups=2, padding=1), nn.Tanh(), nn.Conv1d(6, 6, 3, groups=6),
                          nn.Tanh(), nn.Flatten(), nn.LazyLinear(5))
    x, y = torch.randn(5, 4, 10), torch.randint(0, 5, (5,))
    model(x)
    store = record(model, tmp_path / "s", [(x, y)], projection_dim=projection_dim)
    assert [s.kind for s in store.layers] == ["conv1d", "conv1d", "linear"]
    check_against_reference(store, model, x, y, TOL32)


class TinyLM(nn.Module):
    """Embedding (with a padding id) -> Linear head over the vocabulary."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)))


@pytest.mark.parametrize("projection_dim", [None, 15])
def test_embedding_tracked_when_named_against_torch_func(tmp_path, projection_dim):
    model = TinyLM()
    x = torch.randint(0, 11, (5, 4))
    x[0, :2] = 0  # padding tokens: their embedding row gets no gradient
    x[1] = 3  # the same id several times in one sample
    y = torch.randint(0, 11, (5, 4))
    assert [s.name for s in record(model, tmp_path / "d", [(x, y)]).layers] == ["head"]  # not by default
    store = record(model, tmp_path / "s", [(x, y)], projection_dim=projection_dim, modules=["emb", "head"])
    assert [s.kind for s in store.layers] == ["embedding", "linear"]
    assert (store.layers[0].d_in, store.layers[0].d_out, store.layers[0].bias) == (11, 6, False)
    ref = per_sample_gradients(_float64_copy(model), lambda o, t: token_ce(o, t, "mean"), x, y, ["emb", "head"])
    for i, spec in enumerate(store.layers):
        want = project(spec, ref[spec.name])
        assert rel_err(to_torch(store.grads(i), store.dtype).double(), want) < TOL32


def test_projection_on_the_worker_thread_equals_projection_in_the_hook(tmp_path, monkeypatch):
    from dvemb.capture import ghost

    class Twice(nn.Module):  # a layer used twice per micro-batch: its blocks are summed
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(5)
            self.shared, self.head = nn.Linear(12, 12), nn.Linear(12, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))

    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    stores = {}
    monkeypatch.setattr(ghost, "OVERLAP_MIN_FLOPS", 0)  # these tiny layers would otherwise stay on the training thread
    for overlap in (False, True):
        monkeypatch.setattr(ghost, "spare_cpu", lambda overlap=overlap: overlap)
        model = Twice()
        stores[overlap] = record(model, tmp_path / str(overlap), [(x, y)], accumulate=2, projection_dim=20,
                                 curvature="ggn", curvature_samples=2)
        with dvemb.Recorder(model, tmp_path / f"r{overlap}") as rec:
            assert rec._capture.overlap is overlap
    for i in range(2):  # the same operations on the same tensors: bitwise equal
        np.testing.assert_array_equal(np.asarray(stores[True].grads(i)), np.asarray(stores[False].grads(i)))
        np.testing.assert_array_equal(np.asarray(stores[True].curvature(i)), np.asarray(stores[False].curvature(i)))
    check_against_reference(stores[True], Twice(), x, y, TOL32)


def test_small_forward_calls_are_projected_on_the_training_thread(tmp_path, monkeypatch):
    from dvemb.capture import ghost
    monkeypatch.setattr(ghost, "spare_cpu", lambda: True)
    submitted = []
    for width, worker in ((8, False), (1024, True)):  # 2 (64*8*32 + ...) ~ 1e4 flops; 2 (64*1024*32 * 2 + ...) ~ 8e6
        model = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3))
        with dvemb.Recorder(model, tmp_path / str(width), projection_dim=32 * 32, projection="gaussian") as rec:
            submit = rec._capture._worker.submit
            monkeypatch.setattr(rec._capture._worker, "submit", lambda *a: submitted.append(width) or submit(*a))
            x = torch.randn(64, width)
            with rec.step(range(64), lr=0.1):
                F.cross_entropy(model(x), torch.randint(0, 3, (64,))).backward()
        assert (width in submitted) is worker
    spec = rec._capture.projectors[0].spec  # the estimate: input and output projections and the outer products
    k_in, k_out = spec.proj_in.k, spec.proj_out.k
    assert rec._capture.projectors[0].flops(torch.zeros(64, 1024), torch.zeros(64, 1024)) == \
        2 * (64 * 1024 * k_in + 64 * 1024 * k_out + 64 * k_in * k_out)


def test_worker_thread_only_when_cpus_outnumber_torch_threads(monkeypatch):
    from dvemb import cpus
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cpus.spare_cpu()
        torch.set_num_threads(2)
        assert not cpus.spare_cpu()  # torch already uses both CPUs: a worker would compete with it
    finally:
        torch.set_num_threads(threads)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch.func's reference through attention
def test_torch_transformer_layer_tracks_what_it_calls_as_modules(tmp_path):
    torch.manual_seed(10)
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), nn.Linear(8, 5))
    x, y = torch.randn(4, 6, 8), torch.randint(0, 5, (4, 6))
    with pytest.warns(UserWarning, match="nn.MultiheadAttention"):  # its out_proj is applied functionally
        store = record(model, tmp_path / "s", [(x, y)], projection_dim=24)
    assert [s.name for s in store.layers] == ["0.linear1", "0.linear2", "1"]
    check_against_reference(store, model, x, y, TOL32)
    with pytest.raises(ValueError, match="applied functionally"):
        dvemb.Recorder(model, tmp_path / "t", modules=["0.self_attn.out_proj", "1"])


def test_batch_norm_in_training_mode_is_warned_about(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.warns(UserWarning, match="batch statistics"):
        dvemb.Recorder(model, tmp_path / "s").close()
    model.eval()  # running statistics: samples are independent again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dvemb.Recorder(model, tmp_path / "t").close()
