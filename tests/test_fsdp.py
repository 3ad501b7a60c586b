"""FSDP2 capture: a 2-rank gloo run with fully_shard gives the store a single process records.

Under FSDP2 (torch.distributed.fsdp.fully_shard, 1-D mesh) each rank runs the whole model on its own
micro-batch, with the parameters all-gathered per module: the hooks see the local micro-batch as
under DDP. The store (records, rows of every layer, the fitted bases, checkpoints gathered whole)
must be the one process's, as tests/test_distributed.py checks for DDP.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import dvemb
from dvemb.store import Store, to_torch
from test_distributed import GLOBAL_BATCH, STEPS, data, make_model, make_optimizer, record_single

SETTINGS = dict(projection_dim=12, dtype=torch.float64, save_checkpoints=[3])


def rank_main(rank: int, world: int, path: str, rendezvous: str, kind: str, projection: str, curvature: str) -> None:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = make_model()
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module)  # each layer its own unit: parameters gathered per layer, resharded after use
    fully_shard(model)
    assert type(model[0].weight).__name__ == "DTensor"
    opt = make_optimizer(model.parameters(), kind)
    x, y = data()
    local = GLOBAL_BATCH // world
    with dvemb.Recorder(model, path, optimizer=opt, projection=projection, curvature=curvature, **SETTINGS) as rec:
        for t in range(STEPS):
            ids = list(range(t * GLOBAL_BATCH + rank * local, t * GLOBAL_BATCH + (rank + 1) * local))
            with rec.step(ids):
                F.cross_entropy(model(x[ids]), y[ids]).backward()  # the reduce-scatter averages the ranks' gradients
            opt.step()
            opt.zero_grad()
    dist.destroy_process_group()


def _fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return dist.is_available()


@pytest.mark.skipif(not _fsdp2_available(), reason="torch.distributed.fsdp.fully_shard unavailable")
@pytest.mark.parametrize("kind, projection, curvature", [("sgd", "gaussian", "ggn"),
                                                         ("adamw", "fitted", "ggn"),
                                                         pytest.param("momentum", "fitted", "gradient_outer",
                                                                      marks=pytest.mark.slow)])
def test_two_rank_fsdp2_store_equals_single_process(tmp_path, kind, projection, curvature):
    mp.spawn(rank_main, args=(2, str(tmp_path / "fsdp"), str(tmp_path / "rdv"), kind, projection, curvature),
             nprocs=2, join=True)
    model = record_single(tmp_path / "one", kind, projection, curvature=curvature, **SETTINGS)
    sharded, one = Store(tmp_path / "fsdp"), Store(tmp_path / "one")
    assert sharded.world_size == 2 and sharded.n_steps == STEPS and sharded.n_records == STEPS * GLOBAL_BATCH
    assert (sharded.config.update.kind == "adam") == (kind == "adamw")  # whitened with the gathered moments
    for a, b in zip(sharded.layers, one.layers):  # bases from the ranks' summed moments
        for side in ("proj_in", "proj_out"):
            torch.testing.assert_close(getattr(a, side).matrix(torch.float64), getattr(b, side).matrix(torch.float64),
                                       rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(sharded.records["sample_id"], one.records["sample_id"])
    np.testing.assert_array_equal(sharded.records["step"], one.records["step"])
    np.testing.assert_allclose(sharded.records["weight"], one.records["weight"], rtol=1e-15)
    # float64 on both sides; the ranks' averaged gradients differ from the one process's in summation order only
    # (~1e-16 relative), amplified by the few steps of training: 1e-9 leaves orders of margin, and a wrong row
    # (another rank's sample, a missing 1/world, a gradient FSDP reduced twice) is off by O(1)
    for i in range(len(one.layers)):
        for rows in (Store.grads, Store.curvature):
            want = rows(one, i)
            if want is None:
                assert rows(sharded, i) is None
                continue
            np.testing.assert_allclose(to_torch(np.array(rows(sharded, i)), "float64"),
                                       to_torch(np.array(want), "float64"), rtol=1e-9, atol=1e-12)
    assert dvemb.saved_checkpoints(tmp_path / "fsdp") == [3, STEPS]
    gathered = dvemb.load_checkpoint(tmp_path / "fsdp", make_model(), STEPS)  # whole parameters, not shards
    for p, q in zip(gathered.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert Store(tmp_path / "fsdp").manifest["parameters"]["step"] == STEPS  # the digest of gathered parameters


def _tensor_parallel_main(rank: int, rendezvous: str, path: str) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
        mesh = init_device_mesh("cpu", (1,))
        model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(0)]))  # no FSDP2
        with pytest.raises(ValueError, match="'0.weight' is a DTensor outside FSDP2"):
            dvemb.Recorder(model, path)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not _fsdp2_available(), reason="torch.distributed.fsdp.fully_shard unavailable")
def test_dtensor_parameters_outside_fsdp2_are_refused(tmp_path):
    """Tensor parallelism (DTensor parameters without fully_shard) splits a layer across ranks: refused."""
    mp.spawn(_tensor_parallel_main, args=(str(tmp_path / "rdv"), str(tmp_path / "s")), nprocs=1, join=True)
