"""An objective for the trial-packing tests (tests/cluster/test_sweep_packing.py): each trial
records where it ran (its lane, task, GPUs, CPUs, threads) and when, and lasts long enough for
the lanes of one worker to overlap."""

from __future__ import annotations

import json
import os
import time


def where(params: dict, ctx) -> float:
    start = time.time()
    time.sleep(2.0)
    record = {
        "trial": ctx.slot.trial,
        "claim": ctx.slot.job,
        "lane": os.environ.get("HPCDL_PACK_LANE"),
        "job": os.environ.get("SLURM_JOB_ID"),
        "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cpus": sorted(os.sched_getaffinity(0)),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "start": start,
        "end": time.time(),
    }
    (ctx.trial_dir / "where.json").write_text(json.dumps(record))
    return float(params["x"])


def slow(params: dict, ctx) -> float:
    """Long enough (6 s) for a test to cancel the worker while both lanes run a trial."""
    time.sleep(6.0)
    return float(params["x"])
