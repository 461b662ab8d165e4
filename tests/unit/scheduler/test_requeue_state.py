"""A cancelled job must not requeue itself (issue 26's docs walk: `hpcdl sweep cancel` right
after `sweep run` left both workers requeued). The state is read from slurmctld, whose answer
right after scancel is COMPLETING, then CANCELLED; the cluster side is
tests/cluster/test_docs_walk.py's getting-started cluster test (its cancelled sweep's jobs must
leave the queue), which failed twice before the fix."""

from __future__ import annotations

import pytest

from hpcdl.scheduler import _requeue

# `scontrol -o show job` lines, abridged, as the dev cluster printed them (Slurm 22.05)
RUNNING = "JobId=2043 ArrayJobId=2043 ArrayTaskId=0 JobName=wrap JobState=RUNNING Reason=None"
COMPLETING = "JobId=2043 ArrayJobId=2043 ArrayTaskId=0 JobState=COMPLETING Reason=None"
CANCELLED = "JobId=2043 ArrayJobId=2043 ArrayTaskId=0 JobState=CANCELLED Reason=None"


@pytest.mark.parametrize(
    ("line", "state"),
    [(RUNNING, "RUNNING"), (COMPLETING, "COMPLETING"), (CANCELLED, "CANCELLED"), ("", None)],
)
def test_job_state_reads_scontrol(line, state):
    assert _requeue.job_state(line) == state
