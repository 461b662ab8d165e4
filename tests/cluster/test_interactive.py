"""alloc, serve, attach and remote mode on the dev cluster, through a real sshd.

The sshd is this module's own (a fixture): started as the test user (hpcdl-alice) on a free
loopback port with its own host key and one authorized key, pinned in a known_hosts file. An
sshd run by a user lets in that user only, needs no root and does not touch the cluster or the
machine's own sshd, so the tests run as every other cluster test does (tests/run_as_user.sh),
beside other test files. "The laptop" is a process with its own HOME, site path and job root;
"the login node" is the same machine reached through that sshd, with its own job root."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli

pytestmark = pytest.mark.slurm
USER = os.environ.get("USER") or "hpcdl-alice"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float, why: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, f"port {port} never answered: {why}"
        time.sleep(0.1)


class Sshd:
    """An sshd of the test user's on loopback, with the files a client needs to reach it."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        for name in ("host", "user", "stranger"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)],
                           check=True, timeout=30)  # fmt: skip
        (folder / "authorized_keys").write_text((folder / "user.pub").read_text())
        self.port = _free_port()
        config = folder / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {folder}/host\n"
            f"AuthorizedKeysFile {folder}/authorized_keys\nPidFile {folder}/sshd.pid\n"
            "UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "AllowTcpForwarding local\nStrictModes no\nLogLevel VERBOSE\n"
        )
        self.known_hosts = folder / "known_hosts"
        host_key = " ".join((folder / "host.pub").read_text().split()[:2])
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_key}\n")
        self.log = folder / "sshd.log"
        subprocess.run(["/usr/sbin/sshd", "-f", str(config), "-E", str(self.log)], check=True,
                       timeout=30)  # fmt: skip
        _wait_port(self.port, 20, self.log.read_text() if self.log.exists() else "no log")
        self.pid = int((folder / "sshd.pid").read_text())

    def login(self, **changes: object) -> dict[str, object]:
        return {"host": f"{USER}@127.0.0.1", "port": self.port, "identity_file": str(self.dir / "user"),
                "known_hosts": str(self.known_hosts), "persist": "30s", **changes}  # fmt: skip

    def ssh(self) -> list[str]:
        """The options a laptop's ~/.ssh/config would give (key and pinned host key)."""
        return ["ssh", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i", str(self.dir / "user"),
                "-o", f"UserKnownHostsFile={self.known_hosts}"]  # fmt: skip


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    os.kill(server.pid, signal.SIGTERM)  # the listener; sessions end with their clients


class Laptop:
    """CLI calls from 'the laptop' (their own HOME, site path and job root) and from the login
    node itself (the job root the remote side uses)."""

    def __init__(self, base: Path, sshd: Sshd, devcluster: str, **login: object) -> None:
        self.home, self.sites, self.work = base / "home", base / "sites", base / "work"
        self.login_jobs = base / "login-jobs"
        for d in (self.home, self.sites, self.work):
            d.mkdir(parents=True, exist_ok=True)
        profile = yaml.safe_load((REPO / "hpcdl/sites/devcluster.yaml").read_text())
        command = (f"HPCDL_JOB_ROOT={shlex.quote(str(self.login_jobs))} "
                   f"PYTHONPATH={shlex.quote(str(REPO))} {shlex.quote(sys.executable)} -m hpcdl")  # fmt: skip
        profile["login"] = sshd.login(hpcdl=command, **login)
        (self.sites / "devcluster.yaml").write_text(yaml.safe_dump(profile))
        self.sshd = sshd
        # ssh's socket path must be short (pytest's folders are not): a private runtime folder
        # of the laptop's own, so that no two laptops of this module share a connection
        self.runtime = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))

    def env(self) -> dict[str, str]:
        return {"HOME": str(self.home), "HPCDL_SITE_PATH": str(self.sites), "HPCDL_SITE": "devcluster",
                "HPCDL_JOB_ROOT": str(self.home / "laptop-jobs"), "XDG_RUNTIME_DIR": str(self.runtime)}  # fmt: skip

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env=self.env(), cwd=self.work, timeout=timeout)

    def on_login_node(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env={"HPCDL_JOB_ROOT": str(self.login_jobs)}, timeout=120)

    def close(self) -> None:
        """End the shared connection (ControlPersist would keep it 30 s)."""
        subprocess.run([*self.sshd.ssh(), "-O", "exit", "-o", f"ControlPath={self.control()}/%C",
                        "-p", str(self.sshd.port), f"{USER}@127.0.0.1"],
                       capture_output=True, timeout=30)  # fmt: skip
        shutil.rmtree(self.runtime, ignore_errors=True)

    def control(self) -> Path:
        return self.runtime / "hpcdl-ssh"


@pytest.fixture(scope="module")
def laptop(tmp_path_factory, sshd, devcluster):
    side = Laptop(tmp_path_factory.mktemp("laptop"), sshd, devcluster)
    yield side
    side.close()
    from hpcdl.cli.remote import Remote
    from hpcdl.config import LoginNode

    shutil.rmtree(Path.home() / Remote(LoginNode(host="h")).workdir(side.work), ignore_errors=True)


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_remote_sweep_runs_and_reads_as_on_the_login_node(laptop):
    name = f"remote-{uuid.uuid4().hex[:6]}"
    spec = {"name": name, "objective": "tests.helpers.objectives:curve",
            "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
            "sampler": {"name": "random", "seed": 0}, "trials": 2, "parallelism": 1,
            "final": False, "resources": {"site": "devcluster", "time": "5m"}}  # fmt: skip
    (laptop.work / "sweep.yaml").write_text(yaml.safe_dump(spec))
    out = _ok(laptop.cli("sweep", "run", "sweep.yaml", "--wait", "--timeout", "240", timeout=300))
    assert "best trial" in out, out
    for command in (["sweep", "status", name], ["sweep", "best", name], ["status"]):
        assert _ok(laptop.cli(*command)) == _ok(laptop.on_login_node(*command)), command
    # the laptop kept nothing of the jobs; the login node has the shipped copy and the sweep
    assert not (laptop.home / "laptop-jobs").exists()
    copies = list((Path.home() / ".hpcdl/remote").glob("work-*/sweep.yaml"))
    assert any(yaml.safe_load(c.read_text())["name"] == name for c in copies)
    for path in (copies[0], copies[0].parent, copies[0].parent.parent):  # private there
        assert path.stat().st_mode & 0o077 == 0, path
    control = laptop.control()
    assert control.stat().st_mode & 0o777 == 0o700 and control.stat().st_uid == os.getuid()
    # results back on request
    _ok(laptop.cli("pull", str(laptop.login_jobs / "sweeps" / name), "back/"))
    assert json.loads((laptop.work / "back" / name / "spec.json").read_text())["name"] == name


def _tunnel(sshd: Sshd, line: str, local: int) -> subprocess.Popen[bytes]:
    """The printed ``ssh -N -L PORT:NODE:PORT [-p P] USER@HOST`` with the laptop's own options;
    laptop and node share this machine's loopback, so the local end gets a port of its own."""
    words = shlex.split(line.split("tunnel:", 1)[1].split("(on your laptop)")[0])
    assert words[:3] == ["ssh", "-N", "-L"], line
    remote_end = words[3].split(":", 1)[1]
    return subprocess.Popen([*sshd.ssh(), "-N", "-L", f"{local}:{remote_end}", *words[4:]],
                            stderr=subprocess.PIPE)  # fmt: skip


def test_served_folder_answers_through_an_ssh_tunnel(laptop):
    (laptop.work / "hello.txt").write_text("hello from the node\n")
    out = _ok(laptop.cli("serve", "files", ".", "-t", "5", "--wait", "60"))
    job = re.search(r"\(job (\d+);", out).group(1)
    try:
        assert f"-p {laptop.sshd.port} {USER}@127.0.0.1" in out, out
        token = re.search(r"token:\s+(\S+)", out).group(1)
        # the token is in the 0600 file the task wrote, and in no script, command file or log
        files = [f for f in laptop.login_jobs.rglob("*") if f.is_file()]
        holders = [f for f in files if token in f.read_text(errors="replace")]
        assert [f.parent.name for f in holders] == ["serve"], holders
        assert holders[0].stat().st_mode & 0o777 == 0o600
        local = _free_port()
        tunnel = _tunnel(laptop.sshd, next(ln for ln in out.splitlines() if "tunnel:" in ln), local)
        try:
            _wait_port(local, 20, "the tunnel's local end")
            url = f"http://127.0.0.1:{local}/{token}/hello.txt"
            with urllib.request.urlopen(url, timeout=10) as answer:
                assert answer.read() == b"hello from the node\n"
            with pytest.raises(urllib.error.HTTPError, match="403"):  # no token, no file
                urllib.request.urlopen(f"http://127.0.0.1:{local}/hello.txt", timeout=10)
        finally:
            tunnel.terminate()
            tunnel.wait(timeout=10)
    finally:
        assert _ok(laptop.cli("cancel", job)).strip() == f"cancelled {job}"


def test_serve_on_a_port_in_use_is_one_line(laptop, devcluster):
    with socket.socket() as busy:  # the nodes are this machine: a port taken on every node
        busy.bind(("0.0.0.0", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = run_cli("serve", "files", ".", "--site", devcluster, "-t", "2", "--port", str(port),
                       "--wait", "60", cwd=laptop.work)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert re.fullmatch(rf"error: --port: port {port} is in use on node\d \(Address already in use\): "
                        r"choose another, or leave --port out for a free one\n", proc.stderr)  # fmt: skip


@pytest.mark.parametrize(
    "label,login,expected",
    [
        ("unreachable host", {"port": 1}, r"ssh: connect to host 127.0.0.1 port 1: Connection refused"),
        ("refused key", {"identity_file": "stranger"}, r"Permission denied \(publickey\)\."),
        ("unknown host key", {"known_hosts": "/dev/null"}, r"Host key verification failed\. \(add its key"),
    ],
)  # fmt: skip
def test_remote_bad_login_is_one_line(tmp_path, sshd, devcluster, label, login, expected):
    if "identity_file" in login:
        login = {"identity_file": str(sshd.dir / login["identity_file"])}
    side = Laptop(tmp_path, sshd, devcluster, **login)
    proc = side.cli("status", timeout=60)
    side.close()
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert re.match(rf"error: remote {USER}@127.0.0.1: .*{expected}", proc.stderr), proc.stderr


def test_alloc_runs_on_the_first_node(devcluster):
    proc = run_cli("alloc", "--site", devcluster, "-N", "2", "-t", "2", "--",
                   "sh", "-c", "echo nodes=$SLURM_JOB_NODELIST here=$SLURMD_NODENAME", timeout=120)  # fmt: skip
    out = _ok(proc)
    from hpcdl.hostlist import expand_hostlist as expand

    nodes, here = re.search(r"nodes=(\S+) here=(\S+)", out).groups()
    assert len(expand(nodes)) == 2 and here == expand(nodes)[0], out
    assert "Granted job allocation" in proc.stderr


def test_attach_follows_every_task_until_the_job_ends(devcluster):
    script = "for i in 1 2 3; do echo line$i rank$SLURM_PROCID; sleep 1; done; echo oops >&2"
    job = _ok(run_cli("submit", "--site", devcluster, "-n", "2", "-t", "2", "--parsable", "--",
                      "sh", "-c", script)).strip()  # fmt: skip
    start = time.monotonic()
    proc = run_cli("attach", job, timeout=120)
    out = _ok(proc)
    for rank in (0, 1):
        assert [ln for ln in out.splitlines() if ln.startswith(f"[{rank}]")] == [
            f"[{rank}] line{i} rank{rank}" for i in (1, 2, 3)], out  # fmt: skip
        assert f"[{rank}] oops" in proc.stderr
    assert time.monotonic() - start < 110
    one = _ok(run_cli("attach", job, "--task", "1"))  # the job has ended: its output, then back
    assert one.splitlines() == [f"line{i} rank1" for i in (1, 2, 3)]


def test_alloc_refused_by_slurm_is_one_line(devcluster):
    """What hpcdl cannot check itself (no such reservation): salloc's reason, as one line."""
    proc = run_cli(
        "alloc", "--site", devcluster, "--reservation", "nosuch", "-t", "1", "--", "true"
    )
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr == ("error: salloc refused the allocation: Job submit/allocate failed: "
                           "Requested reservation is invalid\n")  # fmt: skip
