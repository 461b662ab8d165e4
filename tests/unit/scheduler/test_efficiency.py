"""sacct's usage fields parsed and turned into efficiency figures (tables; no cluster).

The sample rows are sacct 22.05's own output on the dev cluster with jobacct_gather/linux
(every 10 s): a 12 s job busy-looping one of its two CPUs (14424), a 5 s job that ended before
the first sample (14425: no memory figure), and a 17 s job holding 1 GiB of a 2 GiB request."""

from __future__ import annotations

import math

import pytest

from hpcdl.scheduler.efficiency import (
    Usage,
    parse_duration,
    parse_rows,
    parse_size,
    parse_tres,
    totals,
    usages,
)

SACCT = """\
14424|FAILED|2026-12-07T09:10:47|2026-12-07T09:10:47|2026-12-07T09:10:59|12|00:10.742|2|1||billing=2,cpu=2,mem=2G,node=1||
14424.batch|FAILED|2026-12-07T09:10:47|2026-12-07T09:10:47|2026-12-07T09:10:59|12|00:10.742|2|1|4572K|cpu=2,mem=2G,node=1|cpu=00:00:08,energy=0,fs/disk=15125,mem=4572K,pages=0,vmem=8112K|cpu=00:00:08,mem=4572K
14425|COMPLETED|2026-12-07T09:10:47|2026-12-07T09:10:47|2026-12-07T09:10:52|5|00:00.520|1|1||billing=1,cpu=1,mem=2G,node=1||
14425.batch|COMPLETED|2026-12-07T09:10:47|2026-12-07T09:10:47|2026-12-07T09:10:52|5|00:00.520|1|1||cpu=1,mem=2G,node=1|energy=0|
14426|COMPLETED|2026-12-07T09:10:47|2026-12-07T09:10:47|2026-12-07T09:11:04|17|00:00.525|1|1||billing=1,cpu=1,mem=2G,node=1||
14426.batch|COMPLETED|2026-12-07T09:10:47|2026-12-07T09:10:47|2026-12-07T09:11:04|17|00:00.525|1|1|1063676K|cpu=1,mem=2G,node=1|cpu=00:00:00,mem=1063676K,vmem=1067736K|mem=1063676K
"""

GIB = 2**30


@pytest.mark.parametrize(
    ("text", "size"),
    [("4572K", 4572 * 1024), ("2G", 2 * GIB), ("1.50M", 1.5 * 2**20), ("0", 0), ("", None),
     ("12", 12), ("3T", 3 * 2**40), ("2g", 2 * GIB), ("n/a", None)],
)  # fmt: skip
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("00:10.742", 10.742), ("01:02", 62), ("01:02:03", 3723), ("1-02:03:04", 93784),
     ("00:00:08", 8), ("", None), ("INVALID", None), ("2-00:00:00", 172800)],
)  # fmt: skip
def test_parse_duration(text, seconds):
    got = parse_duration(text)
    assert got is None if seconds is None else got == pytest.approx(seconds)


def test_parse_tres():
    assert parse_tres("cpu=2,mem=2G,node=1,gres/gpu=2") == {
        "cpu": "2", "mem": "2G", "node": "1", "gres/gpu": "2"
    }  # fmt: skip
    assert parse_tres("") == {}
    assert parse_tres("energy=0,junk,=3") == {"energy": "0"}


def test_rows_fold_steps_into_allocations():
    rows = parse_rows(SACCT + "garbage line\n")
    assert len(rows) == 6
    busy, short, mem = usages(rows)
    assert (busy.task, busy.state, busy.cpus, busy.elapsed_s) == ("14424", "FAILED", 2, 12)
    assert busy.cpu_eff == pytest.approx(10.742 / 24)
    assert busy.mem_peak == 4572 * 1024 and busy.mem_req == 2 * GIB
    # shorter than the gathering period: CPU from the final rusage, no memory sample at all
    assert short.cpu_eff == pytest.approx(0.52 / 5)
    assert short.mem_peak is None and short.mem_eff is None
    assert mem.mem_peak == 1063676 * 1024
    assert mem.mem_eff == pytest.approx(0.507, abs=0.001)
    assert mem.wait_s == 0 and mem.node_hours == pytest.approx(17 / 3600) and mem.gpu_hours == 0


def test_running_allocation_has_no_cpu_figure():
    """A running job's TotalCPU reads 0 until its steps end: no efficiency rather than 0 %."""
    line = "99|RUNNING|2026-12-07T09:00:00|2026-12-07T09:01:30|Unknown|60|00:00:00|4|2||cpu=4,mem=8G,node=2,gres/gpu=4||\n"  # fmt: skip
    (u,) = usages(parse_rows(line))
    assert u.cpu_s is None and u.cpu_eff is None
    assert u.wait_s == 90 and u.nodes == 2 and u.gpus == 4
    assert u.node_hours == pytest.approx(120 / 3600) and u.gpu_hours == pytest.approx(240 / 3600)


def test_array_task_steps_and_gpu_util():
    text = (
        "7_3|COMPLETED|2026-12-07T09:00:00|2026-12-07T09:00:10|2026-12-07T09:10:10|600|"
        "10:00.000|2|1||cpu=2,mem=4G,node=1,gres/gpu=1||\n"
        "7_3.0|COMPLETED|2026-12-07T09:00:00|2026-12-07T09:00:10|2026-12-07T09:10:10|600|"
        "10:00.000|2|1|1G|cpu=2,mem=4G|mem=1G|mem=1G,gres/gpuutil=87\n"
    )
    (u,) = usages(parse_rows(text))
    assert (u.task, u.gpus, u.gpu_util) == ("7_3", 1, 87.0)
    assert u.cpu_eff == pytest.approx(0.5) and u.mem_eff == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("cpu_s", "elapsed", "cpus", "eff"),
    [(10.0, 10, 2, 0.5), (20.0, 10, 2, 1.0), (0.0, 10, 1, 0.0), (5.0, 0, 1, None),
     (None, 10, 1, None)],
)  # fmt: skip
def test_cpu_eff_table(cpu_s, elapsed, cpus, eff):
    u = Usage("1", "COMPLETED", 0, elapsed, cpus, 1, 0, cpu_s, None, None)
    assert u.cpu_eff == (pytest.approx(eff) if eff is not None else None)


def test_totals():
    a = Usage("1", "COMPLETED", 5, 3600, 2, 2, 4, 3600.0, None, None)
    b = Usage("2", "RUNNING", 30, 1800, 2, 1, 0, None, None, None)
    t = totals([a, b])
    assert t["node_hours"] == pytest.approx(2.5) and t["gpu_hours"] == pytest.approx(4)
    assert t["cpu_eff"] == pytest.approx(0.5) and t["wait_s"] == 30
    assert math.isnan(totals([])["cpu_eff"])


def test_a_requeued_tasks_runs_keep_their_own_steps():
    """``sacct --duplicates``: two runs of 15000_1 (the first preempted), each followed by its
    batch step. Each run's peak is its own step's (keyed by id alone, both had 3 GiB)."""
    text = """\
15000_1|PREEMPTED|2026-12-07T09:00:00|2026-12-07T09:00:01|2026-12-07T09:00:31|30|00:10.000|2|1||billing=2,cpu=2,mem=4G,node=1||
15000_1.batch|CANCELLED|2026-12-07T09:00:01|2026-12-07T09:00:01|2026-12-07T09:00:31|30|00:10.000|2|1|3145728K|cpu=2,mem=4G,node=1|cpu=00:00:10,mem=3145728K|mem=3145728K
15000_1|COMPLETED|2026-12-07T09:00:31|2026-12-07T09:02:31|2026-12-07T09:02:41|10|00:05.000|2|1||billing=2,cpu=2,mem=4G,node=1||
15000_1.batch|COMPLETED|2026-12-07T09:02:31|2026-12-07T09:02:31|2026-12-07T09:02:41|10|00:05.000|2|1|1048576K|cpu=2,mem=4G,node=1|cpu=00:00:05,mem=1048576K|mem=1048576K
"""
    first, second = usages(parse_rows(text))
    assert (first.state, first.mem_peak) == ("PREEMPTED", 3 * GIB)
    assert (second.state, second.mem_peak) == ("COMPLETED", GIB)
    assert second.wait_s == 120.0 and first.cpu_s == 10.0 and second.cpu_s == 5.0
