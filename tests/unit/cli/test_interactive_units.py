"""alloc, serve and remote mode, the parts that start no process: salloc's command line, its
refusals, the ``login:`` entry, which login node a command line goes to, the socket folder, and
the one-line errors hpcdl gives before anything is queued or connected."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import GOOD_SITE, one_line_error

from hpcdl.cli import main
from hpcdl.cli.remote import Remote, control_dir, login_for, split_remote
from hpcdl.config import LoginNode
from hpcdl.scheduler.interactive import refusal, salloc_argv
from hpcdl.site import SiteProfile

SALLOC = [
    ("minimal", {"job_name": "alloc", "partition": "cpu", "nodes": 1, "time": 30}, ["x"],
     ["salloc", "--job-name=alloc", "--partition=cpu", "--nodes=1", "--time=30",
      "srun", "--nodes=1", "--ntasks=1", "--", "x"]),
    ("gpus, account, batch-only options dropped",
     {"partition": "gpu", "gpus_per_node": "2", "account": "a", "setup": ["module load x"],
      "signal_delay_s": 60, "additional_parameters": {"export": "ALL", "requeue": True,
                                                      "constraint": "amd", "exclusive": True}},
     ["x"],
     ["salloc", "--partition=gpu", "--gpus-per-node=2", "--account=a", "--constraint=amd",
      "--exclusive", "srun", "--nodes=1", "--ntasks=1", "--", "x"]),
]  # fmt: skip


@pytest.mark.parametrize("label,params,command,expected", SALLOC, ids=[s[0] for s in SALLOC])
def test_salloc_argv(label, params, command, expected):
    assert salloc_argv(params, command) == expected


def test_salloc_without_command_is_a_login_shell_under_a_pty(monkeypatch):
    monkeypatch.setenv("SHELL", "/bin/zsh")
    assert salloc_argv({"nodes": 2}, [])[-6:] == [
        "srun", "--nodes=1", "--ntasks=1", "--pty", "/bin/zsh", "-l"
    ]  # fmt: skip


REFUSALS = [
    ("none", ["salloc: Granted job allocation 7"], None),
    ("last error wins",
     ["salloc: error: Job submit/allocate failed: x", "salloc: error: Invalid account"],
     "Invalid account"),
]  # fmt: skip


@pytest.mark.parametrize("label,lines,expected", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusal(label, lines, expected):
    assert refusal(lines) == expected


LOGINS = [
    ("string", "alice@login1", None),
    ("host only", "login1.example.org", None),
    ("mapping", {"host": "a@h", "port": 2222, "known_hosts": "~/.ssh/kh"}, None),
    ("option injection", "-oProxyCommand=touch /tmp/x", "is not user@host"),
    ("user option", "-l@h", "is not user@host"),
    ("shell", "a@h;rm", "is not user@host"),
    ("space", "a@h x", "is not user@host"),
    ("port", {"host": "h", "port": 0}, "greater than or equal to 1"),
    ("persist", {"host": "h", "persist": "forever"}, "e.g. 10m"),
    ("unknown key", {"host": "h", "password": "x"}, "Extra inputs"),
]  # fmt: skip


@pytest.mark.parametrize("label,entry,error", LOGINS, ids=[x[0] for x in LOGINS])
def test_login_entry(label, entry, error):
    data = {**GOOD_SITE, "login": entry}
    if error is None:
        assert isinstance(SiteProfile.model_validate(data).login, LoginNode)
    else:
        with pytest.raises(ValueError, match=error):
            SiteProfile.model_validate(data)


@pytest.mark.parametrize(
    "argv,host,rest",
    [
        (["status"], None, ["status"]),
        (["--remote", "a@h", "status"], "a@h", ["status"]),
        (["--remote=a@h", "sweep", "status", "x"], "a@h", ["sweep", "status", "x"]),
    ],
)
def test_split_remote(argv, host, rest):
    assert split_remote(argv) == (host, rest)


@pytest.fixture()
def laptop_sites(tmp_path, monkeypatch):
    """A site path with 'far' (a login: entry) and 'near' (none)."""
    far = {**GOOD_SITE, "name": "far", "login": {"host": "alice@login1", "port": 2222}}
    (tmp_path / "far.yaml").write_text(yaml.safe_dump(far))
    (tmp_path / "near.yaml").write_text(yaml.safe_dump({**GOOD_SITE, "name": "near"}))
    monkeypatch.setenv("HPCDL_SITE_PATH", str(tmp_path))
    monkeypatch.delenv("HPCDL_SITE", raising=False)
    monkeypatch.delenv("HPCDL_NO_REMOTE", raising=False)


ROUTES = [
    ("no site, no remote", {}, ["status"], None),
    ("site with login", {}, ["submit", "--site", "far", "--", "true"], ("alice@login1", 2222)),
    ("site= with login", {}, ["submit", "--site=far", "--", "true"], ("alice@login1", 2222)),
    ("a profile's path", {}, ["submit", "--site", "{sites}/far.yaml"], ("alice@login1", 2222)),
    ("site without login", {}, ["submit", "--site", "near", "--", "true"], None),
    ("--site after --", {}, ["submit", "--site", "near", "--", "x", "--site", "far"], None),
    ("$HPCDL_SITE", {"HPCDL_SITE": "far"}, ["status"], ("alice@login1", 2222)),
    ("--remote over the profile's host, keeps its port", {},
     ["--remote", "bob@login2", "submit", "--site", "far"], ("bob@login2", 2222)),
    ("--remote alone", {}, ["--remote", "bob@login2", "status"], ("bob@login2", None)),
    ("on the login node itself", {"HPCDL_NO_REMOTE": "1", "HPCDL_SITE": "far"}, ["status"], None),
    ("unknown site: the command says so", {}, ["submit", "--site", "nosuch"], None),
]  # fmt: skip


@pytest.mark.parametrize("label,env,argv,expected", ROUTES, ids=[r[0] for r in ROUTES])
def test_login_for(laptop_sites, monkeypatch, label, env, argv, expected):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    login, _ = login_for([a.replace("{sites}", os.environ["HPCDL_SITE_PATH"]) for a in argv])
    assert (login.host, login.port) == expected if expected else login is None


def test_bad_remote_is_one_line(laptop_sites, capsys):
    line = one_line_error(capsys, main(["--remote", "-oProxyCommand=x", "status"]))
    assert line.startswith("error: --remote: host: ") and "is not user@host" in line


@pytest.fixture()
def short_home():
    """A home whose path is short enough for the socket (pytest's tmp_path may not be)."""
    home = tempfile.mkdtemp(prefix="h", dir="/tmp")
    yield home
    shutil.rmtree(home)


def test_ssh_options_check_host_keys_and_keep_one_connection(short_home, monkeypatch):
    tmp_path = Path(short_home)
    monkeypatch.setenv("HOME", short_home)
    login = LoginNode(host="a@h", port=2222, identity_file="~/k", known_hosts="~/kh")
    opts = Remote(login).ssh_options()
    joined = " ".join(opts)
    assert "StrictHostKeyChecking" not in joined  # ssh's default: ask, and BatchMode refuses
    assert "BatchMode=yes" in joined and "ControlMaster=auto" in joined
    assert f"ControlPath={control_dir()}/%C" in joined
    assert f"UserKnownHostsFile={tmp_path}/kh" in joined and f"-i {tmp_path}/k" in joined
    assert Remote(login).login_ssh() == "-p 2222 a@h"


def test_control_dir_is_private(short_home, monkeypatch):
    home = short_home
    monkeypatch.setenv("HOME", home)
    (Path(home) / ".hpcdl/ssh").mkdir(parents=True, mode=0o755)
    folder = control_dir()
    assert folder == Path(home) / ".hpcdl/ssh" and folder.stat().st_mode & 0o777 == 0o700


def test_control_dir_for_a_long_home_is_ours_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / ("x" * 80)))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    expected = Path(f"/tmp/hpcdl-ssh-{os.getuid()}")
    existed = expected.exists()
    folder = control_dir()
    assert folder == expected and folder.stat().st_mode & 0o777 == 0o700
    if not existed:
        folder.rmdir()  # /tmp left as it was
    assert len(f"{folder}/" + "c" * 40 + ".0123456789abcdef") < 108  # ssh's master socket


def test_workdir_is_one_per_local_folder():
    remote = Remote(LoginNode(host="h"))
    a, b = remote.workdir(Path("/x/proj")), remote.workdir(Path("/y/proj"))
    assert a.startswith(".hpcdl/remote/proj-") and a != b
    assert remote.workdir(Path("/x/-rf")).split("/")[-1].startswith("rf-")


def test_alloc_refused_by_policy_before_salloc(capsys):
    line = one_line_error(capsys, main(["alloc", "--site", "devcluster", "-p", "gpu", "-t", "5h"]))
    assert line == "error: command line: time: 5h exceeds partition 'gpu' limit 04:00:00"


def test_alloc_needs_a_slurm_site(capsys):
    line = one_line_error(capsys, main(["alloc", "--site", "local", "-t", "5"]))
    assert "'hpcdl alloc' needs a Slurm site; 'local' runs jobs on this machine" in line


def test_serve_without_jupyter_names_what_to_install(capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    line = one_line_error(capsys, main(["serve", "jupyter", "--site", "devcluster"]))
    assert line == ("error: jupyter: 'jupyter' is not installed here: pip install jupyterlab "
                    "(in the environment jobs run in)")  # fmt: skip


def test_serve_dashboard_of_no_sweep(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HPCDL_JOB_ROOT", str(tmp_path))
    line = one_line_error(capsys, main(["serve", "dashboard", "nosuch", "--site", "devcluster"]))
    assert "no sweep named 'nosuch'" in line


def test_pull_without_a_login_node(capsys, laptop_sites):
    line = one_line_error(capsys, main(["pull", "x"]))
    assert "pull: brings files back from a login node: give --remote user@host" in line


def test_alloc_refused_by_the_partitions_policy(tmp_path, capsys):
    site = {
        **GOOD_SITE,
        "partitions": [{**GOOD_SITE["partitions"][0], "policy": {"denied": ["exclusive"]}}],
    }
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(site))
    line = one_line_error(capsys, main(["alloc", "--site", str(path), "--exclusive", "-t", "5"]))
    assert (
        line
        == "error: command line: exclusive: partition 'cpu' does not allow --exclusive (site policy)"
    )


def test_serve_refused_writes_nothing(capsys, job_root, tmp_path):
    line = one_line_error(capsys, main(["serve", "files", str(tmp_path), "--site", "devcluster",
                                        "-p", "gpu", "-t", "5h"]))  # fmt: skip
    assert line == "error: command line: time: 5h exceeds partition 'gpu' limit 04:00:00"
    assert not job_root.exists()
