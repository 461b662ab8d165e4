"""A sweep whose worker's launch fails on a node (the dev cluster's prolog fails it on demand,
slurm/devcluster/prolog.sh.in): Slurm drains the node and requeues the task *held* ("launch
failed requeued held"), a hold that never ends by itself. ``sweep status`` must name the held
task and say that ``sweep resume`` releases it; after the operator returns the node, one
``resume`` releases it and the sweep ends with every trial recorded once. Seen stalling a
chaos run for good before hpcdl knew this hold (session 11)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import OPERATOR_SCONTROL, REPO, release_requeued

from hpcdl.hpo import Sweep
from tests.helpers.fault_site import write_fault_site

sys.path.insert(0, str(REPO / "slurm/devcluster"))
import chaos

FAIL_DIR = Path("/var/lib/hpcdl-devcluster/fail-launch")
FAULT_NODES = ("node5", "node6", "node7")

pytestmark = [pytest.mark.slurm, pytest.mark.cluster_lock("fault")]


def _squeue(job_id: str) -> list[tuple[str, str, str]]:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", job_id],
                         capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    return [tuple(ln.split("|", 2)) for ln in out.splitlines() if ln.count("|") == 2]  # type: ignore[misc]


def _cluster_view(job_id: str) -> str:
    """What the test saw, for a failure's message."""
    nodes = subprocess.run(["sinfo", "-N", "-p", "fault", "-o", "%N %T %E"],
                           capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    return f"squeue: {_squeue(job_id)}\nsinfo:\n{nodes}"


def _return_drained_nodes() -> None:
    """As the operator would once the prolog is fixed: the nodes the prolog drained, back."""
    proc = subprocess.run(["sinfo", "-h", "-N", "-p", "fault", "-o", "%N|%T|%E"],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip(), f"sinfo: {proc.stderr}"
    for line in proc.stdout.splitlines():
        node, state, reason = line.split("|", 2)
        if "drain" in state and "Prolog" in reason:
            subprocess.run([*OPERATOR_SCONTROL, "update", f"NodeName={node}", "State=RESUME"],
                           check=True, timeout=30)  # fmt: skip


def _finishes_with_every_trial_once(sweep: Sweep, array: Any, trials: int) -> None:
    """Wait (240 s at most, then fail with the queue, the nodes and the logs) for the sweep's
    ``trials`` trials, starting the requeued tasks Slurm would start ~2 minutes later; then
    every slot complete and the study's trials exactly the slots'."""
    deadline = time.monotonic() + 240
    while sweep.paths.finished_count() < trials:
        for task, _state, _reason in _squeue(array.job_id):
            release_requeued(task)
        if time.monotonic() > deadline:
            logs = "".join(p.read_text(errors="replace")[-1500:]
                           for p in Path(array.folder).glob("*_log.*"))  # fmt: skip
            pytest.fail(
                f"{trials} trials not finished in 240 s\n{_cluster_view(array.job_id)}\n{logs}"
            )
        time.sleep(1)
    slots = sweep.slots()
    assert [s.state for s in slots] == ["complete"] * trials
    numbers = sorted(t.number for t in sweep.study().get_trials(deepcopy=False))
    assert numbers == sorted(s.trial for s in slots) == list(range(trials))


def test_a_task_held_after_a_failed_launch_is_named_and_released_by_resume(
    devcluster, tmp_path: Path, monkeypatch
):
    if not FAIL_DIR.is_dir():
        pytest.fail(f"{FAIL_DIR} is missing: the dev cluster predates its prolog "
                    "(slurm/devcluster/devcluster.sh up)", pytrace=False)  # fmt: skip
    monkeypatch.setenv("HPCDL_CHAOS_EPOCH_S", "0.2")
    monkeypatch.setenv("HPCDL_SITE_PATH", f"{tmp_path / 'site'}:{REPO / 'hpcdl/sites'}")
    site = write_fault_site(tmp_path / "site")
    spec = chaos.toy_spec("held", 5, trials=3, parallelism=1, site=site, partition="fault")
    asked = [FAIL_DIR / node for node in FAULT_NODES]  # whichever node Slurm picks fails once
    for f in asked:
        f.touch()
    try:
        sweep = Sweep(spec)
        t0 = time.monotonic()
        workers = sweep.run()[0]  # then the follow-up job
        deadline = time.monotonic() + 90
        while not any(r == "launch failed requeued held" for *_, r in _squeue(workers.job_id)):
            assert time.monotonic() < deadline, "no held task in 90 s\n" + _cluster_view(
                workers.job_id
            )
            time.sleep(1)
        # sacct may lag behind squeue by a few seconds (it still says RUNNING for the launch
        # that failed): what `sweep status` says within 30 s
        deadline = time.monotonic() + 30
        while "held by Slurm after a failed launch" not in (advice := "\n".join(sweep.diagnose())):
            seen = [(j.kind, j.tasks) for j in sweep.jobs()]
            assert time.monotonic() < deadline, (
                f"status never named the held task: {advice}\n{seen}"
            )
            time.sleep(1)
        print(f"{time.monotonic() - t0:.1f} s: status names the held task")
        assert "hpcdl sweep resume held" in advice, advice
        assert sweep.paths.finished_count() == 0
    finally:
        for f in asked:
            f.unlink(missing_ok=True)
        _return_drained_nodes()
    try:
        assert "Prolog" not in _cluster_view(workers.job_id).split("sinfo:")[1]  # nodes back
        message, _ = Sweep.load("held").resume_why()
        assert message.startswith("released 1 task(s)"), message
        print(f"{time.monotonic() - t0:.1f} s: {message}")
        assert not any(r == "launch failed requeued held" for *_, r in _squeue(workers.job_id))
        _finishes_with_every_trial_once(sweep, workers, 3)
        print(f"{time.monotonic() - t0:.1f} s: 3 trials finished")
    finally:
        sweep.cancel()  # the follow-up job, and anything left on failure


def test_one_trial_tasks_release_a_held_sibling_without_a_resume(devcluster, tmp_path, monkeypatch):
    """``trials_per_task: 1``: task 1's launch fails (the prolog fails only that task), Slurm
    holds it; the round's last tasks release it at their end, and the sweep ends with every
    trial recorded once and no ``sweep resume``."""
    if not FAIL_DIR.is_dir():
        pytest.fail(f"{FAIL_DIR} is missing: slurm/devcluster/devcluster.sh up", pytrace=False)
    monkeypatch.setenv("HPCDL_CHAOS_EPOCH_S", "1")  # the others still run when task 1 is held
    monkeypatch.setenv("HPCDL_SITE_PATH", f"{tmp_path / 'site'}:{REPO / 'hpcdl/sites'}")
    site = write_fault_site(tmp_path / "site")
    spec = chaos.toy_spec("heldsib", 6, trials=4, parallelism=2, trials_per_task=1, site=site,
                          partition="fault")  # fmt: skip
    asked = [FAIL_DIR / node for node in FAULT_NODES]
    for f in asked:
        f.write_text("1")  # wherever task 1 lands, its first launch fails
    sweep = Sweep(spec)
    try:
        try:
            array = sweep.run()[0]
            task1 = f"{array.job_id}_1"
            deadline = time.monotonic() + 90
            while (task1, "PENDING", "launch failed requeued held") not in _squeue(array.job_id):
                assert time.monotonic() < deadline, "task 1 not held in 90 s\n" + _cluster_view(
                    array.job_id
                )
                time.sleep(0.5)
        finally:
            for f in asked:
                f.unlink(missing_ok=True)
            _return_drained_nodes()
        _finishes_with_every_trial_once(sweep, array, 4)
    finally:
        sweep.cancel()
