"""A 2-process DDP Trainer (gloo, CPU) records the store of the same global steps run in one process by hand."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")

from dvemb.store import Store, to_torch  # noqa: E402
from reference import rel_err  # noqa: E402
from test_hf_callback import LAYERS, PROJECTION, Sequences, arguments, collate, model, plain_loop  # noqa: E402

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from pathlib import Path

    from dvemb.integrations.hf import DVEmbCallback, DVEmbTrainer
    trainer = DVEmbTrainer(model=model(), args=arguments(Path(out), ddp_backend="gloo"), train_dataset=Sequences(),
                           data_collator=collate,
                           callbacks=[DVEmbCallback(Path(out) / "hf", projection_dim=PROJECTION, modules=LAYERS)])
    trainer.train()
    assert trainer.args.world_size == WORLD
    dist.barrier()
    dist.destroy_process_group()  # else gloo's threads can abort the process at exit ("terminate called ...")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_ddp_trainer_records_the_global_steps(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path), _free_port()), nprocs=WORLD, join=True)
    got = Store(tmp_path / "hf")
    assert got.world_size == WORLD
    records = got.records
    steps = [records["sample_id"][records["step"] == t].tolist() for t in range(got.n_steps)]  # rank 0's, then 1's
    np.testing.assert_allclose([records["weight"][records["step"] == t].sum() for t in range(got.n_steps)], 1.0,
                               rtol=1e-6)  # w_i = n_i / N over the step's tokens on both ranks
    plain = model()
    plain_loop(plain, Sequences(), steps, tmp_path / "plain")
    want = Store(tmp_path / "plain")
    for field in ("step", "sample_id"):
        np.testing.assert_array_equal(records[field], want.records[field])
    np.testing.assert_allclose(records["weight"], want.records["weight"], rtol=1e-6)
    np.testing.assert_allclose(records["lr"], want.records["lr"], rtol=1e-12)
    for layer in range(len(got.layers)):
        a, b = (to_torch(s.grads(layer), s.dtype).double() for s in (got, want))
        assert rel_err(a, b) < 1e-5, got.layers[layer].name
