"""The dev cluster's study database (``devcluster.sh postgres``, run by ``up``): idempotent, a
server on loopback, a role and a database for hpcdl-alice whose password only she can read,
and nobody else let in. Root runs the script; the connections are made as the users."""

from __future__ import annotations

import re
import stat
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, AsUser

SCRIPT = REPO / "slurm" / "devcluster" / "devcluster.sh"
pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.usefixtures("devcluster")]

# Alice connects with her storage file's URL and password, as a sweep's workers do.
CONNECT = """
import sys, yaml, psycopg
from pathlib import Path
conf = yaml.safe_load(Path(sys.argv[1]).read_text())
pw = Path(conf["password_file"]).read_text().strip()
with psycopg.connect(conf["url"], password=pw, connect_timeout=10) as c:
    print(c.execute("select current_user, current_database()").fetchone())
"""


def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_postgres_step_is_idempotent_and_private(users: dict[str, AsUser]):
    alice, bob = users["a"], users["b"]
    start = time.monotonic()
    again = run(str(SCRIPT), "postgres")
    assert again.returncode == 0, again.stderr
    assert time.monotonic() - start < 30
    assert "wrote" not in again.stdout and "started" not in again.stdout, (
        again.stdout
    )  # nothing to do
    status = run(str(SCRIPT), "status", timeout=60)
    assert re.search(r"^\s+postgres\s+running \(pid \d+\), port 5433", status.stdout, re.M), (
        status.stdout
    )
    conf_path = alice.home / ".hpcdl" / "study-database.yaml"
    conf = yaml.safe_load(conf_path.read_text())
    pw = Path(conf["password_file"])
    for path in (pw, conf_path):
        st = path.stat()
        assert st.st_uid == alice.uid and stat.S_IMODE(st.st_mode) == 0o600, path
    assert conf["url"] == "postgresql://hpcdl-alice@127.0.0.1:5433/hpo_hpcdl_alice"
    assert pw.read_text().strip() not in conf_path.read_text()
    ok = alice.run("python", "-c", CONNECT, str(conf_path), timeout=60)
    assert ok.returncode == 0 and "('hpcdl-alice', 'hpo_hpcdl_alice')" in ok.stdout, ok.stderr
    # bob can read neither file; with alice's name and a guess he is refused by the server
    assert bob.run("cat", str(pw)).returncode != 0
    guess = bob.run("python", "-c", "import psycopg; psycopg.connect('postgresql://hpcdl-alice@"
                    "127.0.0.1:5433/hpo_hpcdl_alice', password='guess', connect_timeout=10)",
                    timeout=60)  # fmt: skip
    assert guess.returncode != 0 and "password authentication failed" in guess.stderr
