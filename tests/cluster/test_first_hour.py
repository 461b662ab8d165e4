"""The first hour of a new user and site admin (issue 26): each command of the docs, followed
literally, works or says in one line what to do."""

from __future__ import annotations

import json
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from hpcdl.cli import main
from hpcdl.errors import ConfigError
from hpcdl.hpo import Sweep, SweepSpec
from hpcdl.hpo.protocol import BaseObjective
from hpcdl.hpo.table import status_text

REPO = Path(__file__).resolve().parents[2]

TOY = {
    "name": "first",
    "objective": "tests.helpers.objectives:curve",
    "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
    "sampler": {"name": "random", "seed": 0},
    "trials": 2,
    "parallelism": 2,
    "resources": {"site": "local", "time": "10m"},
}


def wait_until(what: Callable[[], bool], timeout: float, why: Callable[[], object]) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, why()
        time.sleep(0.1)


def jobs_gone(sweep: Sweep) -> bool:
    return not any(j.live for j in sweep.jobs())


# -- 1: site import into a folder that does not exist yet ----------------------------------------
@pytest.mark.slurm
def test_site_import_creates_the_missing_folder_private(devcluster, tmp_path):
    target = tmp_path / "config/hpcdl/sites/mysite.yaml"
    proc = run_cli("site", "import", "--name", "mysite", "-o", str(target))
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(target.read_text())["name"] == "mysite"
    for folder in (tmp_path / "config", tmp_path / "config/hpcdl", target.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert [p.name for p in target.parent.iterdir()] == ["mysite.yaml"]  # no temporary left


# -- 2: a sweep the site refuses leaves nothing behind; resume takes the fix ------------------------
@pytest.mark.slurm
def test_a_refused_sweep_writes_nothing_and_runs_once_fixed(devcluster, tmp_path, job_root, capsys):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({**TOY, "final": False, "parallelism": 1,
                                    "resources": {"site": devcluster, "time": "5m"}}))  # fmt: skip
    for bad, expected in (
        ("resources.time=2-00:00:00", "time: 2-00:00:00 exceeds partition 'cpu' limit"),
        ("resources.nodes=9", "nodes: 9 exceeds partition 'cpu' limit 4"),
    ):
        assert main(["sweep", "run", str(spec), bad]) == 2
        assert not (job_root / "sweeps").exists()  # no folder, no spec, no study, no slots
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {spec}: resources: "), err
        assert expected in err and len(err.splitlines()) == 1, err
    assert run_cli("sweep", "list").stdout == ""
    proc = run_cli("sweep", "run", str(spec), "resources.partition=low")
    assert proc.returncode == 0, proc.stderr
    sweep = Sweep.load("first")
    try:
        sweep.wait(timeout=180)
        wait_until(lambda: jobs_gone(sweep), 60, sweep.jobs)
        # resume (a trial missing) with a fix the site refuses: nothing changes, nothing queued
        sweep.paths.slot_file(1).unlink()
        before, subs = sweep.paths.spec.read_text(), sweep.submissions()
        assert main(["sweep", "resume", "first", "resources.time=2-00:00:00"]) == 2
        err = capsys.readouterr().err
        assert "time: 2-00:00:00 exceeds partition 'low' limit" in err, err
        assert sweep.paths.spec.read_text() == before and sweep.submissions() == subs
    finally:
        sweep.cancel()


def test_resume_takes_resource_overrides_and_refuses_changes_of_meaning(tmp_path, capsys):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({**TOY, "name": "fixme", "final": False}))
    assert main(["sweep", "run", str(spec)]) == 0
    sweep = Sweep.load("fixme")
    sweep.wait(timeout=120)
    wait_until(lambda: jobs_gone(sweep), 60, sweep.jobs)
    capsys.readouterr()
    for key in ("space.x.low=0.5", "metric=val_loss", "direction=minimize", "sampler.seed=3",
                "trials=9"):  # fmt: skip
        assert main(["sweep", "resume", "fixme", key]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {sweep.paths.spec}: {key.split('=')[0]}: a resumed sweep keeps what it studies"), err  # fmt: skip
        assert "name=NEW" in err[0]
    assert main(["sweep", "resume", "fixme", "resources.site=devcluster"]) == 2
    assert "a sweep stays on the site it was started on" in capsys.readouterr().err
    # finished: nothing to resume, and the override is not saved either
    before = sweep.paths.spec.read_text()
    assert main(["sweep", "resume", "fixme", "resources.time=20m"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert sweep.paths.spec.read_text() == before
    # a missing trial: the resources override is accepted, saved, and the round runs
    sweep.paths.slot_file(1).unlink()
    assert main(["sweep", "resume", "fixme", "resources.time=20m", "parallelism=1"]) == 0
    saved = SweepSpec.model_validate_json(sweep.paths.spec.read_text())
    assert (saved.resources.time, saved.parallelism) == ("20m", 1)
    Sweep.load("fixme").wait(timeout=120)
    wait_until(lambda: jobs_gone(sweep), 60, sweep.jobs)


# -- 3: resume never repeats a trial's parameters ------------------------------------------------
def test_resuming_twice_never_repeats_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCDL_TEST_EPOCH_S", "0.3")  # a trial: 4 epochs, about 1.2 s
    spec = SweepSpec.model_validate({**TOY, "name": "again", "trials": 6, "final": False})
    sweep = Sweep(spec)
    sweep.run()
    done: list[int] = []
    for _ in range(2):  # stop it after one more trial finished, then resume
        wait_until(lambda: len(_finished(sweep)) > (done[-1] if done else 0), 120, sweep.status)
        sweep.cancel()
        wait_until(lambda: jobs_gone(sweep), 60, sweep.jobs)
        done.append(len(_finished(sweep)))
        held = sum(s.state == "running" for s in sweep.slots())  # by the cancelled workers
        shown = status_text(sweep, 200, False, str)
        assert not any("  running  " in line for line in shown), shown
        assert sum("  cancelled  " in line for line in shown) == held, shown
        assert done[-1] < 6, "the sweep finished before it could be stopped"
        sweep.resume()
    sweep.wait(timeout=180)
    params = [t.params["x"] for t in sweep.study().trials]
    assert len(params) >= 6
    assert len(set(params)) == len(params), sorted(params)
    assert (sweep.paths.root / "round").read_text().strip() == "3"


def _finished(sweep: Sweep) -> list[int]:
    return [s.slot for s in sweep.slots() if s.state == "complete"]


# -- 4: a second sweep of the same name ------------------------------------------------------------
def test_same_name_says_how_to_rename_and_offers_resume_only_when_unfinished(job_root, capsys):
    spec = SweepSpec.model_validate({**TOY, "name": "twice"})
    sweep = Sweep(spec)
    sweep.run()
    sweep.wait(timeout=120)
    wait_until(lambda: jobs_gone(sweep), 60, sweep.jobs)
    with pytest.raises(Exception, match="exists already") as finished:
        Sweep(spec).run()
    assert "name=NEW" in str(finished.value) and "resume" not in str(finished.value)
    (sweep.paths.final / "result.json").unlink()  # as if its final job had died
    with pytest.raises(Exception, match="exists already") as unfinished:
        Sweep(spec).run()
    assert "name=NEW" in str(unfinished.value)
    assert "'hpcdl sweep resume twice'" in str(unfinished.value)


# -- 5: short flags mean what they mean to sbatch ---------------------------------------------------
def _sbatch_short_flags() -> dict[str, str]:
    """``{"-n": "--ntasks", ...}`` from this machine's ``sbatch --help``."""
    import re
    import subprocess

    text = subprocess.run(["sbatch", "--help"], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"^\s+(-[A-Za-z]), (--[a-z][a-z-]*)", text, re.MULTILINE))


@pytest.mark.slurm
@pytest.mark.parametrize("command", ["submit", "render"])
def test_every_short_flag_shared_with_sbatch_means_the_same(command):
    from hpcdl.cli.jobs import render, submit

    sbatch = _sbatch_short_flags()
    assert sbatch["-n"] == "--ntasks" and len(sbatch) > 20, sbatch
    cmd = {"submit": submit, "render": render}[command]
    ours = {opt: p.opts for p in cmd.params for opt in p.opts if len(opt) == 2}
    ours.pop("-h", None)  # help, in both
    for flag, opts in ours.items():
        assert flag in sbatch, f"{flag} ({opts}) is not an sbatch flag"
        assert sbatch[flag] in opts, f"{flag} is sbatch's {sbatch[flag]}, ours is {opts}"


@pytest.mark.slurm
def test_ntasks_and_gpus_are_totals_and_old_meanings_are_named(devcluster, tmp_path, capsys):
    def script(*args: str) -> str:
        assert main(["render", "--site", devcluster, *args, "--", "true"]) == 0
        return capsys.readouterr().out

    assert "--ntasks-per-node=2" in script("-N", "2", "-n", "4")
    assert "--ntasks-per-node=3" in script("-n", "3")
    assert "--ntasks-per-node=2" in script("-N", "2", "--ntasks-per-node", "2")
    assert "--ntasks-per-node=2" in script("-N", "2", "--tasks-per-node", "2")
    assert "--gpus-per-node=1" in script("-p", "gpu", "-N", "2", "-G", "2")
    # -N 2 -n 2 meant 4 ranks before: it now means 2, and says so
    assert main(["render", "--site", devcluster, "-N", "2", "-n", "2", "--", "true"]) == 0
    out = capsys.readouterr()
    assert "--ntasks-per-node=1" in out.out
    assert "note: -n 2 means 2 tasks in all, 1 per node, as in sbatch" in out.err
    assert "--ntasks-per-node 2" in out.err
    for args, line in (
        (["-N", "2", "-n", "3"], "error: command line: -n/--ntasks: 3 tasks in all do not split "
         "evenly over 2 node(s) (-N/--nodes 2): give a multiple of 2, or --ntasks-per-node N"),
        (["-N", "2", "-n", "4", "--ntasks-per-node", "1"], "error: command line: -n/--ntasks: 4 "
         "tasks in all over 2 node(s) is 2 per node, but --ntasks-per-node (or tasks_per_node in "
         "the job file) says 1"),
        (["-p", "gpu", "-N", "2", "-G", "3"], "error: command line: -G/--gpus: 3 GPUs in all do "
         "not split evenly over 2 node(s)"),
        (["-s", devcluster], "sbatch's -s is --oversubscribe: give the site as --site NAME"),
        (["-e", "A=1"], "sbatch's -e is --error: give environment variables as --env KEY=VALUE"),
    ):  # fmt: skip
        assert main(["render", "--site", devcluster, *args, "--", "true"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and line in err, err


@pytest.mark.slurm
def test_two_nodes_n_two_runs_two_ranks(devcluster, tmp_path):
    from conftest import REPORT

    from hpcdl.scheduler import find_handle

    proc = run_cli("submit", "--site", devcluster, "--parsable", "-N", "2", "-n", "2", "-t", "5m",
                   "--", sys.executable, REPORT, str(tmp_path / "rank"), "SLURM_NTASKS")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    handle = find_handle(proc.stdout.strip())
    try:
        state = handle.wait(timeout=120)
        assert state == "COMPLETED", handle.log_paths(0)[1].read_text()
    finally:
        handle.cancel()
    reports = [json.loads(p.read_text()) for p in tmp_path.glob("rank.*.json")]
    assert sorted(r["procid"] for r in reports) == ["0", "1"]
    assert len({r["node"] for r in reports}) == 2  # one rank on each node
    assert {r["env"]["SLURM_NTASKS"] for r in reports} == {"2"}


# -- 6: --test-only says when and where ------------------------------------------------------------
@pytest.mark.slurm
def test_test_only_prints_when_and_where(devcluster):
    from hpcdl.scheduler import find_handle

    proc = run_cli("submit", "--site", devcluster, "--test-only", "-t", "1m", "--", "true")
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.split()[2]
    find_handle(job_id).cancel()
    lines = [line.strip() for line in proc.stdout.splitlines()]
    answer = next(line for line in lines if line.startswith("sbatch --test-only: "))
    assert answer.startswith("sbatch --test-only: would start at 20"), proc.stdout
    assert " on nodes node" in answer and "in partition cpu" in answer, answer


# -- 7: the smaller ones ----------------------------------------------------------------------------
class Picky(BaseObjective):
    """An objective whose check refuses the spec without naming a file (as objectives do)."""

    def check(self, spec) -> None:
        raise ConfigError("", "space.x", "must stay below 0.9 for this objective")


def test_site_profiles_say_what_they_hold_and_what_is_wrong(tmp_path, capsys):
    local = yaml.safe_load((REPO / "hpcdl/sites/local.yaml").read_text())
    other = tmp_path / "mysite.yaml"  # name: local inside
    other.write_text(yaml.safe_dump({**local, "setup": ["module load cuda/12.4"],
                                     "launchers": {"torchrun": {"env": {"LOGLEVEL": "WARNING"}}}}))  # fmt: skip
    assert main(["site", "check", str(other)]) == 0
    out = capsys.readouterr()
    assert out.err.strip() == (
        f"hpcdl: warning: {other}: name: 'local' differs from the file name 'mysite': rename one "
        "(installed on the search path it would be refused)"
    )
    assert main(["site", "check", str(REPO / "hpcdl/sites/local.yaml")]) == 0
    assert capsys.readouterr().err == ""  # name and file agree: no warning
    assert main(["site", "show", str(other)]) == 0
    out = capsys.readouterr().out
    assert "  setup: module load cuda/12.4\n" in out
    assert "  launchers: torchrun LOGLEVEL=WARNING\n" in out


def _local_job(name: str = "speaker") -> str:
    from hpcdl.scheduler import find_handle

    proc = run_cli("submit", "--site", "local", "--name", name, "--parsable", "--",
                   sys.executable, "-c", "print('the program speaks')")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert find_handle(job_id).wait(timeout=120) == "COMPLETED"
    return job_id


def test_status_piped_at_80_columns_keeps_each_job_on_one_line():
    name = "a-rather-long-job-name-that-would-wrap-" + "x" * 30
    job_id = _local_job(name)
    status = run_cli("status", env={"COLUMNS": "80"}).stdout
    row = next(line for line in status.splitlines() if job_id in line)
    assert name in row and "COMPLETED" in row, status  # one line per job, no cell wrapped


def test_logs_show_the_program_without_submitit_unless_all():
    job_id = _local_job()
    assert run_cli("logs", job_id).stdout == "the program speaks\n"
    everything = run_cli("logs", job_id, "--all").stdout
    assert "submitit INFO (" in everything and "the program speaks\n" in everything


def test_sweep_errors_name_the_spec_file(tmp_path, capsys, job_root):
    spec = tmp_path / "picky.yaml"
    spec.write_text(yaml.safe_dump({**TOY, "objective": "tests.cluster.test_first_hour:Picky"}))
    assert main(["sweep", "run", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {spec}: space.x: must stay below 0.9 for this objective"
    assert not (job_root / "sweeps").exists()


# -- issue item 5 (part): a policy default is named where a job is previewed or fails ---------------
@pytest.mark.slurm
def test_policy_defaults_are_named_in_render_test_only_and_sbatch_errors(
    devcluster, tmp_path, capsys
):
    from hpcdl.scheduler import find_handle

    data = yaml.safe_load((REPO / "hpcdl/sites/devcluster.yaml").read_text())
    data["name"] = "intelsite"
    cpu = next(p for p in data["partitions"] if p["name"] == "cpu")
    cpu["policy"] = {"defaults": {"constraint": "intel"}}  # node1-2 only, of 4
    site = tmp_path / "intelsite.yaml"
    site.write_text(yaml.safe_dump(data))
    added = "site policy for partition 'cpu' added --constraint=intel"
    assert main(["render", "--site", str(site), "--", "true"]) == 0
    assert capsys.readouterr().err == f"note: {added}\n"
    assert main(["render", "--site", str(site), "-C", "amd", "--", "true"]) == 0
    assert capsys.readouterr().err == ""  # the job chose its nodes: nothing added
    proc = run_cli(
        "submit", "--site", str(site), "--test-only", "-N", "3", "-t", "1m", "--", "true"
    )
    assert proc.returncode == 2, proc.stdout
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: sbatch --test-only rejected the job: "), err
    assert err[0].endswith(f"({added})"), err
    proc = run_cli("submit", "--site", str(site), "--test-only", "-t", "1m", "--", "true")
    assert proc.returncode == 0, proc.stderr
    find_handle(proc.stdout.split()[2]).cancel()
    line = next(x for x in proc.stdout.splitlines() if "sbatch --test-only: " in x)
    assert line.endswith(f"in partition cpu ({added})"), line
