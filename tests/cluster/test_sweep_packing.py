"""Trial packing on the dev cluster (issue 24): one allocation of the gpu partition (node3-4
declare two GRES GPUs and four CPUs each) runs two trials at once, each on its own GPU and CPU
slice, and every trial is recorded once. The rules (splits, refused specs) are tables in
tests/unit/hpo/test_packing.py; this proves the wiring: fork, affinity, CUDA_VISIBLE_DEVICES,
the lanes' claims."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from hpcdl.hpo import Sweep, SweepSpec
from hpcdl.scheduler import log_tail

pytestmark = pytest.mark.slurm


def wait(sweep: Sweep, timeout: float) -> None:
    """Until the sweep finished; on timeout, fail with its state and the workers' log."""
    try:
        sweep.wait(timeout=timeout, poll=1.0)
    except TimeoutError as exc:
        logs = "\n".join(log_tail(j.handle, 40) for j in sweep.jobs() if j.kind == "workers")
        pytest.fail(f"{exc}\n{logs}")


def _packed(name: str, objective: str, resources: dict) -> SweepSpec:
    """4 random-search trials, one task of two lanes, on the dev cluster."""
    return SweepSpec.model_validate({
        "name": name,
        "objective": f"tests.helpers.pack_objectives:{objective}",
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
        "sampler": {"name": "random", "seed": 0},
        "trials": 4,
        "parallelism": 1,
        "trials_per_node": 2,
        "final": False,
        "resources": {"site": "devcluster", "time": "5m", **resources},
    })  # fmt: skip


def test_two_trials_at_once_each_on_its_own_gpu_and_cpus(devcluster):
    spec = _packed("packed", "where", {"partition": "gpu", "gpus_per_node": 2,
                                       "tasks_per_node": 1, "cpus_per_task": 4})  # fmt: skip
    sweep = Sweep(spec)
    try:
        workers = sweep.run()[0]
        assert workers.array == 1  # one allocation runs all four trials, two at a time
        wait(sweep, 180)
    finally:
        sweep.cancel()
    slots = sweep.slots()
    assert [s.state for s in slots] == ["complete"] * 4
    assert sorted(s.trial for s in slots) == [0, 1, 2, 3]  # every trial recorded once
    assert len(sweep.study().trials) == 4
    assert len({s.run_id for s in slots}) == 4  # each its own W&B run
    seen = [json.loads((sweep.paths.trial_dir(s) / "where.json").read_text()) for s in slots]
    tail = log_tail(workers, 40)
    assert len({r["job"] for r in seen}) == 1, (seen, tail)  # one Slurm allocation
    lanes: dict[str, list[dict]] = {}
    for r in seen:
        lanes.setdefault(r["lane"], []).append(r)
    assert set(lanes) == {"0", "1"}, (seen, tail)
    for lane, records in lanes.items():
        # each lane claims under TASK+LANE, keeps its GPU and CPUs from trial to trial
        assert {r["claim"].rpartition("+")[2] for r in records} == {lane}, records
        assert len({r["cuda_visible_devices"] for r in records}) == 1, records
        assert len({tuple(r["cpus"]) for r in records}) == 1, records
        assert {r["omp_threads"] for r in records} == {"2"}, records  # 4 CPUs / 2 trials
    gpus = {lane: records[0]["cuda_visible_devices"] for lane, records in lanes.items()}
    assert sorted(gpus.values()) == ["0", "1"], gpus  # one declared GPU each
    cpus = [set(records[0]["cpus"]) for records in lanes.values()]
    assert cpus[0] and cpus[1] and not cpus[0] & cpus[1], cpus  # disjoint CPU slices
    # the two lanes ran at the same time
    a, b = lanes["0"], lanes["1"]
    assert any(x["start"] < y["end"] and y["start"] < x["end"] for x in a for y in b), seen
    # the allocation asked Slurm for the GPUs and CPUs it split
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "AllocTRES", "-j", workers.job_id],
                         capture_output=True, text=True, timeout=30, check=True).stdout  # fmt: skip
    assert "cpu=4" in out and "gres/gpu=2" in out, out


@pytest.fixture
def selected(request: pytest.FixtureRequest) -> None:
    expr = request.config.getoption("markexpr") or ""
    if "scale" not in expr or "not scale" in expr:
        pytest.skip("the packed cancel-and-resume run (~40 s) runs only with -m scale")


@pytest.mark.scale
def test_a_cancelled_packed_worker_resumes_each_trial_once(devcluster, selected):
    """``sweep cancel`` while both lanes run a trial, then ``sweep resume``: the two cancelled
    trials run again (same trial numbers), the others once, and the study has four trials."""
    spec = _packed("packed-cancel", "slow", {"cpus_per_task": 2})
    sweep = Sweep(spec)
    try:
        workers = sweep.run()[0]
        deadline = time.monotonic() + 120
        while len([s for s in sweep.slots() if s.state == "running"]) < 2:
            if time.monotonic() > deadline:
                pytest.fail(f"two lanes never ran at once: {sweep.status()}\n{log_tail(workers)}")
            time.sleep(0.5)
        held = {s.slot: (s.trial, s.job) for s in sweep.slots() if s.state == "running"}
        assert len({job for _, job in held.values()}) == 2, held  # two lanes, two claims
        sweep.cancel()
        deadline = time.monotonic() + 120
        while any(j.live for j in sweep.jobs()):
            if time.monotonic() > deadline:
                pytest.fail(
                    f"cancelled jobs still live: {[(j.kind, j.state) for j in sweep.jobs()]}"
                )
            time.sleep(1)
        sweep.resume()
        wait(sweep, 180)
    finally:
        sweep.cancel()
    slots = {s.slot: s for s in sweep.slots()}
    assert [s.state for s in slots.values()] == ["complete"] * 4
    assert sorted(s.trial for s in slots.values()) == [0, 1, 2, 3]
    assert len(sweep.study().trials) == 4  # nothing asked twice
    for slot_no, (trial, _) in held.items():
        assert slots[slot_no].trial == trial and slots[slot_no].attempts == 2, slots[slot_no]
