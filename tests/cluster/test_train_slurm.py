"""Training jobs on the dev cluster: accuracy on 2 nodes x 2 tasks, real preemption by a
higher-tier partition's job (SIGTERM) and the time-limit signal, each resuming bit-exactly,
exhausted requeues, and the two benchmarks.

The training jobs are submitted together when the module starts and run side by side; waiting
on any of them drives all of them (:class:`Fleet`): once a run has logged enough steps it sends
it USR2 or submits the job that preempts it, and releases requeued jobs at once instead of after Slurm's ~2 minute
hold (its credential lifetime). The preemption runs use ``train_models:SlowMLP``, whose forward
sleeps, so they last long enough for the time-limit signal on any machine and leave the CPUs
free for the others.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import HPCDL, OPERATOR_SCONTROL, REPO, release_requeued, run_cli

sys.path.insert(0, str(Path(__file__).parents[1] / "helpers"))
from fault_site import FAULT_SITE, write_fault_site
from train_setup import (
    env_with_helpers,
    history,
    last_step,
    rows,
    same_weights,
    write_config,
    write_digits,
)

from hpcdl.hostlist import expand_hostlist
from hpcdl.scheduler import FINISHED, JobHandle, find_handle, log_tail

# preempt: the `high` job preempts a `low` run (tests/helpers/cluster_share.py)
pytestmark = [pytest.mark.slurm, pytest.mark.cluster_lock("preempt")]

SLOW = {  # ~660 steps of >= 60 ms: >= 45 s of training, whatever the machine
    "model": {"name": "train_models:SlowMLP", "delay_s": 0.06, "hidden": [64], "dropout": 0.1},
    "batch": {"size": 64, "micro": 32},
    "epochs": 30,
    "log__every_steps": 1,
    "checkpoint__every_steps": 100,
    "checkpoint__keep": 2,
    "job__nodes": 2,
    "job__tasks_per_node": 1,
}

# Slurm sends the time-limit signal up to 60 s before the time asked for: with a 2-minute limit
# and delay_s=20 it comes 40-100 s after the start. A slower forward (the same numbers as SLOW:
# the delay is a sleep) keeps the run going past 100 s alone, and the 20 s left after the signal
# are enough for a step and a checkpoint even when the start-up is slow on a loaded machine.
# The step after which the `high` job is submitted: seeded, past the periodic checkpoint of 100.
PREEMPT_AT = random.Random(7).randint(110, 190)
LIMIT = {**SLOW, "model": {**SLOW["model"], "delay_s": 0.15}, "job__time": 2}


@dataclass
class Run:
    handle: JobHandle
    run_dir: Path
    signal_at: int | None = None  # send USR2 to every task once this step is logged
    signalled: bool = False
    preempt_at: int | None = None  # submit a `high` job over its nodes once this step is logged


class Fleet:
    """The module's training jobs; waiting on one keeps driving all of them."""

    def __init__(self, site_path: str) -> None:
        self.runs: dict[str, Run] = {}
        self.preemptors: list[str] = []  # the `high` jobs
        self.site_path = site_path  # the module's profiles (a test's own job_root resets it)

    def submit(self, jobs: dict[str, tuple[Path, str, int | None]]) -> None:
        """``{name: (config, site, signal_at)}``, submitted by parallel ``hpcdl train`` calls;
        a run in the `low` partition is preempted at ``signal_at`` instead of signalled."""
        env = {**os.environ, **env_with_helpers(), "HPCDL_SITE_PATH": self.site_path}
        procs = {
            name: subprocess.Popen([HPCDL, "train", str(config), "--site", site], env=env,
                                   text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for name, (config, site, _) in jobs.items()
        }  # fmt: skip
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, out + err
            run_dir = Path(re.search(r"run folder: (\S+)", out)[1])
            job_id = re.search(r"submitted job (\d+)", out)[1]
            at, low = jobs[name][2], "partition: low" in jobs[name][0].read_text()
            handle = find_handle(job_id)
            self.runs[name] = Run(
                handle, run_dir, None if low else at, preempt_at=at if low else None
            )

    def _drive(self) -> None:
        for run in self.runs.values():
            due = run.signal_at is not None and last_step(run.run_dir) >= run.signal_at
            if due and not run.signalled:
                # to every task of the job's steps (not the batch shell, which would die)
                subprocess.run(["scancel", "--signal=USR2", run.handle.job_id], check=True)
                run.signalled = True
            due = run.preempt_at is not None and last_step(run.run_dir) >= run.preempt_at
            if due and not run.signalled:
                self._preempt(run)
                run.signalled = True
        ids = ",".join(r.handle.job_id for r in self.runs.values())
        out = subprocess.run(["squeue", "-h", "-o", "%i %r", "-j", ids], capture_output=True,
                             text=True, timeout=30).stdout  # fmt: skip
        for line in out.splitlines():
            job_id, reason = line.split(maxsplit=1)
            if reason.strip() == "BeginTime":  # requeued: start it soon, with room to finish
                release_requeued(job_id, "TimeLimit=10")

    def _preempt(self, run: Run) -> None:
        """A `high` job that needs memory the `low` run holds on its nodes: Slurm preempts the
        run (SIGTERM to its steps, GraceTime, SIGKILL, requeue) to start it."""
        nodes = subprocess.run(["squeue", "-h", "-o", "%N", "-j", run.handle.job_id],
                               capture_output=True, text=True, timeout=30).stdout.strip()  # fmt: skip
        proc = subprocess.run(["sbatch", "--parsable", "-p", "high", "-N", "2", "-w", nodes,
                               "--mem=2000M", "-t", "1", "-o", "/dev/null", "--wrap", "sleep 3"],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert proc.returncode == 0 and nodes, proc.stderr
        self.preemptors.append(proc.stdout.strip())

    def wait(self, name: str, timeout: float = 420) -> Run:
        run = self.runs[name]
        deadline = time.monotonic() + timeout
        while True:
            self._drive()
            if run.handle.state() in FINISHED:
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} still {run.handle.state()}\n{log_tail(run.handle)}")
            time.sleep(1)


@pytest.fixture(scope="module")
def fleet(devcluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("train-slurm")
    digits = write_digits(root / "digits")
    site_dir = root / "site"
    site_dir.mkdir()
    profile = yaml.safe_load((REPO / "hpcdl/sites/devcluster.yaml").read_text())
    profile.update(name="devcluster-preempt", preemption={"signal": "USR2", "delay_s": 20})
    (site_dir / "devcluster-preempt.yaml").write_text(yaml.safe_dump(profile))
    write_fault_site(site_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HPCDL_JOB_ROOT", str(root / "jobs"))
        mp.setenv("HPCDL_SITE_PATH", f"{site_dir}:{REPO / 'hpcdl/sites'}")
        f = Fleet(os.environ["HPCDL_SITE_PATH"])

        def config(name: str, **changes: object) -> Path:
            return write_config(root / f"{name}.yaml", digits, root / "runs", name=name, **changes)

        f.config = config  # type: ignore[attr-defined]  # for the tests that run after the fleet

        f.submit(
            {
                "accuracy": (
                    config("accuracy", job__nodes=2, job__tasks_per_node=2),
                    "devcluster",
                    None,
                ),
                "reference": (config("reference", **SLOW), "devcluster", None),
                "preempt": (  # holds 3 of a node's 4 GB: a `high` job can start only by preemption
                    config("preempt", **SLOW, job__partition="low", job__mem="3000M"),
                    "devcluster",
                    PREEMPT_AT,
                ),
                "limit": (config("limit", **LIMIT), "devcluster-preempt", None),
                "exhausted": (config("exhausted", **SLOW, job__max_requeues=0), "devcluster", 10),
            }
        )
        yield f
        for run in f.runs.values():
            if run.handle.state() not in FINISHED:
                run.handle.cancel()


def _result(run: Run) -> dict:
    assert run.handle.state() == "COMPLETED", log_tail(run.handle)
    return json.loads((run.run_dir / "result.json").read_text())


def _events(run: Run, kind: str) -> list[dict]:
    return [r for r in rows(run.run_dir, "event") if r["event"] == kind]


def test_two_nodes_two_tasks_zero2_reach_093_on_digits(fleet):
    run = fleet.wait("accuracy")
    result = _result(run)
    assert result["world_size"] == 4 and result["val_acc"] >= 0.93, result
    start = _events(run, "start")[0]
    assert start["world_size"] == 4 and start["accumulation"] == 1  # 64 = 16 x 4 ranks
    assert len(rows(run.run_dir, "epoch")) == 20
    assert (run.run_dir / "config.yaml").is_file() and (run.run_dir / "model.pt").is_file()
    assert list(run.run_dir.glob("wandb/offline-run-*/run-*.wandb"))  # offline, as the site says


def _assert_resumed_exactly(run: Run, reference: Run) -> list[dict]:
    result, ref = _result(run), _result(reference)
    assert result["restarts"] >= 1 and ref["restarts"] == 0
    preempted, resumed = _events(run, "preempted"), _events(run, "resume")
    assert preempted and [r["step"] for r in resumed] == [r["step"] for r in preempted]
    assert resumed[0]["restarts"] == 1 and resumed[0]["checkpoint"] == preempted[0]["tag"]
    assert history(run.run_dir) == history(reference.run_dir)  # every loss, lr, val metric
    assert len(history(run.run_dir)["step"]) == result["step"] == 660  # each step logged once
    assert same_weights(run.run_dir, reference.run_dir)
    return preempted


def test_preemption_by_a_higher_tier_job_checkpoints_on_sigterm_and_resumes_bit_exactly(fleet):
    """Real preemption: a `high` partition job takes the `low` run's nodes; Slurm sends SIGTERM
    to the steps and gives them GraceTime (20 s); every rank checkpoints at the next step, after
    the last periodic checkpoint, the run requeues itself and finishes as if never stopped."""
    run, reference = fleet.wait("preempt"), fleet.wait("reference")
    preempted = _assert_resumed_exactly(run, reference)
    assert len(preempted) == 1 and preempted[0]["signal"] == "SIGTERM", preempted
    assert preempted[0]["step"] >= PREEMPT_AT
    periodic = [r["step"] for r in _events(run, "checkpoint") if r["step"] < preempted[0]["step"]]
    assert periodic and preempted[0]["step"] > max(periodic), (periodic, preempted)
    assert not _events(run, "grace_too_short")
    site = json.loads((run.run_dir / "site.json").read_text())
    assert site["preemption"]["grace_time_s"] == 20  # the partition's GraceTime, not the site's
    assert fleet.preemptors and all(_state(j) == "COMPLETED" for j in fleet.preemptors)


def _state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id],
                         capture_output=True, text=True, timeout=30).stdout.split()  # fmt: skip
    return out[0] if out else "?"


def test_time_limit_preemption_requeues_and_resumes_bit_exactly(fleet):
    """A 2-minute job, USR2 20 s before its limit (Slurm sends it 20-80 s before): the signal
    comes from Slurm itself, mid-run, and the requeued job finishes as if never stopped."""
    run, reference = fleet.wait("limit"), fleet.wait("reference")
    preempted = _assert_resumed_exactly(run, reference)
    start = _events(run, "start")[0]
    assert preempted[0]["time"] - start["time"] < 120  # before the 2-minute limit
    assert 0 < preempted[0]["step"] < 660


def test_exhausted_requeues_end_failed_with_a_clear_message(fleet):
    run = fleet.wait("exhausted")
    assert run.handle.state() == "FAILED"
    preempted = _events(run, "preempted")
    assert len(preempted) == 1 and not _events(run, "resume")
    tag = preempted[0]["tag"]
    err = run.handle.log_paths()[1].read_text()
    assert (
        f"preempted at step {preempted[0]['step']} after 0 requeue(s), job.max_requeues=0 "
        f"exhausted: not requeued; resubmit with run_dir={run.run_dir} to continue from "
        f"checkpoint {tag}"
    ) in err
    assert (run.run_dir / "checkpoints/latest").read_text() == tag


def test_bench_comm_job_on_two_nodes(devcluster, tmp_path):
    out = tmp_path / "comm"
    proc = run_cli("bench", "comm", "--site", devcluster, "--nodes", "2", "--tasks-per-node", "1",
                   "--max-size", "1MiB", "--budget", "0.05", "--out", str(out), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads((out / "bench_comm.json").read_text())
    assert r["world_size"] == 2 and r["nodes"] == 2 and r["backend"] == "gloo"
    assert [row["bytes"] for row in r["rows"]] == [1024 * 4**i for i in range(6)]
    assert all(row["hpcdl_busbw_gbs"] > 0 and row["torch_busbw_gbs"] > 0 for row in r["rows"])
    assert "1 MiB" in proc.stdout and "busbw" in proc.stdout


def test_bench_train_job_side_by_side(devcluster, tmp_path):
    digits = write_digits(tmp_path / "digits")
    config = write_config(tmp_path / "bench.yaml", digits, tmp_path / "runs")
    out = tmp_path / "bench"
    proc = run_cli("bench", "train", str(config), "--site", devcluster, "--steps", "20",
                   "--rounds", "1", "--out", str(out), "job.nodes=2", "job.tasks_per_node=1",
                   env={"OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads((out / "bench_train.json").read_text())
    assert r["world_size"] == 2 and r["zero_stage"] == 2 and r["steps"] == 20
    assert r["ratio"] > 0 and len(r["plain_step_s"]) == len(r["hpcdl_step_s"]) == 1
    assert "throughput ratio hpcdl / hand-written" in proc.stdout


def _nodes_of(job_id: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%N", "-j", job_id], capture_output=True,
                         text=True, timeout=30).stdout.strip()  # fmt: skip
    return expand_hostlist(out) if out else []


@pytest.mark.cluster_lock("fault")  # a DOWN node ends every job on it: the fault partition's
def test_node_down_mid_run_requeues_and_resumes_to_the_same_weights(fleet):
    """One node of a 2-node run set DOWN, as a failing node is: Slurm ends the job (NODE_FAIL)
    and requeues it; the run resumes from its newest periodic checkpoint and ends with the
    uninterrupted run's weights and history. In the hidden `fault` partition, whose nodes only
    fault-injection tests use (tests/helpers/fault_site.py): the other tests run on meanwhile."""
    config = fleet.config("nodedown", **SLOW, job__partition="fault")
    fleet.submit({"nodedown": (config, FAULT_SITE, None)})
    run = fleet.runs["nodedown"]
    deadline = time.monotonic() + 240
    while last_step(run.run_dir) < 130:  # past the periodic checkpoint of step 100
        alive = run.handle.state() not in FINISHED
        assert time.monotonic() < deadline and alive, log_tail(run.handle)
        time.sleep(0.5)
    node = _nodes_of(run.handle.job_id)[-1]
    scontrol = [*OPERATOR_SCONTROL, "update", f"NodeName={node}"]  # admin only: maybe via sudo
    subprocess.run([*scontrol, "State=DOWN", "Reason=hpcdl-test-node-loss"], check=True, timeout=30)
    try:
        # The dev cluster returns a DOWN node to service as soon as its slurmd answers
        # (ReturnToService=2); drained, it stays out as a failed node would, and the job
        # (held in BeginTime until the fleet releases it) comes back on other nodes.
        subprocess.run([*scontrol, "State=DRAIN", "Reason=hpcdl-test-node-loss"], check=True,
                       timeout=30)  # fmt: skip
        while not (run.run_dir / "result.json").is_file():  # requeued, released, resumed, done
            fleet._drive()
            assert time.monotonic() < deadline + 240, log_tail(run.handle)
            time.sleep(1)
    finally:
        subprocess.run([*scontrol, "State=RESUME"], timeout=30)
    state = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True,
                           text=True, timeout=30).stdout  # fmt: skip
    assert "drain" not in state and "down" not in state, state  # the cluster is whole again
    result = _result(fleet.wait("nodedown"))
    assert result["restarts"] >= 1
    last = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "NodeList", "-j", run.handle.job_id],
                          capture_output=True, text=True, timeout=30).stdout.split()[-1]  # fmt: skip
    assert node not in expand_hostlist(last), last  # it came back on other nodes
    resumed = _events(run, "resume")
    # the newest valid checkpoint: step 100, or a later one if the ranks on the live node
    # checkpointed on Slurm's SIGTERM (a save cut by SIGKILL has no manifest and is skipped)
    assert resumed and resumed[0]["step"] >= 100, resumed
    reference = fleet.wait("reference")
    assert history(run.run_dir) == history(reference.run_dir)
    assert same_weights(run.run_dir, reference.run_dir)
