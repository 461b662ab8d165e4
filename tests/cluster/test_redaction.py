"""Secrets stay secret: a token planted in a site profile's secret file and in the submitting
environment reaches the job, and is found in no file a job, a training run or a sweep writes
(job root, run folders, W&B offline runs and W&B's own logs, binary files included) and on no
command line of a local job; jobs that carry it, and secret files others may read, are refused."""

from __future__ import annotations

import hashlib
import os
import secrets
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, one_line_error, run_cli
from helpers.train_setup import env_with_helpers, write_config, write_digits

from hpcdl import Job
from hpcdl.cli import main
from hpcdl.track import redacted

SITE = "redact"
# Values of the job's own env and setup lines: not secrets, but they must not reach W&B (its
# run config is uploaded at sync) nor, on a local job, any command line.
MARKS = {"env": "job-env-value-5b1f", "setup": "job-setup-value-9c3e", "site": "site-env-value-77d2"}  # fmt: skip


@pytest.fixture
def secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh token in a 0600 file named by the site profile ``redact`` (the shipped local
    profile plus that secret and a site env value), and the same token as WANDB_API_KEY in the
    submitting environment (the profile lists it as a secret too)."""
    value = "tok-" + secrets.token_hex(16)
    folder = tmp_path / "private"
    folder.mkdir(mode=0o700)
    fd = os.open(folder / "token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, f"{value}\n".encode())
    os.close(fd)
    sites = tmp_path / "sites"
    sites.mkdir()
    data = yaml.safe_load((REPO / "hpcdl/sites/local.yaml").read_text())
    data.update(name=SITE, secrets=["WANDB_API_KEY", {"name": "HPCDL_TEST_TOKEN", "file": str(folder / "token")}])  # fmt: skip
    data["env"] = {**data["env"], "HPCDL_SITE_MARK": MARKS["site"]}
    (sites / f"{SITE}.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("HPCDL_SITE_PATH", str(sites))
    monkeypatch.setenv("WANDB_API_KEY", value)
    for key, val in env_with_helpers().items():
        monkeypatch.setenv(key, val)
    return value


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits"))


def files_holding(value: str, roots: list[Path], since: float = 0.0) -> list[str]:
    """Every file under ``roots`` (modified after ``since``) whose bytes contain ``value``."""
    needle, hits = value.encode(), []
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            recent = path.is_file() and not path.is_symlink() and path.stat().st_mtime >= since
            if recent and needle in path.read_bytes():
                hits.append(str(path))
    return hits


def command_lines_holding(values: list[str]) -> list[str]:
    """Command lines of this machine's processes (what ``ps`` shows any user) holding a value."""
    hits = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        hits += [f"{cmdline.parent.name}: {text}" for v in values if v in text]
    return hits


def wait_for(path: Path, handle, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if handle.state() not in {"PENDING", "RUNNING"} or time.monotonic() > deadline:
            out, err = handle.log_paths()
            raise AssertionError(f"{path} never written; job {handle.state()}\n"
                                 f"{out.read_text() if out.exists() else ''}\n{err.read_text() if err.exists() else ''}")  # fmt: skip
        time.sleep(0.2)


def test_a_planted_secret_reaches_jobs_and_no_file_or_command_line(secret, tmp_path, digits, job_root):  # fmt: skip
    started = time.time()
    # 1. a command job: reads the secret at run time; meanwhile nothing in `ps` holds a value
    seen, go = tmp_path / "seen", tmp_path / "go"
    script = (
        "import hashlib, os, pathlib, sys, time\n"
        "t = os.environ['HPCDL_TEST_TOKEN']\n"
        "same = t == os.environ['WANDB_API_KEY']\n"
        "mark = os.environ['HPCDL_SETUP_MARK'] + ' ' + os.environ['HPCDL_SITE_MARK']\n"
        "pathlib.Path(sys.argv[1]).write_text(hashlib.sha256(t.encode()).hexdigest() + f' {same} ' + mark)\n"
        "end = time.time() + 60\n"
        "while not os.path.exists(sys.argv[2]) and time.time() < end: time.sleep(0.1)\n"
    )  # fmt: skip
    handle = Job(site=SITE, name="redaction", command=[sys.executable, "-c", script, str(seen), str(go)],
                 env={"HPCDL_JOB_MARK": MARKS["env"]}, time="5m",
                 setup=[f"export HPCDL_SETUP_MARK={MARKS['setup']}  # a comment ends here"]).submit()  # fmt: skip
    try:
        wait_for(seen, handle)
        assert command_lines_holding([secret, *MARKS.values()]) == []
    finally:
        go.touch()
    assert handle.wait(timeout=120) == "COMPLETED", handle.log_paths()[1].read_text()
    digest = hashlib.sha256(secret.encode()).hexdigest()
    assert seen.read_text() == f"{digest} True {MARKS['setup']} {MARKS['site']}"

    # 2. a training run through the CLI, W&B offline
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "train.yaml", digits, runs, epochs=1, job__tasks_per_node=1,
                          job__env={"HPCDL_JOB_MARK": MARKS["env"]},
                          job__setup=[f"export HPCDL_SETUP_MARK={MARKS['setup']}"])  # fmt: skip
    proc = run_cli("train", str(config), "--site", SITE, "--wait", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert secret not in proc.stdout + proc.stderr

    # 3. a sweep of that training (one W&B run per trial, and the final one)
    spec = {
        "name": "redaction", "train": str(config),
        "overrides": {"epochs": 1, "log.every_steps": 1000, "checkpoint.every_steps": 0},
        "space": {"optimizer.lr": {"type": "loguniform", "low": 1e-3, "high": 3e-2}},
        "sampler": {"name": "random", "seed": 0}, "trials": 2, "parallelism": 1,
        "resources": {"site": SITE, "time": "20m", "tasks_per_node": 1},
    }  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    proc = run_cli("sweep", "run", str(tmp_path / "sweep.yaml"), "--wait", timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert secret not in proc.stdout + proc.stderr

    wandb_dirs = sorted({p.parent for p in [*runs.rglob("offline-run-*"), *job_root.rglob("offline-run-*")]})  # fmt: skip
    assert len(wandb_dirs) >= 2, wandb_dirs  # the run's, the sweep's trials' and final's
    records = [p for d in wandb_dirs for p in d.rglob("*.wandb")]  # the run config is in them
    assert records and all(b"<redacted>" in p.read_bytes() for p in records), records
    assert files_holding(MARKS["env"], wandb_dirs) == []
    assert files_holding(MARKS["setup"], wandb_dirs) == []
    wandb_logs = Path.home() / ".cache/wandb/logs"  # wandb-core's own logs, outside the run
    everything = [job_root, runs, tmp_path / "sites", wandb_logs]
    assert sum(1 for root in everything[:2] for p in root.rglob("*") if p.is_file()) > 50
    assert files_holding(secret, everything, since=started - 1) == []
    assert files_holding(digest, [job_root, runs]) == []  # the job printed it only to `seen`


def test_the_secret_in_a_job_is_refused_without_showing_it(secret, capsys, job_root):
    cases = [
        (["--setup", f"export TOKEN={secret}"], "setup.0: holds the value of secret"),
        (["--env", f"OTHER=x{secret}x"], "env.OTHER: holds the value of secret"),
        (["-J", f"job-{secret}"], "name: holds the value of secret"),
        (
            ["--env", "HPCDL_TEST_TOKEN=abc"],
            "env.HPCDL_TEST_TOKEN: is a secret on this site: the job reads it from",
        ),
    ]
    for extra, expected in cases:
        line = one_line_error(capsys, main(["submit", "--site", SITE, *extra, "--", "true"]))
        assert expected in line and secret not in line, line
    line = one_line_error(capsys, main(["submit", "--site", SITE, "--", "echo", secret]))
    assert "command.1: holds the value of secret" in line and secret not in line
    assert not job_root.exists()


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda p: p.chmod(0o644), "has mode 0644: others may read it (chmod 600"),
        (lambda p: p.chmod(0o640), "has mode 0640"),
        (lambda p: p.unlink(), "not found"),
        (
            lambda p: (p.rename(p.with_name("real")), p.symlink_to(p.with_name("real"))),
            "is a symbolic link",
        ),
    ],
    ids=["0644", "0640", "missing", "symlink"],
)
def test_a_secret_file_others_may_read_is_refused(secret, tmp_path, capsys, job_root, setup, expected):  # fmt: skip
    token = tmp_path / "private" / "token"
    setup(token)
    line = one_line_error(capsys, main(["submit", "--site", SITE, "--", "true"]))
    assert line.startswith(
        f"error: site profile 'redact': secrets.HPCDL_TEST_TOKEN: file {token} "
    ), line
    assert expected in line and secret not in line, line
    assert not job_root.exists()


def test_wandb_config_carries_no_env_or_setup_values():
    config = {
        "name": "x",
        "job": {"env": {"A": "1", "B": "tok"}, "setup": ["export C=2"], "nodes": 2},
        "nested": [{"env": {"D": "4"}}],
    }
    assert redacted(config) == {
        "name": "x",
        "job": {"env": {"A": "<redacted>", "B": "<redacted>"}, "setup": ["<redacted>"], "nodes": 2},
        "nested": [{"env": {"D": "<redacted>"}}],
    }


@pytest.mark.slurm
def test_a_file_secret_on_the_cluster(devcluster, secret, tmp_path, job_root):
    """On Slurm the batch script names the file; the job on its node reads the value."""
    data = yaml.safe_load((REPO / "hpcdl/sites/devcluster.yaml").read_text())
    token = tmp_path / "private" / "token"
    data.update(name="redact-slurm", secrets=[{"name": "HPCDL_TEST_TOKEN", "file": str(token)}])
    (tmp_path / "sites" / "redact-slurm.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "seen"
    script = ("import hashlib, os, sys; t = os.environ['HPCDL_TEST_TOKEN']; "
              "open(sys.argv[1], 'w').write(hashlib.sha256(t.encode()).hexdigest())")  # fmt: skip
    handle = Job(site="redact-slurm", command=[sys.executable, "-c", script, str(out)], time="5m").submit()  # fmt: skip
    assert handle.wait(timeout=180) == "COMPLETED", handle.log_paths()[1].read_text()
    assert out.read_text() == hashlib.sha256(secret.encode()).hexdigest()
    assert f'HPCDL_TEST_TOKEN="$(cat -- {token})"' in Path(handle.script).read_text()
    assert files_holding(secret, [job_root]) == []


def test_a_sweeps_training_config_holding_the_secret_is_refused(secret, tmp_path, digits, capsys, job_root):  # fmt: skip
    """Trials write their training config into the sweep's folder without a job of their own."""
    config = write_config(tmp_path / "train.yaml", digits, tmp_path / "runs",
                          job__env={"OTHER": secret})  # fmt: skip
    spec = {
        "name": "leaky", "train": str(config),
        "space": {"optimizer.lr": {"type": "loguniform", "low": 1e-3, "high": 3e-2}},
        "trials": 2, "parallelism": 1, "resources": {"site": SITE, "time": "20m"},
    }  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    line = one_line_error(capsys, main(["sweep", "run", str(tmp_path / "sweep.yaml")]))
    assert line.startswith(f"error: {config}: job: env.OTHER: holds the value of secret"), line
    assert secret not in line
    assert not job_root.exists()


@pytest.mark.parametrize(
    ("secrets_entry", "expected"),
    [
        ([{"name": "BAD-NAME", "file": "/x"}], "secrets.0.name: invalid environment variable name 'BAD-NAME'"),
        ([{"name": "T", "path": "/x"}], "secrets.0.path: unknown field"),
        ([{"name": "T", "file": "/x\nrm -rf ~"}], "secrets.0.file: must be a path on one line"),
        (["T", {"name": "T", "file": "/x"}], "a secret is listed twice"),
    ],
    ids=["name", "unknown key", "newline", "twice"],
)  # fmt: skip
def test_bad_secret_entries_in_a_profile(tmp_path, capsys, secrets_entry, expected):
    data = yaml.safe_load((REPO / "hpcdl/sites/local.yaml").read_text())
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**data, "name": "bad", "secrets": secrets_entry}))
    line = one_line_error(capsys, main(["site", "show", str(path)]))
    assert expected in line, line


def test_a_secret_files_path_is_quoted_in_the_script(tmp_path):
    from hpcdl.credentials import Secret

    line = Secret(name="T", file=str(tmp_path / "it's $(x)")).shell_line()
    assert line == f"""T="$(cat -- '{tmp_path}/it'"'"'s $(x)')" && export T"""
