"""Sweeps as real Slurm job arrays on the dev cluster (toy objective: the machinery, not training)."""

from __future__ import annotations

import itertools
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import release_requeued, run_cli, sacct_finished

from hpcdl.hpo import Sweep, SweepSpec
from hpcdl.hpo.lifecycle import final_main
from hpcdl.hpo.worker import read_journals

pytestmark = pytest.mark.slurm


def spec(**changes) -> SweepSpec:
    base = {
        "name": "toy",
        "objective": "tests.helpers.objectives:curve",
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
        "sampler": {"name": "random", "seed": 0},
        "trials": 12,
        "parallelism": 3,
        "resources": {"site": "devcluster", "time": "10m"},
    }
    return SweepSpec.model_validate({**base, **changes})


def _peak(spans: list[tuple[float, float]]) -> int:
    """The most ``(start, end)`` spans open at one time."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = peak = 0
    for _, delta in events:  # an end sorts before a start at the same instant
        running += delta
        peak = max(peak, running)
    return peak


def _trial_spans(sweep: Sweep) -> list[tuple[float, float]]:
    """Each trial's claim and end as its task's journal has them (``time.time()``: sub-second,
    unlike sacct's Start/End, whose one-second resolution can shorten or empty a span)."""
    return [(ln["claimed"], ln["ended"]) for lines in read_journals(sweep.paths).values()
            for ln in lines if ln["event"] == "trial"]  # fmt: skip


def _wait_for(predicate, timeout: float, what: str, sweep: Sweep) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} never happened: {sweep.status()}"
        time.sleep(1)


def _queued(sweep: Sweep) -> list[str]:
    """``ID STATE REASON`` of every job of the sweep still in squeue (by the sweep's job names)."""
    names = ",".join(f"sweep-{sweep.spec.name}{s}" for s in ("", "-final", "-follow"))
    out = subprocess.run(["squeue", "-h", "-r", "-n", names, "-o", "%i %T %r"],
                         capture_output=True, text=True, timeout=30, check=True).stdout  # fmt: skip
    return out.splitlines()


def _settled(sweep: Sweep, timeout: float = 180) -> None:
    """Wait until no job of the sweep is queued or running (the final and follow-up jobs end a
    little after the result appears); fail with what is left and the sweep's decisions."""
    _wait_for(lambda: not _queued(sweep), timeout, "all jobs of the sweep ending", sweep)


def _recorded_once(sweep: Sweep, trials: int) -> None:
    slots = sweep.slots()
    assert [s.state for s in slots] == ["complete"] * trials
    study = sweep.study().trials
    assert len(study) == trials and sorted(s.trial for s in slots) == list(range(trials))
    assert all(t.state.name == "COMPLETE" for t in study)


def _task_of(sweep: Sweep, slot_no: int) -> str:
    """The Slurm task (``ARRAY_TASK``) that claimed the slot last."""
    slot = sweep.paths.read_slot(slot_no)
    assert slot is not None and slot.job, slot
    return slot.job


def test_sweep_survives_a_killed_worker(devcluster, monkeypatch):
    """Warm workers (the default): the task running slot 4 is cancelled; the other workers run
    the rest and the follow-up job resubmits slot 4 alone (same trial, a second attempt)."""
    monkeypatch.setenv("HPCDL_TEST_EPOCH_S", "1.5")
    sweep = Sweep(spec(name="killed"))
    array, _final, _follow = sweep.run()
    assert array.array == 3  # parallelism workers, not one task per trial
    _wait_for(lambda: (s := sweep.paths.read_slot(4)) is not None and s.epochs >= 1, 300,
              "slot 4 starting", sweep)  # fmt: skip
    subprocess.run(["scancel", _task_of(sweep, 4)], check=True, timeout=30)
    sweep.wait(timeout=600)
    slots = sweep.slots()
    assert [s.state for s in slots] == ["complete"] * 12
    assert slots[4].attempts == 2  # resumed the same trial, not a new one
    assert len(sweep.study().trials) == 12
    kinds = [s["kind"] for s in sweep.submissions()]
    assert kinds.count("workers") == 2 and "array" not in kinds
    second = [s for s in sweep.submissions() if s["kind"] == "workers"][1]
    assert second["slots"] == [4] and second["array"] == 1
    assert sweep.best()["final"]["test_acc"] > 0.9
    _settled(sweep)
    _recorded_once(sweep, 12)


def test_worker_signalled_with_nothing_to_checkpoint_is_requeued_for_the_rest(
    devcluster, monkeypatch
):
    """The time-limit signal reaches a warm worker whose trial cannot checkpoint (the toy
    objective ends its trial anyway): the worker takes no new trial, requeues its task, and the
    task comes back (same id) for the round's other slots; nothing runs twice."""
    monkeypatch.setenv("HPCDL_TEST_EPOCH_S", "1")
    sweep = Sweep(spec(name="between", trials=3, parallelism=1, final=False))
    array, _follow = sweep.run()
    task = array.job_id  # an array of one task is submitted as a plain job
    _wait_for(lambda: (s := sweep.paths.read_slot(0)) is not None and s.epochs >= 1, 300,
              "slot 0 starting", sweep)  # fmt: skip
    subprocess.run(["scancel", "--signal=USR2", task], check=True, timeout=30)
    deadline = time.monotonic() + 300
    while not all(s.state == "complete" for s in sweep.slots()) or len(sweep.slots()) < 3:
        assert time.monotonic() < deadline, sweep.status()
        release_requeued(task)
        time.sleep(1)
    _settled(sweep)
    lines = read_journals(sweep.paths)[task]
    assert [ln["event"] for ln in lines] == ["start", "trial", "requeued", "start", "trial",
                                             "trial"], lines  # fmt: skip
    assert [ln["slot"] for ln in lines if ln["event"] == "trial"] == [0, 1, 2]
    assert lines[2]["signal"] == "SIGUSR2" and lines[3]["restarts"] == 1
    assert {s.job for s in sweep.slots()} == {task} and {s.attempts for s in sweep.slots()} == {1}
    _recorded_once(sweep, 3)


def test_task_cancelled_after_its_trial_finished_does_not_wedge_the_final(devcluster, monkeypatch):
    """The issue's wedge: a task is cancelled after its trials were recorded, so no trial is
    missing but the array did not succeed. The final job (afterany) checks the slots itself and
    runs; nothing is resubmitted and nothing is left pending."""
    monkeypatch.setenv("HPCDL_TEST_EPOCH_S", "0.5")
    monkeypatch.setenv("HPCDL_TEST_LINGER_SLOT", "1")
    monkeypatch.setenv("HPCDL_TEST_LINGER_S", "120")
    sweep = Sweep(spec(name="lingered", trials=6))
    sweep.run()
    _wait_for(lambda: not sweep.missing_slots(), 300, "every slot finished", sweep)
    lingering = _task_of(sweep, 1)  # its worker stays alive after its last trial
    assert f"{lingering} RUNNING" in " ".join(_queued(sweep)), _queued(sweep)
    subprocess.run(["scancel", lingering], check=True, timeout=30)
    sweep.wait(timeout=600)
    _settled(sweep)
    assert sweep.best()["final"]["test_acc"] > 0.9
    _recorded_once(sweep, 6)
    assert all(s.attempts == 1 for s in sweep.slots())
    assert [s["kind"] for s in sweep.submissions()] == ["workers", "final", "follow"]
    states = {j.kind: j for j in sweep.jobs()}
    assert states["workers"].tasks[lingering].state == "CANCELLED"
    assert states["final"].state == "COMPLETED"


def test_cancelled_array_stops_and_one_resume_finishes_it(devcluster, monkeypatch):
    """`scancel` of the whole array stops the sweep (the follow-up job does not undo a user's
    cancel, but it cancels a final job that can never start: an `afterok` one, as older sweeps
    had); status says what is stuck; one `hpcdl sweep resume` brings the sweep to its final
    result and leaves nothing in the queue."""
    monkeypatch.setenv("HPCDL_TEST_EPOCH_S", "1.5")
    sweep = Sweep(spec(name="stopped", trials=8, parallelism=2))
    array, _final, _follow = sweep.run()
    life = sweep.lifecycle
    legacy = life._job(name="sweep-stopped-final", function=final_main,
                       args=(str(sweep.paths.root),),
                       dependencies=[f"afterok:{array.job_id}"]).submit(sweep.site)  # fmt: skip
    life._record("final", legacy, [])
    _wait_for(
        lambda: sum(s.state == "complete" for s in sweep.slots()) >= 2, 300, "2 trials", sweep
    )
    subprocess.run(["scancel", array.job_id], check=True, timeout=30)
    _wait_for(lambda: any(e["who"] == "follow-up" for e in life.events()), 180,
              "the follow-up decision", sweep)  # fmt: skip
    _wait_for(lambda: [ln for ln in _queued(sweep) if not ln.startswith(legacy.job_id)] == [],
              120, "the round ending", sweep)  # fmt: skip
    decision = [e["text"] for e in life.events() if e["who"] == "follow-up"][-1]
    assert "the sweep was stopped" in decision, decision
    assert f"cancelled {legacy.job_id}: it could never start" in decision, decision
    assert [s["kind"] for s in sweep.submissions()].count("workers") == 1
    status = run_cli("sweep", "status", "stopped", env={"COLUMNS": "80"}).stdout
    flat = status.replace("\n  ", " ")
    assert "no job of the sweep will run them: 'hpcdl sweep resume stopped'" in flat, status
    assert f"final   {legacy.job_id:<9} CANCELLED" in status, status
    proc = run_cli("sweep", "resume", "stopped", timeout=120)
    assert proc.returncode == 0 and "resubmitted" in proc.stdout, proc.stderr
    sweep.wait(timeout=600)
    _settled(sweep)
    _recorded_once(sweep, 8)
    assert sweep.best()["final"]["test_acc"] > 0.9
    assert {j.handle.job_id: j.state for j in sweep.jobs()}[legacy.job_id] == "CANCELLED"


def test_cancelled_sweep_resumes_only_missing_trials(devcluster, monkeypatch):
    monkeypatch.setenv("HPCDL_TEST_EPOCH_S", "1.5")
    sweep = Sweep(spec(name="resumed", trials=8, parallelism=2, final=False))
    sweep.run()
    _wait_for(
        lambda: sum(s.state == "complete" for s in sweep.slots()) >= 2, 300, "2 trials", sweep
    )
    cancelled = sweep.cancel()
    assert cancelled
    _wait_for(lambda: not sweep._active_jobs(("workers", "follow")), 60, "cancellation", sweep)
    missing = sweep.missing_slots()
    assert 0 < len(missing) < 8
    (array, _follow) = sweep.resume()
    assert array.array == min(2, len(missing))  # workers for the missing slots
    sweep.wait(timeout=600)
    assert [s.state for s in sweep.slots()] == ["complete"] * 8
    assert len(sweep.study().trials) == 8


def test_two_node_trials_whose_rank_1_raises_or_hangs_are_retried_and_recorded_once(devcluster):
    """Slot 0: rank 1 raises in set-up while rank 0 waits in an all-reduce; rank 1 decides for
    both (retry) and rank 0's watchdog ends it at once. Slot 1: rank 1 hangs; rank 0's all-reduce
    times out (collective_timeout_s), rank 0 decides, rank 1's watchdog ends it. The follow-up job
    reruns both trials, the study holds each once, and no rank outlives its attempt."""
    sweep = Sweep(spec(name="twonode", trials=2, parallelism=1, final=False, trials_per_task=1,
                       objective="tests.helpers.objectives:rank_one_fails", collective_timeout_s=20,
                       resources={"site": "devcluster", "time": "10m", "nodes": 2,
                                  "tasks_per_node": 1}))  # fmt: skip
    array, _follow = sweep.run()
    sweep.wait(timeout=600)
    _settled(sweep)
    _recorded_once(sweep, 2)
    rows = {r["id"]: r for r in sacct_finished(array.job_id, 2)}
    ts = datetime.fromisoformat
    for slot_no, culprit, survivor, expected, seconds in (
        (0, 1, 0, "rank 1: RuntimeError: rank 1 breaks", (0, 15)),
        (1, 0, 1, "rank 0: ", (20, 60)),  # rank 0 decided: its all-reduce timed out
    ):
        slot = sweep.paths.read_slot(slot_no)
        assert slot.attempts == 2 and expected in slot.error, slot
        trial_dir = sweep.paths.trial_dir(slot)
        assert f'"rank": {culprit}' in (trial_dir / "abort-attempt1.json").read_text()
        task = rows[f"{array.job_id}_{slot_no}"]
        # from the attempt's start (the ranks' pid files; not the task's, whose start-up under a
        # loaded host takes a while) to the task's end
        began = min(p.stat().st_mtime for p in trial_dir.glob("rank*-attempt1.pid"))
        elapsed = ts(task["end"]).timestamp() - began
        assert task["state"] == "FAILED" and seconds[0] - 1 <= elapsed < seconds[1], (task, elapsed)
        _out, err = array.log_paths(task=survivor, array_task=slot_no)
        assert f"attempt 1 ended by rank {culprit}" in err.read_text()
        for rank in (0, 1):  # no rank outlives the attempt
            pid = (trial_dir / f"rank{rank}-attempt1.pid").read_text()
            assert not Path(f"/proc/{pid}").exists(), f"rank {rank} (pid {pid}) still alive"
    kinds = [s["kind"] for s in sweep.submissions()]
    assert kinds == ["array", "follow", "array", "follow"]


def test_throttle_changes_the_running_array(devcluster, monkeypatch):
    monkeypatch.setenv("HPCDL_TEST_EPOCH_S", "3")
    sweep = Sweep(spec(name="rethrottled", trials=8, parallelism=1, final=False, trials_per_task=1))
    array, _follow = sweep.run()
    sweep.throttle(3)
    out = subprocess.run(["scontrol", "show", "job", array.job_id], capture_output=True, text=True,
                         timeout=30).stdout  # fmt: skip
    assert "ArrayTaskThrottle=3" in out
    sweep.wait(timeout=600)
    spans = _trial_spans(sweep)
    assert len(spans) == 8 and _peak(spans) >= 2, spans  # the raised throttle let 2+ run at once


def test_warm_workers_run_several_trials_per_process_and_prune(devcluster, monkeypatch):
    """Two workers run nine ASHA trials: each task claims trial after trial in one process (one
    interpreter start in its journal and log), a pruned trial stops early and its worker takes
    the next trial without a scheduler round trip."""
    monkeypatch.setenv("HPCDL_TEST_EPOCH_S", "1")
    sweep = Sweep(spec(name="pruning", trials=9, parallelism=2, final=False,
                       sampler={"name": "random", "seed": 3},
                       pruner={"name": "asha", "min_resource": 1, "reduction_factor": 2},
                       space={"x": {"type": "uniform", "low": 0.0, "high": 1.0},
                              "epochs": {"type": "choice", "values": [6]}}))  # fmt: skip
    array, _follow = sweep.run()
    proc = run_cli("sweep", "throttle", "pruning", "3")  # a worker array is as wide as it gets
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "runs warm workers (2 at once, each until no trial is left)" in proc.stderr
    sweep.wait(timeout=600)
    _settled(sweep)
    slots = sweep.slots()
    pruned = [s for s in slots if s.state == "pruned"]
    assert pruned and all(s.epochs < 6 for s in pruned)
    assert len(sacct_finished(array.job_id, 2)) == 2
    by_task: dict[str, list[int]] = {}
    for s in slots:
        by_task.setdefault(s.job, []).append(s.slot)
    # (on a busy cluster the second worker may start late: it then runs fewer trials, or none)
    assert set(by_task) <= {f"{array.job_id}_0", f"{array.job_id}_1"}, by_task
    assert max(len(v) for v in by_task.values()) >= 2, by_task
    journals = read_journals(sweep.paths)
    gaps = []
    for task, ran in by_task.items():
        lines = journals[task]
        assert [ln["event"] for ln in lines].count("start") == 1, lines
        assert len({ln["pid"] for ln in lines}) == 1, lines  # every trial in one process
        trials = [ln for ln in lines if ln["event"] == "trial"]
        assert sorted(ln["slot"] for ln in trials) == sorted(ran)
        gaps += [b["claimed"] - a["ended"] for a, b in itertools.pairwise(trials)]
        _out, err = array.log_paths(array_task=int(task.split("_")[1]))
        assert err.read_text().count(f"sweep worker {task} started") == 1, err.read_text()[-2000:]
    assert sorted(gaps)[len(gaps) // 2] < 2.0, gaps  # the next trial starts at once


def test_two_node_worker_runs_trials_over_one_process_group(devcluster):
    """A worker spanning two nodes: rank 0 claims and broadcasts each slot, both ranks run the
    trial (world size 2) and loop, and the end of the loop reaches both: the task completes."""
    sweep = Sweep(spec(name="twonodeworker", trials=3, parallelism=1, final=False,
                       objective="tests.helpers.worker_objectives:two_ranks",
                       resources={"site": "devcluster", "time": "10m", "nodes": 2,
                                  "tasks_per_node": 1}))  # fmt: skip
    array, _follow = sweep.run()
    sweep.wait(timeout=600)
    _settled(sweep)
    [row] = sacct_finished(array.job_id, 1)
    assert row["state"] == "COMPLETED", row
    task = array.job_id  # an array of one task is submitted as a plain job
    assert {s.job for s in sweep.slots()} == {task}
    lines = read_journals(sweep.paths)[task]
    assert [ln["event"] for ln in lines] == ["start", "trial", "trial", "trial"], lines
    pids = [{p.name: p.read_text() for p in sweep.paths.trial_dir(s).glob("rank*.pid")}
            for s in sweep.slots()]  # fmt: skip
    assert all(p == pids[0] and len(p) == 2 for p in pids), pids  # one process per rank
