"""A plain torchrun-style DDP script (as PyTorch's DDP tutorial writes it): the default env://
rendezvous, DDP on a linear layer, one step, an all-reduce of the ranks. It knows nothing of
hpcdl or Slurm. Each rank writes what it saw to ``PREFIX.RANK.json``."""

import json
import os
import socket
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

dist.init_process_group("gloo")  # env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
rank, world = dist.get_rank(), dist.get_world_size()

torch.manual_seed(0)
model = DDP(torch.nn.Linear(4, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
torch.manual_seed(1 + rank)  # different data on every rank
loss = model(torch.randn(8, 4)).pow(2).mean()
loss.backward()
opt.step()

total = torch.tensor([float(rank)])
dist.all_reduce(total)
weights = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.zeros_like(weights) for _ in range(world)]
dist.all_gather(gathered, weights)  # DDP keeps every replica identical after the step

names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
         "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
         "SLURM_LOCALID", "SLURM_NODEID", "TORCHELASTIC_RUN_ID", "SLURMD_NODENAME")  # fmt: skip
report = {
    "rank": rank,
    "world": world,
    "sum": total.item(),
    "replicas_equal": all(torch.equal(g, weights) for g in gathered),
    "host": socket.gethostname(),
    "env": {k: os.environ.get(k) for k in names},
}
with open(f"{sys.argv[1]}.{rank}.json", "w") as f:
    json.dump(report, f)
dist.destroy_process_group()
# Python < 3.14 can abort a gloo rank at interpreter exit after its work is done, as long as
# DDP/DeepSpeed/Lightning hold the group (docs: bring-your-script, "Exit status"); one line:
from hpcdl import exit_guard  # noqa: E402

exit_guard.install()
