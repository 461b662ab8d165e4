"""A small, fast objective for chaos runs (``slurm/devcluster/chaos.py``, tests/cluster/test_chaos.py).

``params["x"]`` in [0, 1]; ``HPCDL_CHAOS_EPOCHS`` epochs (default 4) of ``HPCDL_CHAOS_EPOCH_S``
seconds (default 0.75) each, reported to the pruner; the value peaks at x = 0.3. Every rank of a
multi-rank trial joins an all-reduce each epoch, so a rank killed mid-trial is noticed by the
others. Each attempt appends a line (rank, attempt, pid, node, job, run id) to the trial
folder's ``attempts.jsonl``: the invariant check reads the W&B run id every attempt of a trial
used from there (this objective starts no W&B run; the trainer's runs are checked in their
``wandb/`` folders).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from hpcdl.hpo.protocol import BaseObjective


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ChaosToy(BaseObjective):
    def run(self, params: dict, ctx) -> float:
        rank, world = _dist()
        line = {
            "rank": rank,
            "attempt": ctx.slot.attempts,
            "pid": os.getpid(),
            "node": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
            "job": ctx.slot.job,
            "run_id": ctx.slot.run_id,
            "time": time.time(),
        }
        with (ctx.trial_dir / "attempts.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")
        epochs = int(os.environ.get("HPCDL_CHAOS_EPOCHS", "4"))
        pause = float(os.environ.get("HPCDL_CHAOS_EPOCH_S", "0.75"))
        value = 0.0
        for epoch in range(1, epochs + 1):
            time.sleep(pause)
            if world > 1:
                import torch
                import torch.distributed as dist

                total = torch.ones(1)
                dist.all_reduce(total)
            value = (1 - (params["x"] - 0.3) ** 2) * (1 - 0.5**epoch)
            ctx.report(epoch, value)
        return value

    def final(self, params: dict, spec, out_dir: Path) -> dict:
        return {"test_acc": 1 - (params["x"] - 0.3) ** 2}


toy = ChaosToy()
