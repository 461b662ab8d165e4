"""The docs walked as a new user types them (issue 26): the commands of Getting started, in
order, in a fresh home (no job root, no config folder, no HPCDL_* variables), each of which
must succeed, and whose output must still have the lines the pages show (docs/getting-started.md
and the status sample of docs/sweeps.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
BIN = str(Path(sys.executable).parent)
NUMBER = r"-?\d[\d.:]*(?:e[-+]?\d+)?"
# a sample's varying parts: "=value", numbers (ids, scores, times), "…" (elided), the bar
_TOKEN = re.compile(r"(=[^,\s)]+|\d[\d.:]*(?:e[-+]?\d+)?|…|━+|~|\s+)")


def fenced(page: Path, after: str, lang: str = "") -> str:
    """The first fenced block (```LANG) after the heading or text ``after`` on ``page``."""
    text = page.read_text()
    start = text.index(after)
    match = re.compile(rf"^```{lang}\n(.*?)^```", re.M | re.S).search(text, start)
    assert match, f"{page}: no ```{lang} block after {after!r}"
    return match.group(1)


def commands(block: str) -> list[str]:
    """A bash block's command lines, comments removed."""
    lines = (re.sub(r"\s+#\s.*$", "", line).strip() for line in block.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def shape(sample: str, home: Path) -> re.Pattern[str]:
    """A sample output line as a pattern: its words as they are, the parts that vary anything
    of the same kind (a number for a number, a value after '=', '…' anything, '~' the home)."""
    out = []
    for tok in _TOKEN.split(sample.strip()):
        if not tok:
            continue
        if tok.isspace():
            out.append(r"\s+")
        elif tok.startswith("="):
            out.append(r"=[^,\s)]+")
        elif tok == "…":
            out.append(".*")
        elif tok.startswith("━"):
            out.append("━+")
        elif tok == "~":
            out.append(re.escape(str(home)))
        elif re.fullmatch(NUMBER, tok):
            out.append(NUMBER)
        else:
            out.append(re.escape(tok))
    return re.compile("".join(out))


def assert_has_shape(sample_lines: list[str], output: str, home: Path, what: str) -> None:
    lines = [line.strip() for line in output.splitlines()]
    for sample in sample_lines:
        pattern = shape(sample, home)
        assert any(pattern.fullmatch(line) for line in lines), (
            f"{what}: no line of the output has the shape of the page's {sample!r}\n"
            f"--- output:\n{output}"
        )


class User:
    """A new user's shell: a fresh HOME (so no job root and no ~/.config/hpcdl), none of the
    HPCDL_* variables the other tests set, hpcdl on the PATH."""

    def __init__(self, home: Path) -> None:
        home.mkdir()
        self.home, self.cwd = home, home
        drop = ("HPCDL_", "XDG_", "COLUMNS", "WANDB_")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        self.env.update(HOME=str(home), PATH=f"{BIN}:{os.environ['PATH']}")

    def run(self, line: str, timeout: float = 180, **env: str) -> str:
        """Run one command line as typed (bash; a `cd` carries over to the next); its output."""
        where = self.home / ".cwd"
        proc = subprocess.run(
            ["bash", "-c", f"set -e\n{line}\npwd > {where}"],
            cwd=self.cwd,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, f"$ {line}\nexit {proc.returncode}\n{proc.stdout}{proc.stderr}"
        self.cwd = Path(where.read_text().strip())
        return proc.stdout + proc.stderr


def test_getting_started_then_sweep_status_as_a_new_user_types_them(tmp_path):
    page = DOCS / "getting-started.md"
    typed = commands(fenced(page, "## The first job", "bash"))
    assert typed[0] == "hpcdl init work && cd work", typed  # the walk below follows the page
    sample = [s for s in fenced(page, "One run of the sweep here", "text").splitlines() if s]
    user = User(tmp_path / "home")
    started = time.monotonic()
    job_id = None
    for line in typed:
        if "JOB_ID" in line:
            assert job_id, f"{line!r}: the page names JOB_ID before any job was submitted"
            line = line.replace("JOB_ID", job_id)
        out = user.run(line)
        if line.startswith("hpcdl init"):
            for folder in ("train", "val", "test"):  # what the page says init writes
                assert (user.cwd / "data/digits" / folder).is_dir(), out
            assert (user.cwd / "configs/sweep_digits.yaml").is_file(), out
        elif line == "hpcdl site list":
            assert re.search(r"^local \(default\)\s+package\s", out, re.M), out
        elif line.startswith("hpcdl submit"):
            found = re.search(r"^Submitted job (\S+) ", out, re.M)
            assert found, out
            job_id = found.group(1)
        elif "hpcdl logs" in line:
            assert job_id in out, out  # hpcdl status lists it
            _wait_for_hello(user, job_id)
        elif line.startswith("hpcdl train"):
            assert re.search(r"^completed: \d+ steps, 3 epochs, val_acc ", out, re.M), out
        elif line.startswith("hpcdl sweep run"):
            assert_has_shape(sample, out, user.home, f"$ {line}")
    assert job_id, typed

    # docs/sweeps.md: the status of that sweep at 80 columns
    status = fenced(DOCS / "sweeps.md", "## Status at 80 columns").splitlines()
    assert status[0].startswith("$ COLUMNS=80 hpcdl sweep status "), status[0]
    out = user.run(status[0].removeprefix("$ "))
    _assert_status_shape(status[1:], out, user.home)
    print(f"walk: {time.monotonic() - started:.1f} s")  # -s shows it


def _wait_for_hello(user: User, job_id: str, timeout: float = 60) -> None:
    """The page's `hpcdl logs JOB_ID` right after submitting may come before the job ran: a user
    types it again, so the test does, until the job's output is there."""
    deadline = time.monotonic() + timeout
    while "hello" not in (out := user.run(f"hpcdl logs {job_id}")):
        assert time.monotonic() < deadline, f"job {job_id} never said hello:\n{out}"
        time.sleep(0.5)


def _assert_status_shape(sample: list[str], output: str, home: Path) -> None:
    """Table rows vary from run to run (the trials drawn, which are pruned, the column blocks
    the widths give): the sample's headers must name the same columns, its legend the same
    parameters, and each of its other lines must have a line of the same shape."""

    def legend(lines: list[str]) -> list[str]:  # 'parameters: a = x.a, ...' and its wraps
        at = next(i for i, ln in enumerate(lines) if ln.startswith("parameters:"))
        end = next((i for i in range(at + 1, len(lines)) if not lines[i].startswith("  ")), None)
        return lines[at:end]

    def columns(lines: list[str]) -> tuple[list[str], set[str], set[str]]:
        headers = [ln.split() for ln in lines if ln.startswith("slot ")]
        pairs = set(re.findall(r"(\w+) = ([\w.]+)", " ".join(legend(lines))))
        return headers[0][:6], {c for h in headers for c in h}, pairs

    lines = output.splitlines()
    assert columns(lines) == columns(sample), output
    other = [
        ln
        for ln in sample
        if ln.strip()
        and ln != "..."
        and ln not in legend(sample)
        and not ln.startswith("slot ")
        and not re.match(r"\d+\s", ln)  # a row of a table
    ]
    assert other, sample
    assert_has_shape(other, output, home, "sweep status")
    rows = [ln for ln in lines if re.match(r"\d+\s+\d+\s+(complete|pruned|failed)\s", ln)]
    assert len(rows) == 16, output  # one row per trial of the 16


@pytest.mark.slurm
def test_getting_started_on_the_cluster_takes_the_profile_and_a_new_name(devcluster, tmp_path):
    """The page's cluster line: the same sweep with resources.site=NAME name=digits-cluster."""
    page = (DOCS / "getting-started.md").read_text()
    found = re.search(r"`(hpcdl sweep run \S+ resources\.site=NAME name=digits-cluster)`", page)
    assert found, "getting-started no longer shows the cluster line this test runs"
    user = User(tmp_path / "home")
    user.run("hpcdl init work && cd work")
    out = user.run(found.group(1).replace("NAME", devcluster))
    queued = re.findall(r"sweep-digits-cluster: array of \d+ (\d+)", out)
    try:
        assert queued, out
        status = user.run("hpcdl sweep status digits-cluster")
        assert status.startswith("sweep digits-cluster (devcluster): 16 trials"), status
    finally:  # the walk proves the page's line is accepted; the sweep itself is tested elsewhere
        user.run("hpcdl sweep cancel digits-cluster")
    deadline = time.monotonic() + 60
    while left := _squeue(queued):
        assert time.monotonic() < deadline, f"the cancelled sweep's jobs are still queued:\n{left}"
        time.sleep(1)


def _squeue(job_ids: list[str]) -> str:
    """What squeue still lists of these jobs (their follow-up jobs are cancelled with them)."""
    return subprocess.run(
        ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %j %T"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()
