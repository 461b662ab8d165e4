"""Multi-node DeepSpeed training from a YAML config (``hpcdl train``).

This module stays light: it is imported when a job unpickles :func:`run_job`, before any handler
for the preemption signal exists, so torch and DeepSpeed are imported only inside the function.
"""

from __future__ import annotations

from typing import Any


def run_job(run_dir: str) -> dict[str, Any]:
    """What every task of a training job runs (also usable under mpiexec, srun or torchrun):
    train the run folder ``run_dir``, resuming from its newest valid checkpoint."""
    from hpcdl.train.preempt import PreemptionFlag

    flag = PreemptionFlag()  # first: replaces submitit's handler, which serves rank 0 only
    from hpcdl.train.trainer import train

    result = train(run_dir, flag)
    finish_distributed()
    return result


def finish_distributed() -> None:
    """Leave together: a process that exits while a peer still tears down its gloo connections
    can abort that peer (and fail the job step)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
