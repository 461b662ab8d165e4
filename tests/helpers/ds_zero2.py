"""A stock DeepSpeed script (as DeepSpeed's getting-started page writes it): init_distributed(),
then two ZeRO-2 training steps of a small model. It knows nothing of hpcdl or Slurm. Each rank
writes what it saw to ``PREFIX.RANK.json``."""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
config = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "Adam", "params": {"lr": 0.01, "torch_adam": True}},
    "zero_optimization": {"stage": 2},
    "steps_per_print": 1000,
}
engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                       config=config)  # fmt: skip
torch.manual_seed(1 + rank)
losses = []
for _ in range(2):
    x = torch.randn(4, 8)
    loss = engine(x).pow(2).mean()
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())

total = torch.tensor([float(rank)])
dist.all_reduce(total)
report = {
    "rank": rank,
    "world": world,
    "engine_world": engine.world_size,
    "zero_stage": engine.zero_optimization_stage(),
    "steps": engine.global_steps,
    "losses": losses,
    "sum": total.item(),
}
with open(f"{sys.argv[1]}.{rank}.json", "w") as f:
    json.dump(report, f)
dist.barrier()
dist.destroy_process_group()  # no rank exits while a peer still talks to it
# Python < 3.14 can abort a gloo rank at interpreter exit after its work is done, as long as
# DDP/DeepSpeed/Lightning hold the group (docs: bring-your-script, "Exit status"); one line:
from hpcdl import exit_guard  # noqa: E402

exit_guard.install()
