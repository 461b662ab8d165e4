"""Bad site profiles, job files and CLI arguments: one clear line each, no traceback, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import GOOD_SITE, one_line_error, site_data

from hpcdl.cli import main

BAD_SITES = [
    ("yaml syntax", "name: [unclosed\n", "invalid YAML"),
    ("top-level list", "- a\n- b\n", "expected a mapping"),
    ("missing name", {k: v for k, v in GOOD_SITE.items() if k != "name"}, "name: Field required"),
    ("bad scheduler", site_data(scheduler="pbs"), "scheduler"),
    ("unknown field", site_data(partitons=[]), "partitons: unknown field"),
    ("bad max_time", site_data(p0_max_time="1 day"), "partitions.0.max_time: invalid time"),
    ("zero cpus", site_data(p0_cpus_per_node=0), "partitions.0.cpus_per_node"),
    ("bad memory", site_data(p0_mem_per_node="lots"), "partitions.0.mem_per_node: invalid memory"),
    ("negative gpus", site_data(p0_gpus_per_node=-1), "partitions.0.gpus_per_node"),
    ("partition name", site_data(p0_name="my part"), "partitions.0.name"),
    ("preempt mode", site_data(p0_preempt_mode="SOMETIMES"), "partitions.0.preempt_mode: Input should be 'OFF', 'REQUEUE'"),
    ("grace time", site_data(p0_grace_time_s=-5), "partitions.0.grace_time_s: Input should be greater than or equal to 0"),
    ("two defaults", site_data(partitions=[GOOD_SITE["partitions"][0],
                                       {**GOOD_SITE["partitions"][1], "default": True}]),
     "more than one partition is marked default"),
    ("duplicate partition", site_data(partitions=[GOOD_SITE["partitions"][0]] * 2), "listed twice"),
    ("no partitions", site_data(partitions=[]), "needs at least one partition"),
    ("default account", site_data(accounts=["a"], default_account="b"), "default_account 'b'"),
    ("env name", site_data(env={"BAD-NAME": "1"}), "env: invalid environment variable name"),
    ("secret with value", site_data(env={"TOKEN": "x"}, secrets=["TOKEN"]), "secret 'TOKEN'"),
    ("container image", site_data(container={"runtime": "apptainer"}), "needs an image"),
    ("preemption signal", site_data(preemption={"signal": "KILL"}), "preemption.signal"),
    ("preemption delay", site_data(preemption={"delay_s": 1}), "preemption.delay_s"),
]  # fmt: skip


@pytest.mark.parametrize("label,content,expected", BAD_SITES, ids=[b[0] for b in BAD_SITES])
def test_bad_site_profile(tmp_path, capsys, label, content, expected):
    path = tmp_path / "t.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    line = one_line_error(capsys, main(["site", "show", str(path)]))
    assert str(path) in line
    assert expected in line


def test_missing_site_file(tmp_path, capsys):
    line = one_line_error(capsys, main(["site", "show", str(tmp_path / "nope.yaml")]))
    assert "file not found" in line


def test_unknown_site_name_lists_known(capsys):
    line = one_line_error(capsys, main(["site", "show", "nosuchsite"]))
    assert "unknown site profile 'nosuchsite'" in line and "local" in line


@pytest.fixture()
def site_file(tmp_path: Path) -> Path:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(GOOD_SITE))
    return path


def _job_file(tmp_path: Path, **fields) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"name": "j", "command": ["true"], **fields}))
    return str(path)


BAD_JOBS = [
    ("unknown job field", {"nodez": 2}, [], "nodez: unknown field"),
    ("empty command", {"command": []}, [], "command: command must not be empty"),
    ("bad time", {"time": "abc"}, [], "time: invalid time 'abc'"),
    ("infinite time", {"time": "infinite"}, [], "time: a job needs a finite time limit"),
    ("bad mem", {"mem": "12Q"}, [], "mem: invalid memory"),
    ("zero nodes", {"nodes": 0}, [], "nodes: Input should be greater than or equal to 1"),
    ("unknown partition", {"partition": "big"}, [], "partition: unknown partition 'big'"),
    ("time over limit", {"partition": "gpu", "time": "02:00:00"}, [], "exceeds partition 'gpu' limit 01:00:00"),
    ("nodes over limit", {"nodes": 5}, [], "nodes: 5 exceeds partition 'cpu' limit 4"),
    ("gpus on cpu", {"gpus_per_node": 1}, [], "gpus_per_node: partition 'cpu' has no GPUs"),
    ("gpus over", {"partition": "gpu", "gpus_per_node": 4}, [], "gpus_per_node: 4 exceeds"),
    ("cpus over", {"tasks_per_node": 3, "cpus_per_task": 2}, [], "tasks_per_node: 3 tasks x 2 cpus"),
    ("mem over", {"mem": "8G"}, [], "mem: 8G exceeds partition 'cpu' limit 4000M"),
    ("throttle alone", {"throttle": 2}, [], "throttle needs array"),
    ("bad dependency", {"dependencies": ["soon"]}, [], "invalid dependency 'soon'"),
    ("env name", {"env": {"A B": "1"}}, [], "invalid environment variable name 'A B'"),
    ("program missing", {"command": ["no-such-program-xyz"]}, [], "program 'no-such-program-xyz' is not on PATH"),
    ("script missing", {"command": ["python", "nowhere.py"]}, [], "script 'nowhere.py' does not exist"),
    ("override syntax", {}, ["nodes"], "after a job file only key=value overrides"),
    ("override into scalar", {}, ["name.x=1"], "'name' is not a mapping"),
]  # fmt: skip


@pytest.mark.parametrize("label,fields,extra,expected", BAD_JOBS, ids=[b[0] for b in BAD_JOBS])
@pytest.mark.parametrize("verb", ["submit", "render"])
def test_bad_job_file(tmp_path, capsys, site_file, job_root, label, fields, extra, expected, verb):
    rc = main([verb, "--site", str(site_file), _job_file(tmp_path, **fields), *extra])
    line = one_line_error(capsys, rc)
    assert expected in line
    assert not job_root.exists(), "nothing may be written for a rejected job"


BAD_ARGS = [
    (["submit"], "nothing to run"),
    (["submit", "--env", "NOVALUE", "--", "true"], "--env: expected KEY=VALUE"),
    (["submit", "--nodes", "two", "--", "true"], "'two' is not a valid integer"),
    (["submit", "--site", "nosuchsite", "--", "true"], "unknown site profile"),
    (["submit", "--nodes", "2", "--", "true"], "nodes: the local profile runs on one node"),
    (["submit", "--env", "SECRET_TOKEN=x", "--site", "SITE", "--", "true"], "env.SECRET_TOKEN: is a secret"),
    (["submit", "/nonexistent/job.yaml"], "file not found"),
    (["render", "--", "true"], "is a local profile"),
    (["logs", "99999999"], "no job '99999999' in the registry"),
    (["cancel", "99999999"], "no job '99999999' in the registry"),
    (["clean", "--older-than", "-1"], "--older-than: must be >= 0"),
    (["status", "--last", "x"], "is not a valid integer"),
    (["nosuchcommand"], "No such command"),
]  # fmt: skip


@pytest.mark.parametrize("args,expected", BAD_ARGS, ids=[" ".join(a[0][:2]) for a in BAD_ARGS])
def test_bad_cli_arguments(tmp_path, capsys, job_root, args, expected):
    site = tmp_path / "s.yaml"
    site.write_text(yaml.safe_dump({**GOOD_SITE, "secrets": ["SECRET_TOKEN"]}))
    line = one_line_error(capsys, main([str(site) if a == "SITE" else a for a in args]))
    assert expected in line
    assert not (job_root / "registry.jsonl").exists()
