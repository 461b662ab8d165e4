"""A plain Lightning script (as Lightning's docs write it): a LightningModule, a Trainer with the
DDP strategy for NODES nodes x DEVICES processes, two training steps. It knows nothing of hpcdl;
Lightning finds the cluster itself (SLURMEnvironment under Slurm). Each rank writes what it saw
to ``PREFIX.RANK.json``. Usage: lightning_ddp.py PREFIX NODES DEVICES"""

import json
import os
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_fit_end(self):
        total = self.trainer.strategy.reduce(torch.tensor(float(self.global_rank)), reduce_op="sum")
        report = {
            "rank": self.global_rank,
            "world": self.trainer.world_size,
            "node_rank": self.trainer.node_rank,
            "local_rank": self.trainer.local_rank,
            "cluster": type(self.trainer.strategy.cluster_environment).__name__,
            "steps": self.trainer.global_step,
            "sum": total.item(),
            "env": {k: os.environ.get(k) for k in ("RANK", "SLURM_PROCID", "SLURMD_NODENAME")},
        }
        with open(f"{sys.argv[1]}.{self.global_rank}.json", "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu",
        strategy="ddp",
        num_nodes=int(sys.argv[2]),
        devices=int(sys.argv[3]),
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(Model(), data)
    # PyTorch asks scripts to end their process group (Lightning leaves it up)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # Python < 3.14 can abort a gloo rank at interpreter exit after its work is done, as long as
    # Lightning's DDP holds the group (docs: bring-your-script, "Exit status"); one line:
    from hpcdl import exit_guard

    exit_guard.install()
