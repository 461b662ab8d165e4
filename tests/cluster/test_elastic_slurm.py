"""Elastic start on the dev cluster: a training job asks for ``job.nodes: 2-4`` and starts on
what is free; requeued, it comes back on another node count and resumes exactly.

One job, three starts: on 2 nodes (a `high` job holds the other two), requeued by its own
trainer on the time-limit signal (USR2) once those two are free, back on 4 (pinned with
``scontrol update NumNodes=4-4`` while it is pending: other sessions share the dev cluster);
preempted by a `high` job over two of its nodes, given its range back, back on the 2 left. Its loaders record every sample id they
hand out: each epoch's samples are those of the epoch's uninterrupted plan, each exactly once.

About 1.5-2 minutes (three starts of a DeepSpeed job): behind ``-m scale``, not in
``make test``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import HPCDL

sys.path.insert(0, str(Path(__file__).parents[1] / "helpers"))
from train_setup import env_with_helpers, last_step, rows, write_config, write_digits

from hpcdl.data.reader import RECORD_ENV, ShardedDataset, ShardLoader
from hpcdl.scheduler import FINISHED, JobHandle, find_handle, log_tail

# preempt: the `high` job preempts a `low` run (tests/helpers/cluster_share.py)
# The skip is decided before any fixture: in `make test` it waited 44 s for the preempt lock
# (run 20) only to skip.
_NOT_SCALE = "'scale' not in (config.getoption('markexpr') or '') or 'not scale' in config.getoption('markexpr')"
pytestmark = [pytest.mark.slurm, pytest.mark.scale, pytest.mark.cluster_lock("preempt"),
              pytest.mark.skipif(_NOT_SCALE, reason="the elastic start runs only with -m scale (~2 min)")]  # fmt: skip

# (seed 0, block_units 16: configs/train_digits.yaml) batch 84 splits into whole micro-batches
# of 7 on 2, 3 and 4 ranks, and an epoch is 17 whole steps on each: no step spans two epochs,
# so no epoch is cut short by the run's last step (an epoch's plan is then every sample of it)
MICRO, BATCH, EPOCHS, STEPS = 7, 84, 5, 17
SLOW = {"name": "train_models:SlowMLP", "delay_s": 0.05, "hidden": [32], "dropout": 0.1}


@pytest.fixture
def scale_selected(request: pytest.FixtureRequest) -> None:
    expr = request.config.getoption("markexpr") or ""
    if "scale" not in expr or "not scale" in expr:
        pytest.skip("the elastic start runs only with -m scale (~2 min)")


def _sbatch_high(nodes: str) -> str:
    """A `high` job that holds 2 GB on each of ``nodes``: a `low` job asking 3 GB per node
    cannot share them (and is preempted where it runs)."""
    proc = subprocess.run(["sbatch", "--parsable", "-p", "high", "-N", "2", "-w", nodes,
                           "--mem=2000M", "-t", "10", "-o", "/dev/null", "--wrap", "sleep 600"],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _squeue(job_id: str, fmt: str) -> str:
    return subprocess.run(["squeue", "-h", "-o", fmt, "-j", job_id], capture_output=True,
                          text=True, timeout=30).stdout.strip()  # fmt: skip


# After the first requeue the test pins the count to 4 (the dev cluster is shared: another
# session's job on node3 or node4 would let Slurm start it on 3); after the second it gives
# the range back, and Slurm picks 2 because the `high` job holds the other two. NumTasks too:
# the pin set it to 4, which alone keeps asking for 4 nodes of one task each.
NODES_AT_RESTART = {"1": ["NumNodes=4-4"], "2": ["NumNodes=2-4", "NumTasks=2"]}


def _release(job_id: str, released: set[str]) -> None:
    """Start a requeued job in 3 s instead of after Slurm's ~2 minute hold, once per restart.
    (conftest's release_requeued moves the start again while squeue shows it as N/A, in the
    second before the job starts: polled this often, the job never started.)"""
    if _squeue(job_id, "%r") != "BeginTime":
        return
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                           timeout=30).stdout  # fmt: skip
    restarts = re.search(r"Restarts=(\d+)", shown)
    key = restarts[1] if restarts else ""
    if key not in released:
        nodes = NODES_AT_RESTART.get(key, [])
        proc = subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+3", *nodes],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert proc.returncode == 0 or "no longer pending" in proc.stderr, proc.stderr
        released.add(key)


def _until(
    what: str, ok: Callable[[], bool], job: JobHandle | None, released: set[str], timeout=240.0
) -> None:
    """Poll ``ok`` (releasing the job after a requeue) until it holds; past ``timeout`` fail
    with the job's state and log."""
    deadline = time.monotonic() + timeout
    while not ok():
        if job is not None:
            _release(job.job_id, released)
            assert job.state() not in FINISHED, f"{what}: job {job.state()}\n{log_tail(job)}"
        if time.monotonic() > deadline:
            tail = log_tail(job) if job is not None else ""
            raise AssertionError(f"{what}: not within {timeout} s\n{tail}")
        time.sleep(0.3)


def _events(run_dir: Path, kind: str) -> list[dict]:
    try:
        return [r for r in rows(run_dir, "event") if r["event"] == kind]
    except FileNotFoundError:
        return []


def _recorded(folder: Path) -> dict[int, list[dict]]:
    """The loaders' records by epoch, each row ``{epoch, world_size, ids, ...}``."""
    out: dict[int, list[dict]] = {}
    for path in folder.glob("train-rank*.jsonl"):
        for row in map(json.loads, path.read_text().splitlines()):
            out.setdefault(row["epoch"], []).append(row)
    return out


def _uninterrupted(train: Path, epoch: int, world: int, out: Path) -> list[int]:
    """The sample ids an epoch hands out on ``world`` ranks, never interrupted (its loaders
    run here, recording as the job's do)."""
    os.environ[RECORD_ENV] = str(out)
    try:
        for rank in range(world):
            loader = ShardLoader(ShardedDataset(train, MICRO, rank=rank, world_size=world,
                                                seed=0, block_units=16))  # fmt: skip
            loader.set_epoch(epoch)
            for _ in loader:
                pass
    finally:
        del os.environ[RECORD_ENV]
    return sorted(i for r in _recorded(out).get(epoch, []) for i in r["ids"])


def test_starts_on_what_is_free_and_resumes_exactly_on_4_then_2_nodes(
    devcluster, scale_selected, tmp_path
):
    digits = write_digits(tmp_path / "digits")
    ids = tmp_path / "ids"
    config = write_config(tmp_path / "elastic.yaml", digits, tmp_path / "runs", name="elastic",
                          model=SLOW, batch={"size": BATCH, "micro": MICRO}, epochs=EPOCHS,
                          log__every_steps=1, checkpoint__every_steps=0,
                          job__partition="low", job__nodes="2-4", job__tasks_per_node=1,
                          job__mem="3000M", job__time=10, job__time_min=5,
                          job__env={RECORD_ENV: str(ids)})  # fmt: skip
    held: list[str] = [_sbatch_high("node3,node4")]  # only node1 and node2 are free
    job: JobHandle | None = None
    released: set[str] = set()  # the restarts already released
    try:
        _until("the high job on node3,node4 runs", lambda: _squeue(held[0], "%T") == "RUNNING",
               None, set(), timeout=120)  # fmt: skip
        proc = subprocess.run([HPCDL, "train", str(config), "--site", "devcluster"],
                              env={**os.environ, **env_with_helpers()}, text=True,
                              capture_output=True, timeout=180)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "(2-4 node(s) x 1 task(s)" in proc.stdout, proc.stdout
        run_dir = Path(re.search(r"run folder: (\S+)", proc.stdout)[1])
        job = find_handle(re.search(r"submitted job (\d+)", proc.stdout)[1])
        shown = subprocess.run(["scontrol", "show", "job", job.job_id], capture_output=True,
                               text=True, timeout=30).stdout  # fmt: skip
        assert "TimeMin=00:05:00" in shown, shown

        # 1. on the 2 free nodes; then requeued by its trainer (USR2) after the others freed
        _until("the start", lambda: bool(_events(run_dir, "start")), job, released)
        assert _events(run_dir, "start")[0]["world_size"] == 2
        _until("step 22", lambda: last_step(run_dir) >= STEPS + 5, job, released)
        blocker = held.pop()
        subprocess.run(["scancel", blocker], check=True, timeout=30)
        # gone, not COMPLETING: a job released while the nodes still complete starts on 2
        _until("the high job gone", lambda: not _squeue(blocker, "%T"), job, released, 60)
        subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, timeout=30)

        # 2. back on all 4; then a high job over two of them preempts it
        _until("the resume on 4 nodes", lambda: len(_events(run_dir, "resume")) == 1, job, released)
        resumed = _events(run_dir, "resume")[0]
        assert resumed["world_size"] == 4, resumed
        _until(
            "4 steps on 4 nodes", lambda: last_step(run_dir) >= resumed["step"] + 4, job, released
        )
        held.append(_sbatch_high("node3,node4"))

        # 3. back on the 2 the high job left, to the end
        _until("the resume on 2 nodes", lambda: len(_events(run_dir, "resume")) == 2, job, released)
        subprocess.run(["scancel", held.pop()], check=True, timeout=30)
        _until("the end", lambda: job.state() in FINISHED, None, released, timeout=240)
    finally:
        for job_id in held:
            subprocess.run(["scancel", job_id], timeout=30, check=False)
        if job is not None and job.state() not in FINISHED:
            job.cancel()
    assert job.state() == "COMPLETED", log_tail(job)
    stops, resumes = _events(run_dir, "preempted"), _events(run_dir, "resume")
    assert [s["signal"] for s in stops] == ["SIGUSR2", "SIGTERM"], stops
    assert [(r["world_size"], r["checkpoint_world_size"], r["restarts"]) for r in resumes] == [
        (4, 2, 1), (2, 4, 2)], resumes  # fmt: skip
    assert [r["step"] for r in resumes] == [s["step"] for s in stops]  # at the checkpoint's step
    assert [r["checkpoint"] for r in resumes] == [s["tag"] for s in stops]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["epochs"] == EPOCHS and result["step"] == EPOCHS * STEPS, result
    assert result["world_size"] == 2, result
    assert {r["total_steps"] for r in resumes} == {EPOCHS * STEPS}, resumes
    # every epoch: the samples of its uninterrupted plan (on the world size it started on), once
    recorded, starts = _recorded(ids), {}
    for row in map(json.loads, (ids / "train-rank000.jsonl").read_text().splitlines()):
        starts.setdefault(row["epoch"], row["world_size"])  # rank 0 appends in time order
    assert sorted(recorded) == list(range(EPOCHS)), sorted(recorded)
    for epoch, got in sorted(recorded.items()):
        first = starts[epoch]
        seen = sorted(i for r in got for i in r["ids"])
        expected = _uninterrupted(digits / "train", epoch, first, tmp_path / f"e{epoch}")
        worlds = sorted({r["world_size"] for r in got})
        print(f"epoch {epoch}: {len(seen)} samples on world sizes {worlds}")
        assert seen == expected, (epoch, worlds, len(seen), len(expected))
