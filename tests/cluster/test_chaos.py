"""Chaos runs on the dev cluster (slurm/devcluster/chaos.py): each seed applies its own random
schedule of faults (scancel of a task, scontrol requeue, SIGKILL of a trial process, a node set
DOWN then RESUMEd, the follow-up job cancelled) to a live toy sweep; the sweep must end with
every slot finished once in the study, one W&B run id per trial and the final result, or stop
saying what is stuck and finish after one ``resume()``. More seeds: see
slurm/devcluster/README.md ("Chaos runs")."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "slurm/devcluster"))
import chaos

from hpcdl.hpo import Sweep
from tests.helpers.fault_site import write_fault_site

# (seed, nodes per trial, trials_per_task: None = warm workers): together their schedules hit
# every fault kind at least once. A seed that sets a node DOWN runs in the hidden `fault`
# partition (tests/helpers/fault_site.py): a DOWN node ends every job on it, and only
# fault-injection tests use those nodes.
NODE_DOWN = {1}
SEEDS = [
    pytest.param(
        1, 1, None, id="seed1-sigkill-scancel-nodedown", marks=pytest.mark.cluster_lock("fault")
    ),
    pytest.param(9, 2, None, id="seed9-2node-scancel-sigkill-cancelfollow"),
    pytest.param(4, 1, 1, id="seed4-pertask-requeue-scancel-scancel"),
]


def test_a_seed_gives_one_schedule_and_bad_kinds_are_refused(capsys):
    assert chaos.plan(12) == chaos.plan(12) != chaos.plan(13)
    kinds = {f.kind for seed, *_ in [p.values for p in SEEDS] for f in chaos.plan(seed)}
    assert kinds == set(chaos.KINDS)
    with pytest.raises(SystemExit) as exc:
        chaos.main(["--seed", "1", "--kinds", "scancel,meteor"])
    assert exc.value.code == 2
    assert "unknown fault kinds ['meteor']" in capsys.readouterr().err


@pytest.mark.slurm
@pytest.mark.parametrize(("seed", "nodes", "per_task"), SEEDS)
def test_sweep_keeps_its_invariants_under_chaos(devcluster, tmp_path: Path, monkeypatch, seed,
                                                nodes, per_task):  # fmt: skip
    monkeypatch.setenv("HPCDL_CHAOS_EPOCH_S", "1")
    # one trial per task pays a start-up per trial: fewer trials keep the seed's time down
    trials, parallelism = (6, 3) if per_task is None else (4, 2)
    where = {}
    if seed in NODE_DOWN:
        monkeypatch.setenv("HPCDL_SITE_PATH", f"{tmp_path / 'site'}:{REPO / 'hpcdl/sites'}")
        where = {"site": write_fault_site(tmp_path / "site"), "partition": "fault"}
    spec = chaos.toy_spec(f"chaos{seed}", seed, trials, parallelism=parallelism, nodes=nodes,
                          trials_per_task=per_task, **where)  # fmt: skip
    sweep = Sweep(spec)
    log = tmp_path / "faults.json"
    report = chaos.chaos_run(sweep, seed, log, faults=3, timeout=150)
    text = json.dumps(report, indent=1)
    hits = [e for e in report["applied"] if e["kind"] != "release" and "skipped" not in e]
    assert hits, text  # the faults hit something
    assert not report["problems"], text
    if report["resumed"]:
        assert report["diagnosis"], text
    assert json.loads(log.read_text())["applied"] == report["applied"]
    _check_sees_broken_invariants(sweep)


# The dev cluster's study database (devcluster.sh postgres, run by `up`): its address and the
# password file of the test user, who runs the cluster tests.
STUDY_DATABASE = Path("~/.hpcdl/study-database.yaml").expanduser()


@pytest.mark.slurm
def test_sweep_keeps_its_invariants_under_chaos_on_postgres(devcluster, tmp_path: Path,
                                                            monkeypatch):  # fmt: skip
    """Seed 9 (2-node trials; scancel, SIGKILL, the follow-up cancelled: no node set DOWN) with
    the study in the dev cluster's PostgreSQL: the same invariants as on the journal, the
    trials in the database and no journal file in the sweep folder."""
    if not STUDY_DATABASE.is_file():
        pytest.fail(f"no {STUDY_DATABASE}: run 'slurm/devcluster/devcluster.sh postgres' (as root)",
                    pytrace=False)  # fmt: skip
    monkeypatch.setenv("HPCDL_CHAOS_EPOCH_S", "1")
    storage = chaos.storage_setting(str(STUDY_DATABASE))
    spec = chaos.toy_spec(f"chaospg9-{os.getpid()}", 9, 6, parallelism=3, nodes=2,
                          storage=storage)  # fmt: skip
    sweep = Sweep(spec)
    report = chaos.chaos_run(sweep, 9, tmp_path / "faults.json", faults=3, timeout=150)
    text = json.dumps(report, indent=1)
    assert [e for e in report["applied"] if e["kind"] != "release" and "skipped" not in e], text
    assert not report["problems"], text
    assert sweep.spec.storage is not None and not sweep.spec.storage.journal
    assert not sweep.paths.study.exists()  # the study is in the database, not beside
    assert len(sweep.study().get_trials(deepcopy=False)) == 6
    _check_sees_broken_invariants(sweep)


def _check_sees_broken_invariants(sweep: Sweep) -> None:
    """The same check on the finished sweep, doctored: a trial number in two slots, an attempt
    under another W&B run id, no final result."""
    first, second = sweep.slots()[:2]
    sweep.paths.write_slot(second.model_copy(update={"trial": first.trial}))
    with (sweep.paths.trial_dir(first) / "attempts.jsonl").open("a") as f:
        f.write(json.dumps({"run_id": "someone-else"}) + "\n")
    (sweep.paths.final / "result.json").unlink()
    problems = "\n".join(chaos.check(sweep))
    assert "a trial number is in two slots" in problems, problems
    assert f"study trials [{second.trial}]" in problems, problems
    assert "'someone-else'" in problems and "no final result" in problems, problems
