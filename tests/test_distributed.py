"""DDP capture: a 2-rank gloo run gives the same store, embeddings and scores as one process."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import dvemb
from dvemb.store import Store, to_torch
from reference import final_embeddings

STEPS, GLOBAL_BATCH, LR = 6, 8, 0.3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS * GLOBAL_BATCH, 6, generator=g, dtype=torch.float64), \
        torch.randint(0, 3, (STEPS * GLOBAL_BATCH,), generator=g)


def make_optimizer(params, kind: str) -> torch.optim.Optimizer:
    """Plain SGD, SGD with momentum 0.9, or AdamW (``adamw-warm``: 2 unrecorded steps first, :func:`warm_up`): each
    followed by the embeddings."""
    if kind.startswith("adamw"):
        return torch.optim.AdamW(params, lr=0.05)
    return torch.optim.SGD(params, lr=LR, momentum=0.9 if kind == "momentum" else 0.0)


def warm_up(model: nn.Module, opt: torch.optim.Optimizer, kind: str, ids) -> None:
    """For ``adamw-warm``: 2 unrecorded steps on the first batches (the Recorder then starts on an optimizer with
    state); ``ids(t)``: this process's samples of step t."""
    x, y = data()
    for t in range(2 if kind == "adamw-warm" else 0):
        F.cross_entropy(model(x[ids(t)]), y[ids(t)]).backward()
        opt.step()
        opt.zero_grad()


def rank_main(rank: int, world: int, path: str, rendezvous: str, kind: str, projection: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    ddp = nn.parallel.DistributedDataParallel(make_model())
    opt = make_optimizer(ddp.parameters(), kind)
    x, y = data()
    local = GLOBAL_BATCH // world
    warm_up(ddp, opt, kind, lambda t: list(range(t * GLOBAL_BATCH + rank * local, t * GLOBAL_BATCH + (rank + 1) * local)))
    with dvemb.Recorder(ddp, path, projection_dim=12, dtype=torch.float64, save_checkpoints=[3], optimizer=opt,
                        projection=projection) as rec:
        for t in range(STEPS):
            ids = list(range(t * GLOBAL_BATCH + rank * local, t * GLOBAL_BATCH + (rank + 1) * local))
            with rec.step(ids):
                F.cross_entropy(ddp(x[ids]), y[ids]).backward()  # DDP averages the ranks' gradients
            opt.step()
            opt.zero_grad()
    dist.destroy_process_group()


def record_single(path, kind: str, projection: str, **recorder) -> nn.Module:
    """The run in one process (the whole global batch per step); ``recorder``: more Recorder options."""
    model = make_model()
    opt = make_optimizer(model.parameters(), kind)
    x, y = data()
    warm_up(model, opt, kind, lambda t: list(range(t * GLOBAL_BATCH, (t + 1) * GLOBAL_BATCH)))
    recorder = {"projection_dim": 12, "dtype": torch.float64, **recorder}
    with dvemb.Recorder(model, path, optimizer=opt, projection=projection, **recorder) as rec:
        for t in range(STEPS):
            ids = list(range(t * GLOBAL_BATCH, (t + 1) * GLOBAL_BATCH))
            with rec.step(ids):
                F.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step()
            opt.zero_grad()
    return model


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("kind, projection", [("sgd", "gaussian"), ("momentum", "fitted"), ("adamw", "fitted"),
                                              ("adamw-warm", "fitted")])
def test_two_rank_ddp_store_equals_single_process(tmp_path, kind, projection):
    mp.spawn(rank_main, args=(2, str(tmp_path / "ddp"), str(tmp_path / "rdv"), kind, projection), nprocs=2, join=True)
    model = record_single(tmp_path / "one", kind, projection)
    ddp_store, one = Store(tmp_path / "ddp"), Store(tmp_path / "one")
    assert replace(ddp_store.config, layers=()) == replace(one.config, layers=())
    assert (ddp_store.config.update.kind == "adam") == kind.startswith("adamw")
    if kind == "adamw-warm":  # the exact output layer's moments after the warm-up, kept by every shard
        assert ddp_store.config.update.initial_step == 2 and one.config.update.initial_step == 2
        for k, v in one.initial_moments(1).items():  # DDP's averaged gradients: round-off apart
            torch.testing.assert_close(ddp_store.initial_moments(1)[k], v, rtol=1e-9, atol=1e-15)
    shards = [Store(tmp_path / "ddp" / "shards" / f"rank-{r:05d}") for r in (0, 1)]
    assert shards[0].layers == shards[1].layers == ddp_store.layers  # every rank fitted the same bases
    for a, b in zip(ddp_store.layers, one.layers):  # the ranks' summed moments: the one process's up to round-off
        for side in ("proj_in", "proj_out"):
            torch.testing.assert_close(getattr(a, side).matrix(torch.float64), getattr(b, side).matrix(torch.float64),
                                       rtol=1e-9, atol=1e-9)
    assert ddp_store.world_size == 2 and ddp_store.n_steps == STEPS and ddp_store.n_records == STEPS * GLOBAL_BATCH
    rec_d, rec_1 = ddp_store.records, one.records
    np.testing.assert_array_equal(rec_d["sample_id"], rec_1["sample_id"])  # step-major, rank-minor order
    np.testing.assert_array_equal(rec_d["step"], rec_1["step"])
    np.testing.assert_allclose(rec_d["weight"], rec_1["weight"], rtol=1e-15)  # 1 / global batch
    assert rec_d["rank"].tolist() == ([0] * 4 + [1] * 4) * STEPS
    for i in range(len(one.layers)):
        np.testing.assert_allclose(to_torch(np.array(ddp_store.grads(i)), "float64"),
                                   to_torch(np.array(one.grads(i)), "float64"), rtol=1e-6, atol=1e-12)
    for path in (tmp_path / "ddp", tmp_path / "one"):
        dvemb.compute_embeddings(path, show_progress=False)
    emb = [final_embeddings(path) for path in (tmp_path / "ddp", tmp_path / "one")]
    assert np.linalg.norm(emb[0] - emb[1]) / np.linalg.norm(emb[1]) < 1e-6
    xt, yt = torch.randn(3, 6, dtype=torch.float64), torch.tensor([0, 1, 2])
    # the DDP store is queried with the unwrapped model: layer names match without "module."
    scores = [dvemb.influence(p, model, lambda: F.cross_entropy(model(xt), yt, reduction="none")).scores
              for p in (tmp_path / "ddp", tmp_path / "one")]
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-6, atol=1e-12)
    assert dvemb.saved_checkpoints(tmp_path / "ddp") == [3, STEPS]
    assert "recorded by 2 ranks" in ddp_store.summary()


def test_fsdp_is_refused_with_a_clear_message(tmp_path):
    from torch.distributed.fsdp import FullyShardedDataParallel

    class Fake(FullyShardedDataParallel):  # an FSDP instance without a process group
        def __init__(self, module):
            nn.Module.__init__(self)
            self.inner = module

    with pytest.raises(ValueError, match="FSDP-sharded models are not supported"):
        dvemb.Recorder(Fake(nn.Linear(2, 2)), tmp_path / "s")
