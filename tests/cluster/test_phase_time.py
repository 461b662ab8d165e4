"""env/phase-time.sh, which times each phase of `make test` and prints the table at its end."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

SCRIPT = str(REPO / "env/phase-time.sh")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=60)


def test_each_phase_is_timed_and_its_status_kept(tmp_path: Path):
    times = tmp_path / "times.txt"
    ok = _run(str(times), "slow", "sh", "-c", "sleep 0.3; echo out")
    assert ok.returncode == 0 and ok.stdout == "out\n"  # the phase's own output, untouched
    failed = _run(str(times), "broken", "sh", "-c", "exit 3")
    assert failed.returncode == 3  # make test still fails at a failed phase
    (slow, broken) = [line.split() for line in times.read_text().splitlines()]
    assert slow[0] == "slow" and 0.3 <= float(slow[1]) < 30 and slow[2] == "0"
    assert broken[0] == "broken" and broken[2] == "3"
    table = _run("--table", str(times))
    assert table.returncode == 0
    lines = table.stdout.strip().splitlines()
    assert lines[0].split() == ["phase", "seconds", "result"]
    assert lines[1].split()[0::2] == ["slow", "ok"]
    assert lines[2].split()[0] == "broken" and "FAILED (exit 3)" in lines[2]
    assert lines[3].split()[0] == "total"


def test_no_phase_ran_no_table(tmp_path: Path):
    empty = tmp_path / "times.txt"
    empty.touch()
    assert _run("--table", str(empty)).stdout == ""
    assert _run(str(empty), "x").returncode == 2  # no command: a usage line


def test_make_test_prints_what_ran_when_a_phase_fails(tmp_path: Path):
    """The Makefile's own `test` recipe, with stand-in phases (the real ones take half an hour):
    it stops at the failed phase, prints the table of what ran, and fails."""
    (tmp_path / "env").mkdir()
    (tmp_path / "env/phase-time.sh").symlink_to(SCRIPT)
    fake = "\n".join(["", "good:", "\ttrue", "bad:", "\texit 7", "never:", "\ttouch never-ran", ""])
    (tmp_path / "Makefile").write_text((REPO / "Makefile").read_text() + fake)
    # not the settings of a `make test` this test may run under
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    proc = subprocess.run(["make", "test", "TEST_PHASES=good bad never", "BIN=/nonexistent"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert proc.returncode != 0, proc.stdout
    assert not (tmp_path / "never-ran").exists()  # and no pytest either: /nonexistent
    rows = [line.split()[0] for line in proc.stdout.split("phase ")[-1].splitlines()[1:]]
    assert rows == ["good", "bad", "total"], proc.stdout
    assert "FAILED (exit 2)" in proc.stdout  # make's status for the failed recipe


def test_the_total_is_the_wall_time_when_phases_overlap(tmp_path: Path):
    """make test runs the local end-to-end tests beside the cluster tests: the total is the
    time from the first start to the last end, not the sum."""
    times = tmp_path / "times.txt"
    a = subprocess.Popen([SCRIPT, str(times), "a", "sleep", "1"])
    b = subprocess.Popen([SCRIPT, str(times), "b", "sleep", "1"])
    assert a.wait(timeout=60) == 0 and b.wait(timeout=60) == 0
    rows = {line.split()[0]: line.split() for line in times.read_text().splitlines()}
    start = min(float(rows[n][3]) for n in "ab")
    end = max(float(rows[n][4]) for n in "ab")
    table = _run("--table", str(times)).stdout.strip().splitlines()
    total = table[-1].split()
    assert total[0] == "total" and float(total[1]) == pytest.approx(end - start, abs=0.11)
    assert float(total[1]) < float(rows["a"][1]) + float(rows["b"][1])  # not the sum


def test_make_test_runs_every_test_phase_with_its_selection(tmp_path: Path):
    """The recipe's test phases, with stand-ins for pytest, python and run_as_user.sh that
    record how they were called: each phase runs (a phase whose command cannot start failed
    the whole run once, exit 127), with its folder, marker selection and the cluster flag."""
    (tmp_path / "env").mkdir()
    (tmp_path / "env/phase-time.sh").symlink_to(SCRIPT)
    (tmp_path / "tests").mkdir()
    calls = tmp_path / "calls.txt"
    record = f'#!/bin/sh\necho "$(basename "$0") C=${{HPCDL_CLUSTER_STARTED-}} $*" >> {calls}\n'
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for path in (fake_bin / "pytest", fake_bin / "python", tmp_path / "tests/run_as_user.sh"):
        path.write_text(record)
        path.chmod(0o755)
    (tmp_path / "Makefile").write_text((REPO / "Makefile").read_text())
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    proc = subprocess.run(["make", "test", "TEST_PHASES=", f"BIN={fake_bin}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = calls.read_text().splitlines()
    phases = [
        line.split()[0] for line in (tmp_path / "build/phase-times.txt").read_text().splitlines()
    ]
    assert sorted(phases) == sorted(["pytest-unit", "pytest-local", "pytest-as-user", "pytest-root",
                                     "root-jobs"])  # fmt: skip

    def called(prefix: str, *words: str) -> bool:
        return any(line.startswith(prefix) and all(w in line for w in words) for line in seen)

    assert called("pytest C=1", "tests/unit"), seen
    assert called("pytest C=1", "-m not slurm tests/cluster"), seen
    assert called("run_as_user.sh", "-m slurm and not root tests/cluster"), seen
    assert called("pytest C=1", "-m slurm and root tests/cluster"), seen
    assert called("python", "tests/root_jobs.py --since"), seen
