"""An elastic job (``nodes: 1-2``) that Slurm starts on one node has the ranks of one node:
``hpcdl logs --task N`` refuses a rank it never ran (its handle records the largest count,
2 nodes' worth). The count is sacct's NNodes × tasks per node (hpcdl.scheduler.started; the
parsing is a table in tests/unit/scheduler/test_started_tasks.py)."""

from __future__ import annotations

import subprocess
import time

import pytest
from conftest import run_cli

from hpcdl import Job
from hpcdl.scheduler import log_tail
from hpcdl.scheduler.started import started_tasks

pytestmark = pytest.mark.slurm


def _scontrol(*args: str) -> None:
    proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_logs_of_an_elastic_job_started_on_one_node_know_its_ranks(devcluster):
    # queued to start later, then pinned to one node of its range and started at once (the dev
    # cluster is shared: another session's jobs decide otherwise whether it gets 1 or 2 nodes)
    job = Job(command=["sleep", "60"], nodes="1-2", tasks_per_node=1, time="2m",
              begin="now+600", site="devcluster", name="elastic-tasks")  # fmt: skip
    handle = job.submit()
    try:
        assert handle.tasks == 2 and handle.tasks_per_node == 1
        _scontrol("update", f"JobId={handle.job_id}", "NumNodes=1-1", "StartTime=now")
        deadline = time.monotonic() + 90
        while handle.state() != "RUNNING":
            if time.monotonic() > deadline:
                pytest.fail(f"job {handle.job_id} {handle.state()} after 90 s\n{log_tail(handle)}")
            time.sleep(0.5)
        assert started_tasks(handle) == 1
        refused = run_cli("logs", handle.job_id, "--task", "1")
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert refused.stderr.strip().splitlines() == [
            f"error: --task: job {handle.job_id} has tasks 0..0"
        ], refused.stderr
    finally:
        handle.cancel()
