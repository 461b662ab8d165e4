"""What a warm worker costs per trial at 10,000 trials (issue 21): it reads only the slot files
that can still be claimed, keeps one journal storage for all its trials, and times its storage
writes only when asked (``HPCDL_TIME_STORAGE``); the bench's percentiles and invariants."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from hpcdl.hpo import bench_scale, store_timing
from hpcdl.hpo import storage as storage_mod
from hpcdl.hpo import trial as trial_mod
from hpcdl.hpo.folder import Slot, SweepPaths
from hpcdl.hpo.spec import SweepSpec
from hpcdl.hpo.study import open_study
from hpcdl.hpo.worker import read_journals, work


@pytest.fixture(autouse=True)
def _local_task(monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", store_timing.ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "77")


def _spec(trials: int) -> SweepSpec:
    return SweepSpec.model_validate({"name": "lean", "objective": "hpcdl.hpo.bench_scale:cheap",
                                     "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
                                     "sampler": {"name": "random"}, "trials": trials,
                                     "final": False})  # fmt: skip


def _slot(i: int, state: str | None, job: str | None = None) -> Slot | None:
    if state is None:
        return None
    return Slot(slot=i, trial=i, params={"x": 0.5}, run_id=f"r{i}", state=state, job=job)  # type: ignore[arg-type]


# (the slots' states and jobs, the slot a worker of task "77" claims). Only a Slurm task id
# survives a requeue, so locally "mine" never applies; the table checks the reads' decision.
CASES = [
    ([("complete", None), ("running", "1"), (None, None), (None, None)], 2),
    ([("complete", None), ("pruned", None), ("failed", None)], None),
    ([("complete", None), ("retry", "3"), (None, None)], 1),
    ([("running", "4"), ("running", "5")], None),
]


@pytest.mark.parametrize(("states", "expected"), CASES)
def test_next_slot_decides_as_from_every_file(tmp_path: Path, states, expected):
    paths = SweepPaths(tmp_path / "s")
    paths.slots.mkdir(parents=True)
    for i, (state, job) in enumerate(states):
        slot = _slot(i, state, job)
        if slot is not None:
            paths.write_slot(slot)
    assert trial_mod._next_slot(paths, range(len(states))) == expected
    assert trial_mod._next_slot(paths, range(len(states))) == expected  # with what it remembers


def test_next_slot_reads_no_finished_slot_twice_and_no_missing_file(tmp_path: Path, monkeypatch):
    """2,000 finished slots and 2 running ones: the second claim reads no file (it read every
    one of the 2,002 before, each claim, under the sweep lock); a slot file replaced since
    (another process's claim, end, or resume's retry mark) is read once more."""
    paths = SweepPaths(tmp_path / "s")
    paths.slots.mkdir(parents=True)
    for i in range(2000):
        paths.write_slot(_slot(i, "complete"))  # type: ignore[arg-type]
    for i in (2000, 2001):
        paths.write_slot(_slot(i, "running", "9"))  # type: ignore[arg-type]
    assert trial_mod._next_slot(paths, range(2010)) == 2002
    reads: list[int] = []
    real = paths.read_slot
    monkeypatch.setattr(paths, "read_slot", lambda i: reads.append(i) or real(i))
    assert trial_mod._next_slot(paths, range(2010)) == 2002
    assert reads == []
    paths.write_slot(_slot(2000, "complete"))  # type: ignore[arg-type]
    paths.write_slot(_slot(2001, "retry", "9"))  # type: ignore[arg-type]
    assert trial_mod._next_slot(paths, range(2010)) == 2001
    assert trial_mod._next_slot(paths, range(2010)) == 2001
    assert sorted(reads) == [2000, 2001]


def test_a_workers_trials_share_its_journal_storage(tmp_path: Path, monkeypatch):
    """Each trial opened a new journal storage for its reporter, which replays the whole
    journal file: at 10,000 trials, about a second of CPU per trial for each worker."""
    spec = _spec(5)
    paths = SweepPaths(tmp_path / "lean")
    paths.slots.mkdir(parents=True)
    paths.spec.write_text(spec.model_dump_json())
    study = open_study(spec, paths.root, worker=0)
    opened: list[Path] = []
    real = storage_mod.journal_storage
    monkeypatch.setattr(storage_mod, "journal_storage", lambda d: opened.append(d) or real(d))
    done = work(paths, spec, study, None)
    assert len(done) == 5 and all(d.endswith(":complete") for d in done)
    assert opened == []
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 5


def test_storage_writes_are_timed_only_when_asked(tmp_path: Path, monkeypatch):
    spec = _spec(3)
    for timed in (False, True):
        if timed:
            monkeypatch.setenv(store_timing.ENV, "1")
        paths = SweepPaths(tmp_path / f"t{timed}")
        paths.slots.mkdir(parents=True)
        paths.spec.write_text(spec.model_dump_json())
        work(paths, spec, open_study(spec, paths.root, worker=0), None)
        lines = [x for j in read_journals(paths).values() for x in j if x["event"] == "trial"]
        assert len(lines) == 3
        if not timed:
            assert all("storage_s" not in x for x in lines)
            continue
        # per trial: the new trial, its parameter, its state and value
        assert all(len(x["storage_s"]) == 3 and x["claim_s"] >= 0 for x in lines)
        t = bench_scale.timings(read_journals(paths))
        assert t["writes"] == 9 and t["trial_lines"] == 3 and t["write_p99_ms"] >= t["write_p50_ms"]


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([3.0, 1.0, 2.0], 0.5, 2.0), ([1.0] * 98 + [50.0, 60.0], 0.99, 50.0),
     (list(range(1, 101)), 0.99, 99), ([5.0], 0.99, 5.0)],
)  # fmt: skip
def test_percentiles(values, q, expected):
    assert bench_scale.pct(values, q) == expected


def test_invariants_name_a_lost_and_a_duplicated_trial(tmp_path: Path):
    from hpcdl.hpo.sweep import Sweep

    spec = _spec(3).model_copy(
        update={"resources": _spec(3).resources.model_copy(update={"site": "local"})}
    )
    sweep = Sweep(spec)
    sweep.paths = SweepPaths(tmp_path / "inv")
    sweep.paths.slots.mkdir(parents=True)
    sweep.paths.spec.write_text(spec.model_dump_json())
    work(sweep.paths, spec, open_study(spec, sweep.paths.root, worker=0), None)
    assert bench_scale.invariants(sweep) == []
    one = sweep.paths.read_slot(1)
    assert one is not None
    sweep.paths.write_slot(one.model_copy(update={"trial": 0}))  # two slots, one trial number
    problems = bench_scale.invariants(sweep)
    assert any("used by two slots" in p for p in problems), problems
    assert any("differ between slots and study" in p for p in problems), problems


@pytest.mark.parametrize(
    ("args", "says"),
    [(["--storage", "sqlite", "--site", "devcluster"], "--storage: storage: 'sqlite': use journal, postgres or both"),
     (["--storage", "journal"], "the scale runs need --site"),
     (["--storage", "journal", "--site", "devcluster", "--workers", "64,x"], "use counts >= 1"),
     (["--storage", "postgres", "--site", "devcluster"], "has no study_storage database")],
)  # fmt: skip
def test_bench_hpo_scale_refuses_bad_input_in_one_line(capsys, args, says):
    from hpcdl.cli import main

    assert main(["bench", "hpo", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and says in err, err


def test_silent_tasks_names_the_workers_that_never_started_and_shows_their_logs(tmp_path: Path):
    from types import SimpleNamespace

    array = SimpleNamespace(job_id="77", array=4, folder=str(tmp_path))
    (tmp_path / "77_2_0_log.err").write_text("srun: error: stuck\n")
    got = bench_scale.silent_tasks(None, array, {"77_0", "77_1", "77_3"})
    assert got["count"] == 1 and got["first"] == ["77_2"]
    assert got["logs"] == {"77_2": {"77_2_0_log.err": "srun: error: stuck\n"}}
    assert bench_scale.silent_tasks(None, array, {f"77_{i}" for i in range(4)})["count"] == 0


def test_failed_tasks_names_workers_that_died_with_a_traceback(tmp_path):
    from types import SimpleNamespace

    from hpcdl.hpo.bench_scale import failed_tasks

    (tmp_path / "7_0_0_log.err").write_text("hpcdl: info: sweep worker 7_0 started\n")
    (tmp_path / "7_1_0_log.err").write_text(
        "hpcdl: info: sweep worker 7_1 started\nTraceback (most recent call last):\n"
        '  File "x.py", line 1\npsycopg.errors.ConnectionTimeout: connection timeout expired\n'
        "srun: error: node1: task 0: Exited with exit code 1\n"
    )
    (tmp_path / "8_0_0_log.err").write_text("Traceback (most recent call last):\nValueError: x\n")
    got = failed_tasks(SimpleNamespace(folder=str(tmp_path), job_id="7"))
    assert got["count"] == 1 and got["first"] == ["7_1_0"]
    assert got["errors"]["7_1_0"] == "psycopg.errors.ConnectionTimeout: connection timeout expired"
