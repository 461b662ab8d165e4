"""Test job: rendezvous through hpcdl.launch, all-reduce the ranks, write what each rank saw."""

import json
import sys

import torch
import torch.distributed as dist

from hpcdl.launch import init_distributed

info = init_distributed(timeout_s=120)
total = torch.tensor([float(info.rank)])
dist.all_reduce(total)
with open(f"{sys.argv[1]}.{info.rank}.json", "w") as f:
    json.dump({**info.__dict__, "sum": total.item(), "backend": dist.get_backend()}, f)
dist.destroy_process_group()
