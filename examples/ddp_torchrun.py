"""Record a DistributedDataParallel run: every rank writes its own shard of one store.

Launch one process per device with torchrun (gloo on CPU here; NCCL on GPUs works the same)::

    torchrun --standalone --nproc_per_node 2 examples/ddp_torchrun.py --tiny
    torchrun --standalone --nproc_per_node 2 examples/ddp_torchrun.py --out runs/ddp

Every rank builds the Recorder with the same path around its DDP model and passes the *global*
ids of its own micro-batch; a step's batch is the union of the ranks' micro-batches. The store
then reads as one (step-major, rank-minor), so rank 0 computes the embeddings and scores alone.
The data are random tensors (a fixed teacher labels them): nothing is downloaded.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import dvemb


def teacher_data(n: int, d: int = 16, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random inputs on every rank (seeded), labelled by a random linear teacher."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    return x, (x @ torch.randn(d, classes, generator=g)).argmax(1)


def shared_folder(path: str | None) -> Path:
    """``path``, or a temporary folder made by rank 0 and broadcast to the others."""
    name = [path or (tempfile.mkdtemp(prefix="dvemb-ddp-") if dist.get_rank() == 0 else None)]
    dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds on a CPU")
    parser.add_argument("--out", metavar="DIR", default=None, help="where to keep the store (default: a temp folder)")
    args = parser.parse_args()
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial model on every rank (DDP also broadcasts rank 0's)
    n, global_batch, epochs = (128, 16, 2) if args.tiny else (2048, 64, 3)
    x, y = teacher_data(n + 2)  # the last two are held out as test points
    x_test, y_test = x[n:], y[n:]
    model = DistributedDataParallel(nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    out = shared_folder(args.out)
    store = out / "store"
    local = global_batch // world
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))  # the same batches on every rank
    with dvemb.Recorder(model, store, optimizer=opt) as rec:
        for epoch in range(epochs):
            for batch in order.split(global_batch):
                ids = batch[rank * local:(rank + 1) * local]  # this rank's share, as global sample ids
                with rec.step(ids):
                    F.cross_entropy(model(x[ids]), y[ids]).backward()  # DDP averages the ranks' gradients
                opt.step()
                opt.zero_grad()
    print(f"rank {rank}: recorded {rec.steps} steps into {store}/shards/rank-{rank:05d}", flush=True)
    dist.barrier()
    if rank == 0:  # the shards read as one store; query with the bare model (layer names ignore `module.`)
        summary = dvemb.Store(store)
        print(f"store: {summary.n_steps} steps, {summary.n_records} records from {summary.world_size} ranks")
        net = model.module
        top = dvemb.top_k(store, net, lambda: F.cross_entropy(net(x_test), y_test, reduction="none"), k=3)
        for j in range(2):
            print(f"test point {j}: most helpful records (step, sample) "
                  + ", ".join(f"({s}, {i})" for s, i in zip(top.helpful.step[j], top.helpful.sample_id[j])))
    dist.barrier()
    if rank == 0 and args.out is None:
        shutil.rmtree(out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
