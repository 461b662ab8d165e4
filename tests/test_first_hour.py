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

REPO = Path(__file__).resolve().parents[1]

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
