"""A timeline of the test run, for finding where `make test`'s wall time goes.

With HPCDL_TEST_TIMELINE=FILE set, every test appends one JSON line to FILE: its node id, the
xdist worker that ran it, and wall-clock start and end (setup to teardown). Lines are short
single writes to a file opened with O_APPEND, so two workers never interleave inside a line.
`python -m tests.helpers.timeline FILE` prints each file's total, each worker's busy time and
the gaps where a worker waited (on a cluster lock, or for the other worker at the end).
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import sys
import time
from collections import defaultdict

_started: dict[str, tuple[float, float]] = {}
_controller = False  # pytest-xdist's controller sees every worker's reports: only workers write


def pytest_configure(config: object) -> None:
    global _controller
    # the controller of an xdist run: it was given workers, and is not one
    workers = getattr(config.option, "numprocesses", None)  # type: ignore[attr-defined]
    _controller = bool(workers) and not hasattr(config, "workerinput")


def _cpu() -> float:
    """CPU seconds of this process and of the children it waited for (CLI calls, local jobs;
    not cluster jobs, whose processes are Slurm's)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def pytest_runtest_logstart(nodeid: str, location: object) -> None:
    _started[nodeid] = (time.time(), _cpu())


def pytest_runtest_logfinish(nodeid: str, location: object) -> None:
    path = os.environ.get("HPCDL_TEST_TIMELINE")
    started = _started.pop(nodeid, None)
    if not path or started is None or _controller:
        return
    line = {
        "test": nodeid,
        "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
        "start": round(started[0], 3),
        "end": round(time.time(), 3),
        "cpu": round(_cpu() - started[1], 2),
    }
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def summary(rows: list[dict]) -> str:
    by_file: dict[str, float] = defaultdict(float)
    cpu_by_file: dict[str, float] = defaultdict(float)
    by_worker: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_file[row["test"].split("::")[0]] += row["end"] - row["start"]
        cpu_by_file[row["test"].split("::")[0]] += row.get("cpu", 0.0)
        by_worker[row["worker"]].append(row)
    first = min(r["start"] for r in rows)
    last = max(r["end"] for r in rows)
    out = [f"wall {last - first:.0f} s"]
    for worker, items in sorted(by_worker.items()):
        items.sort(key=lambda r: r["start"])
        busy = sum(r["end"] - r["start"] for r in items)
        gaps = [(b["start"] - a["end"], b["test"]) for a, b in itertools.pairwise(items)]
        big = sorted(gaps, reverse=True)[:5]
        tail = last - items[-1]["end"]
        out.append(f"{worker}: busy {busy:.0f} s, idle at the end {tail:.0f} s")
        out += [f"    gap {g:.0f} s before {t}" for g, t in big if g > 2]
    out.append("files, longest first: wall, CPU of the tests and the processes they waited for")
    out += [
        f"  {s:7.1f} s {cpu_by_file[f]:7.1f} s  {f}"
        for f, s in sorted(by_file.items(), key=lambda kv: -kv[1])
    ]
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        print(summary([json.loads(line) for line in fh if line.strip()]))
