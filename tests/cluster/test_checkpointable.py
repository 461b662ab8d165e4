"""Checkpointable callables (submitit's ``checkpoint()`` protocol) on every way a job is stopped
early: preemption by Slurm (SIGTERM, ``GraceTime``, SIGKILL, requeue) and the time limit
(USR2 ``delay_s`` before it). The USR2 preemption case is in ``test_snapshot.py``.

Without a cluster, the preemption handler runs in submitit's own runner (``python -m
submitit.core._submit``) under a Slurm environment played by variables, signalled by the test.
On the dev cluster, a Counter in the preemptable ``low`` partition is preempted by a ``high`` job
that needs its node's memory, and another reaches a 2-minute time limit; the two run side by
side, and the test releases each requeued job at once (Slurm holds it ~2 minutes otherwise).
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import REPO, release_requeued
from submitit.core.utils import DelayedSubmission

from hpcdl import Job, load_site
from hpcdl.preemption import PreemptCheckpoint
from hpcdl.scheduler import FINISHED, JobHandle, log_tail
from hpcdl.scheduler.checkpointable import KILL_MARGIN_S, TIMEOUT_REQUEUES, bind_checkpoint
from hpcdl.task_runner import Task
from tests.helpers.checkpointable import Counter, NoResume, plain

# preempt: the `high` job preempts a `low` job (tests/helpers/cluster_share.py)
pytestmark = pytest.mark.cluster_lock("preempt")


def rows(path: Path) -> list[dict]:
    text = path.read_text() if path.exists() else ""
    return [json.loads(ln) for ln in text.splitlines()]


def steps(got: list[dict], run: int) -> list[int]:
    return [r["step"] for r in got if r["event"] == "step" and r["run"] == run]


# -- which tasks get the handler ---------------------------------------------------------------
def test_only_checkpointable_callables_in_requeueing_partitions_checkpoint_on_preemption(
    tmp_path,
):
    site = load_site("devcluster")  # low: PreemptMode=REQUEUE, GraceTime 20 s; cpu: never
    counter = Counter(str(tmp_path / "c"), 3, 0)
    task = Job(site="devcluster", function=counter, partition="low").task(site)
    assert task.preempt == PreemptCheckpoint(("TERM",), 20 + KILL_MARGIN_S, bind_checkpoint)
    assert Job(site="devcluster", function=counter).task(site).preempt is None  # cpu
    plain_job = Job(site="devcluster", function=plain, args=("x",), partition="low")
    assert plain_job.task(site).preempt is None  # nothing to checkpoint: submitit's handling
    assert Job(site="devcluster", command=["true"], partition="low").task(site).preempt is None
    # no GraceTime of its own: the site-wide one
    data = yaml.safe_load((REPO / "hpcdl/sites/devcluster.yaml").read_text())
    for part in data["partitions"]:
        part.pop("grace_time_s", None)
    data["preemption"]["preempt_signals"] = ["TERM", "HUP"]
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({**data, "name": "g"}))
    other = load_site(str(tmp_path / "g.yaml"))
    task = Job(site=str(tmp_path / "g.yaml"), function=counter, partition="low").task(other)
    assert task.preempt == PreemptCheckpoint(("TERM", "HUP"), 30 + KILL_MARGIN_S, bind_checkpoint)


# -- the handler in submitit's runner, without a cluster ---------------------------------------
def _start(folder: Path, function: object, rank: int, wait_s: float) -> subprocess.Popen:
    """submitit's runner on job 4242's pickle, as global rank ``rank`` of a 2-task Slurm job."""
    folder.mkdir()
    delayed = DelayedSubmission(
        Task(function=function, preempt=PreemptCheckpoint(("TERM",), wait_s, bind_checkpoint))
    )
    delayed.set_timeout(30, TIMEOUT_REQUEUES)
    delayed.dump(folder / "4242_submitted.pkl")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env.update(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_PROCID=str(rank),
               SLURM_LOCALID=str(rank), SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1")  # fmt: skip
    with open(folder / "err", "w") as err:
        return subprocess.Popen([sys.executable, "-u", "-m", "submitit.core._submit", str(folder)],
                                env=env, stdout=err, stderr=subprocess.STDOUT)  # fmt: skip


def _signal_after(proc: subprocess.Popen, out: Path, count: int) -> None:
    deadline = time.monotonic() + 30
    while len(steps(rows(out), 0)) < count:
        assert proc.poll() is None and time.monotonic() < deadline, rows(out)
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)


def test_sigterm_checkpoints_on_rank_0_and_every_rank_stops_until_sigkill(tmp_path):
    """Rank 0 writes the checkpoint into the job's pickle, rank 1 leaves it; both stop stepping
    for ``wait_s``, and since no SIGKILL came (no real preemption) both carry on and finish."""
    procs, outs = {}, {}
    for rank in (0, 1):
        outs[rank] = tmp_path / f"progress{rank}.jsonl"
        procs[rank] = _start(tmp_path / f"r{rank}", Counter(str(outs[rank]), 30, 0.05), rank, 1.5)
    for rank in (0, 1):
        _signal_after(procs[rank], outs[rank], 5)
    for rank, proc in procs.items():
        assert proc.wait(timeout=60) == 0, (tmp_path / f"r{rank}/err").read_text()
    saved = DelayedSubmission.load(tmp_path / "r0/4242_submitted.pkl")
    resumed = saved.function.function
    assert isinstance(saved.function, Task) and saved.function.preempt is not None
    assert (saved._timeout_min, saved._timeout_countdown) == (30, TIMEOUT_REQUEUES)
    for rank, log in ((0, "checkpoint saved in"), (1, "rank 1 stops; rank 0 checkpoints")):
        got, err = rows(outs[rank]), (tmp_path / f"r{rank}/err").read_text()
        assert log in err and "not a preemption, carrying on" in err, err
        assert steps(got, 0) == list(range(1, 31)) and got[-1]["event"] == "end"
        times = [r["t"] for r in got if r["event"] == "step"]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        stop = gaps.index(max(gaps)) + 1  # the steps done before every rank stopped
        assert max(gaps) >= 1.5 and 5 <= stop < 30, gaps
        if rank == 0:  # the state at the signal: the steps written before the checkpoint's line
            k = next(i for i, r in enumerate(got) if r["event"] == "checkpoint") - 1
            assert resumed.done == k and steps(got[: k + 2], 0) == list(range(1, k + 1)), got
            # a step stamped just before the handler ran is written after it
            assert stop in (k, k + 1), (stop, k)
    assert DelayedSubmission.load(tmp_path / "r1/4242_submitted.pkl").function.function.done == 0
    # what the requeued job would run: from the state at the signal
    resumed.out, resumed.delay_s = str(tmp_path / "resumed.jsonl"), 0.0
    assert saved.result() == 30
    assert rows(tmp_path / "resumed.jsonl")[0] == {"event": "start", "run": 0, "done": k}
    assert steps(rows(tmp_path / "resumed.jsonl"), 0) == list(range(k + 1, 31))


def test_a_checkpoint_returning_none_ends_the_job_at_the_signal(tmp_path):
    out = tmp_path / "progress.jsonl"
    proc = _start(tmp_path / "r0", NoResume(str(out), 200, 0.05), 0, 60)
    _signal_after(proc, out, 3)
    assert proc.wait(timeout=30) != 0  # at once, not after wait_s
    with open(tmp_path / "r0/4242_0_result.pkl", "rb") as f:
        outcome, trace = pickle.load(f)  # submitit's result: the job failed, with this reason
    assert outcome == "error" and "not resumable: checkpoint function returned None" in trace
    assert rows(out)[-1]["event"] == "step"  # stopped mid-count


# -- on the dev cluster --------------------------------------------------------------------------
def _squeue(job_id: str, fmt: str) -> str:
    return subprocess.run(["squeue", "-h", "-o", fmt, "-j", job_id], capture_output=True,
                          text=True, timeout=30).stdout.strip()  # fmt: skip


class Pair:
    """The two cluster jobs, driven together: the `low` one is preempted once it has counted 5
    steps, and a requeued job waiting for its BeginTime is released at once."""

    def __init__(self, handles: dict[str, JobHandle], outs: dict[str, Path]) -> None:
        self.handles, self.outs = handles, outs
        self.preemptor: str | None = None

    def _drive(self) -> None:
        low = self.handles["preempt"]
        if self.preemptor is None and len(steps(rows(self.outs["preempt"]), 0)) >= 5:
            # needs 2 of the node's 4 GB while the Counter holds 3: Slurm preempts the Counter
            node = _squeue(low.job_id, "%N")
            proc = subprocess.run(["sbatch", "--parsable", "-p", "high", "-w", node, "-t", "1",
                                   "--mem=2000M", "-o", "/dev/null", "--wrap", "sleep 3"],
                                  capture_output=True, text=True, timeout=30)  # fmt: skip
            assert proc.returncode == 0 and node, proc.stderr
            self.preemptor = proc.stdout.strip()
        for handle in self.handles.values():
            release_requeued(handle.job_id)  # requeued: start it in 3 s, not in 2 minutes

    def wait(self, name: str, timeout: float) -> JobHandle:
        handle, deadline = self.handles[name], time.monotonic() + timeout
        while (state := handle.state()) not in FINISHED:
            assert time.monotonic() < deadline, (
                f"{state} {rows(self.outs[name])}\n{log_tail(handle)}"
            )
            self._drive()
            time.sleep(0.5)
        assert state == "COMPLETED", f"{state} {rows(self.outs[name])}\n{log_tail(handle)}"
        return handle


@pytest.fixture(scope="module")
def pair(devcluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("checkpointable")
    outs = {"preempt": root / "preempt.jsonl", "limit": root / "limit.jsonl"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HPCDL_JOB_ROOT", str(root / "jobs"))
        mp.setenv("HPCDL_SITE_PATH", str(REPO / "hpcdl/sites"))
        path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        mp.setenv("PYTHONPATH", os.pathsep.join(path))  # the jobs import tests.helpers
        # 200 steps of 0.2 s: still counting when the `high` job comes; then 0.02 s after it
        preempt = Counter(str(outs["preempt"]), 200, 0.2, requeued_delay_s=0.02)
        # A 2-minute limit and the site's delay_s=60: USR2 comes 30-90 s after the start (Slurm
        # checks limits every 30 s, so it may come early or late by that much), while 120 s of
        # steps still run (80 s were not enough once); the requeued run needs 6 s at most.
        limit = Counter(str(outs["limit"]), 600, 0.2, requeued_delay_s=0.01)
        handles = {
            "preempt": Job(site=devcluster, name="ckpt-preempt", function=preempt,
                           partition="low", mem="3000M", time="00:10:00").submit(),
            "limit": Job(site=devcluster, name="ckpt-limit", function=limit,
                         time="00:02:00").submit(),
        }  # fmt: skip
        p = Pair(handles, outs)
        yield p
        for handle in handles.values():
            if handle.state() not in FINISHED:
                handle.cancel()


def _resumed_exactly(got: list[dict], total: int) -> int:
    """Run 0 counted 1..k and stopped; run 1 started at done=k and counted k+1..total: no step
    repeated or lost. Returns k."""
    starts = [r for r in got if r["event"] == "start"]
    assert [s["run"] for s in starts] == [0, 1] and starts[0]["done"] == 0, got  # one requeue
    first, second, k = steps(got, 0), steps(got, 1), starts[1]["done"]
    assert k >= 5, got  # resumed, not started over
    assert first == list(range(1, k + 1)) and second == list(range(k + 1, total + 1)), got
    assert got[-1] == {"event": "end", "run": 1, "done": total}
    return k


@pytest.mark.slurm
def test_a_checkpointable_callable_preempted_by_a_high_job_resumes_from_its_checkpoint(pair):
    handle = pair.wait("preempt", timeout=300)  # queue waits on a busy cluster included
    _resumed_exactly(rows(pair.outs["preempt"]), 200)
    states = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", handle.job_id],
                            capture_output=True, text=True, timeout=30).stdout.split()  # fmt: skip
    assert states[0] == "PREEMPTED" and states[-1] == "COMPLETED", states  # Slurm's requeue
    err = handle.log_paths()[1].read_text()
    assert "preempted by SIGTERM: checkpoint saved in" in err, err


@pytest.mark.slurm
def test_a_checkpointable_callable_at_its_time_limit_is_requeued_and_resumes(pair):
    handle = pair.wait("limit", timeout=300)
    k = _resumed_exactly(rows(pair.outs["limit"]), 600)
    assert k < 600
    saved = DelayedSubmission.load(Path(handle.folder) / f"{handle.job_id}_submitted.pkl")
    assert saved._timeout_countdown == TIMEOUT_REQUEUES - 1  # one time-limit requeue used
