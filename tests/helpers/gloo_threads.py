"""Test job: the shape of `hpcdl bench comm` (hpcdl's ranks(), DeepSpeed's comm layer, an
all-reduce and a barrier on its default group), then the threads this process still has once
the ranks have left; written to ``PREFIX.RANK.json``."""

import json
import os
import sys

import torch

from hpcdl.train.engine import import_deepspeed
from hpcdl.train.run import ranks


def thread_names() -> list[str]:
    return sorted(open(f"/proc/self/task/{tid}/comm").read().strip()
                  for tid in os.listdir("/proc/self/task"))  # fmt: skip


with ranks() as (_, info):
    deepspeed = import_deepspeed()
    total = torch.tensor([float(info.rank)])
    deepspeed.comm.all_reduce(total)
    deepspeed.comm.barrier()  # its default group: the world group
    during = thread_names()
with open(f"{sys.argv[1]}.{info.rank}.json", "w") as f:
    json.dump({"sum": total.item(), "during": during, "after": thread_names()}, f)
