"""Trial packing changed by ``sweep resume`` on the dev cluster (issue 24), both directions: a
sweep packed two trials per worker is cancelled while both lanes run, resumed with three lanes
(cancelled again while the three run), then resumed unpacked. Each round's lanes claim under
their own ``TASK+LANE``; every cancelled trial runs again as the same trial, and each of the six
trials is recorded once. The rules (resume keys, the round's packing) are tables in
tests/unit/hpo/test_pack_resume.py.

Three rounds of a toy worker (about a minute): behind ``-m scale``."""

from __future__ import annotations

import time

import pytest

from hpcdl.hpo import Sweep, SweepSpec
from hpcdl.scheduler import log_tail

pytestmark = [pytest.mark.slurm, pytest.mark.scale]


@pytest.fixture
def scale_selected(request: pytest.FixtureRequest) -> None:
    expr = request.config.getoption("markexpr") or ""
    if "scale" not in expr or "not scale" in expr:
        pytest.skip("the packed resume run (three rounds, ~1 min) runs only with -m scale")


def _running(sweep: Sweep, n: int) -> dict[int, tuple[int, str | None]]:
    """Wait until ``n`` trials run at once; their ``{slot: (trial, claim)}``."""
    deadline = time.monotonic() + 120
    while True:
        held = {s.slot: (s.trial, s.job) for s in sweep.slots() if s.state == "running"}
        if len(held) >= n:
            return held
        if time.monotonic() > deadline:
            logs = "\n".join(log_tail(j.handle, 40) for j in sweep.jobs() if j.kind == "workers")
            pytest.fail(f"{n} lanes never ran at once: {sweep.status()}\n{logs}")
        time.sleep(0.3)


def _cancel(sweep: Sweep) -> None:
    sweep.cancel()
    deadline = time.monotonic() + 120
    while any(j.live for j in sweep.jobs()):
        assert time.monotonic() < deadline, [(j.kind, j.state) for j in sweep.jobs()]
        time.sleep(1)


def test_resume_with_more_then_fewer_lanes_runs_each_trial_once(devcluster, scale_selected):
    spec = SweepSpec.model_validate({
        "name": "pack-resume", "objective": "tests.helpers.pack_objectives:slow",
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
        "sampler": {"name": "random", "seed": 0}, "trials": 6, "parallelism": 1,
        "trials_per_node": 2, "final": False,
        "resources": {"site": devcluster, "time": "5m", "cpus_per_task": 2},
    })  # fmt: skip
    sweep = Sweep(spec)
    try:
        sweep.run()
        first = _running(sweep, 2)
        _cancel(sweep)
        sweep.resume(["trials_per_node=3", "resources.cpus_per_task=3"])  # more lanes
        second = _running(sweep, 3)
        _cancel(sweep)
        sweep.resume(["trials_per_node=1"])  # fewer: one at a time
        sweep.wait(timeout=300, poll=1.0)
    finally:
        sweep.cancel()
    rounds = [j.handle.job_id for j in sweep.jobs() if j.kind == "workers"]
    assert len(rounds) == 3, rounds
    # each round's lanes claimed under its own task: TASK+0.., and the unpacked one TASK
    assert {c.rpartition("+")[0] for _, c in first.values()} == {rounds[0]}, first
    assert sorted(c.rpartition("+")[2] for _, c in first.values()) == ["0", "1"], first
    assert {c.rpartition("+")[0] for _, c in second.values()} == {rounds[1]}, second
    assert sorted(c.rpartition("+")[2] for _, c in second.values()) == ["0", "1", "2"], second
    slots = {s.slot: s for s in sweep.slots()}
    assert [s.state for s in slots.values()] == ["complete"] * 6, sweep.status()
    assert sorted(s.trial for s in slots.values()) == list(range(6))
    assert len(sweep.study().trials) == 6  # nothing asked twice
    for held in (first, second):  # a cancelled trial ran again as itself, one more attempt
        for slot_no, (trial, _) in held.items():
            assert slots[slot_no].trial == trial and slots[slot_no].attempts >= 2, slots[slot_no]
    last = [s.job for s in slots.values() if (s.job or "").startswith(rounds[2])]
    assert last and set(last) == {rounds[2]}, slots  # unpacked: the task's own name
    assert sweep.spec.lanes == 1 and Sweep.load("pack-resume").spec.lanes == 1
