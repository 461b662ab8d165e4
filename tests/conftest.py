"""Shared fixtures: an isolated job root per test, the dev cluster once per session."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
HPCDL = str(Path(sys.executable).parent / "hpcdl")
sys.path.insert(0, str(REPO))  # `tests.helpers` importable here and (via PYTHONPATH) in jobs
REPORT = str(REPO / "tests/helpers/report.py")

from tests.helpers import cluster_share as cluster_share_lock  # noqa: E402  (after sys.path)
from tests.helpers.cluster_share import ClusterShare  # noqa: E402

pytest_plugins = ["tests.helpers.timeline"]  # HPCDL_TEST_TIMELINE=FILE: where the wall time goes

# The test files that take longest in the cluster phase (as the test user) and in the local
# phase (root, no cluster), longest first (measured with HPCDL_TEST_TIMELINE; development docs).
# With two xdist workers taking a file at a time (make test passes --dist loadfile
# --no-loadscope-reorder), starting with the longest keeps one worker from finishing a long file
# alone at the end while the other waits. test_checkpointable comes late: it takes the "preempt"
# lock that test_train_slurm holds for its whole run.
LONGEST_FIRST = [
    "test_sweep_slurm.py",
    "test_train_slurm.py",
    "test_docs_walk.py",
    "test_bring_your_script.py",
    "test_chaos.py",
    "test_sweep_train.py",
    "test_resize.py",
    "test_sweep_postgres.py",
    "test_train.py",
    "test_slurm_jobs.py",
    "test_interactive.py",
    "test_registry_scale.py",
    "test_gloo_exit.py",
    "test_study_scale.py",
    "test_trust.py",
    "test_sweep_local.py",
    "test_script_values.py",
    "test_redaction.py",
    "test_direct_commands.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # one process: the order changes nothing
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file


# Values that would execute or split if they ever went through a shell.
WEIRD = [
    "two words",
    'it\'s "quoted"',
    "$(touch /tmp/pwned-hpcdl)",
    "`id`",
    "line1\nline2",
    "*",
    ";ls",
]


@pytest.fixture(autouse=True)
def job_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own job root and registry, and sees only the repo's site profiles."""
    root = tmp_path / "jobs"
    monkeypatch.setenv("HPCDL_JOB_ROOT", str(root))
    monkeypatch.setenv("HPCDL_SITE_PATH", str(REPO / "hpcdl/sites"))
    monkeypatch.delenv("HPCDL_SITE", raising=False)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    return root


UNIT_TESTS = REPO / "tests/unit"


def _refuse_process(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("a unit test starts no process (move it to tests/cluster)")


@pytest.fixture(autouse=True)
def unit_tests_start_no_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """tests/unit runs in milliseconds and anywhere: any attempt to start a process fails."""
    path = Path(str(request.node.path))
    if UNIT_TESTS in path.parents or os.environ.get("HPCDL_TEST_REFUSE_PROCESSES"):
        monkeypatch.setattr(subprocess.Popen, "__init__", _refuse_process)
        for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "execv", "execve"):
            monkeypatch.setattr(os, name, _refuse_process)
    yield


_SHARE: ClusterShare | None = None


@pytest.fixture(scope="module", autouse=True)
def cluster_share(request: pytest.FixtureRequest) -> Iterator[None]:
    """A module with cluster tests holds the dev cluster shared while it runs (its module
    fixtures' jobs included), after the named locks it asks for: tests/helpers/cluster_share.py
    says why and how tests run side by side (pytest-xdist)."""
    global _SHARE
    module = request.node
    if not any(
        i.get_closest_marker("slurm") for i in request.session.items if i.module is request.module
    ):
        yield
        return
    names = sorted({m.args[0] for m in module.iter_markers(name="cluster_lock")})  # pytestmark
    with contextlib.ExitStack() as held:
        for name in names:  # before the share: a module waiting here holds nothing
            held.enter_context(cluster_share_lock.named(name))
        _SHARE = _SHARE or ClusterShare()
        held.enter_context(_SHARE.shared())
        yield


@pytest.fixture(autouse=True)
def cluster_test_locks(request: pytest.FixtureRequest) -> Iterator[None]:
    """``@pytest.mark.cluster_exclusive``: this test has the dev cluster to itself.
    ``@pytest.mark.cluster_lock("NAME")`` on a test (not its module): held for that test only,
    beside its module's share (after the module's own named locks, so no two wait on each other
    in a cycle)."""
    own = request.node.own_markers  # the test's and its parameter's marks, not the module's
    names = sorted({m.args[0] for m in own if m.name == "cluster_lock"})
    with contextlib.ExitStack() as held:
        for name in names:
            held.enter_context(cluster_share_lock.named(name))
        if request.node.get_closest_marker("cluster_exclusive") is not None and _SHARE is not None:
            held.enter_context(_SHARE.exclusive_instead_of_shared())
        yield


@pytest.fixture(scope="session")
def devcluster() -> str:
    """Start (idempotently) the project's Slurm cluster; fail with the script's output if it can't."""
    if not os.environ.get("HPCDL_CLUSTER_STARTED"):
        proc = subprocess.run(
            [str(REPO / "slurm/devcluster/devcluster.sh"), "up"],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0:
            pytest.fail(f"devcluster up failed:\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    return "devcluster"


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
):
    """Run ``hpcdl ARGS`` in a fresh process."""
    return subprocess.run(
        [HPCDL, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def one_line_error(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    """The CLI's answer to bad input: exit status 2 and one ``error: ...`` line on stderr, no
    traceback anywhere; returns that line."""
    out = capsys.readouterr()
    assert rc == 2, out
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in out.err + out.out
    return lines[0]


def sacct(job_id: str) -> list[dict[str, str]]:
    """One row per allocation (array tasks included) with start/end times."""
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "JobID,State,Start,End,NodeList", "-j", job_id],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    keys = ["id", "state", "start", "end", "nodes"]
    return [dict(zip(keys, line.split("|"), strict=True)) for line in out.splitlines()]


_RELEASED: dict[str, float] = {}  # job id -> when release_requeued last moved its start


def release_requeued(job_id: str, *extra: str) -> bool:
    """Start a job Slurm requeued (held ~2 minutes: reason ``BeginTime``) in 3 s; ``extra`` are
    more ``scontrol update`` fields. Not "now": a start in the second of the requeue gets a
    credential slurmd still counts as revoked ("Job credential revoked"), and the job fails.
    A start already moved near (less than 10 s away) is left alone, so calling this in a polling
    loop does not push it back. True when it moved the start."""
    out = subprocess.run(["squeue", "-h", "-o", "%r|%S", "-j", job_id], capture_output=True,
                         text=True, timeout=30).stdout.strip()  # fmt: skip
    reason, _, start = out.partition("|")
    if reason != "BeginTime":
        return False
    try:
        wait = datetime.fromisoformat(start).timestamp() - time.time()
    except ValueError:
        wait = float("inf")  # N/A: squeue shows that in the second before a start, too
    # Once per 15 s at most: moved at every poll while the start read N/A, it was pushed back
    # 14 times in 40 s (wt-elastic's test).
    if wait < 10 or time.monotonic() - _RELEASED.get(job_id, -1e9) < 15:
        return False
    _RELEASED[job_id] = time.monotonic()
    proc = subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+3", *extra],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    if "no longer pending" in proc.stderr:  # it started between squeue and scontrol
        return False
    assert proc.returncode == 0, f"scontrol update {job_id}: {proc.stderr}"
    return True


def sacct_finished(job_id: str, count: int, timeout: float = 60) -> list[dict[str, str]]:
    """sacct rows once all ``count`` allocations have an end time (accounting lags a little)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = sacct(job_id)
        if len(rows) >= count and all(r["end"] not in {"Unknown", "None"} for r in rows):
            return rows
        assert time.monotonic() < deadline, f"sacct never showed {count} finished rows: {rows}"
        time.sleep(1)


# -- single-process trainings (world size 1, gloo), shared by the trainer, export and
# preemption test modules -------------------------------------------------------------------
def release_deepspeed_groups() -> None:
    """Forget the process groups DeepSpeed cached (its clone of the world group...): after
    ``dist.destroy_process_group`` they are dead, and the next module's engine would use them
    ("Group ... is not registered"). ``deepspeed.comm.destroy_process_group`` does this too."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        groups._release_process_group_references()


@pytest.fixture(scope="module")
def world1() -> Iterator[None]:
    """One rank in this process (gloo), as the trainer unit tests have it; DeepSpeed's cached
    groups are released before (another module may have left them) and after."""
    import socket

    import torch
    import torch.distributed as dist

    release_deepspeed_groups()
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith(("SLURM_", "SUBMITIT_", "PMI", "OMPI_", "PMIX_", "MPI_")):
                mp.delenv(key)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
               "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "NODE_RANK": "0",
               "OMP_NUM_THREADS": "1"}  # fmt: skip
        for key, value in env.items():
            mp.setenv(key, value)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            if dist.is_initialized():
                dist.destroy_process_group()
            release_deepspeed_groups()


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 learnable 8x8 uint8 samples of 4 classes: 480 train (15 steps of 32), 120 val."""
    from hpcdl.data.sources import SynthSource
    from hpcdl.data.writer import write_shards

    out = tmp_path_factory.mktemp("synth")
    write_shards(SynthSource(600, (1, 8, 8), "uint8", 4), out, val=0.2, chunk_size="1KiB")
    return out


# -- other users (slurm/devcluster/devcluster.sh up creates them) ---------------------------
USER_A, USER_B, OPERATOR = "hpcdl-alice", "hpcdl-bob", "hpcdl-op"
USERS_GROUP = "hpcdl-users"
VENV_BIN = Path(sys.executable).parent
RUNUSER = "/usr/sbin/runuser"  # an absolute path: the users' PATH has no sbin
# `scontrol` for what only a Slurm administrator may do (a node's state): as is for root, else
# through sudo as the operator, hpcdl-op (devcluster.sh gives the test users that one rule), so
# the tests that set a node DOWN run as an unprivileged user too.
OPERATOR_SCONTROL = (
    ["scontrol"] if os.geteuid() == 0 else ["sudo", "-n", "-u", OPERATOR, "scontrol"]
)


class AsUser:
    """Commands as another Unix user (``runuser``, so the tests must run as root, or as that
    user itself), with a clean environment: the venv's ``bin`` first on PATH, the user's HOME,
    this checkout on PYTHONPATH, the repo's site profiles and a job root of the user's own."""

    def __init__(self, user: str, work: Path) -> None:
        import pwd

        self.user = user
        entry = pwd.getpwnam(user)
        self.uid, self.gid, self.home = entry.pw_uid, entry.pw_gid, Path(entry.pw_dir)
        self.work = work  # the user's own folder (0755) in a shared, sticky place
        self.job_root = work / "jobs"

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home),
            "USER": self.user,
            "LOGNAME": self.user,
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(REPO),
            "HPCDL_JOB_ROOT": str(self.job_root),
            "HPCDL_SITE_PATH": str(REPO / "hpcdl/sites"),
            "OMP_NUM_THREADS": "1",
            "WANDB_SILENT": "true",
        }
        if os.environ.get("HPCDL_CLUSTER_STARTED"):
            env["HPCDL_CLUSTER_STARTED"] = "1"
        return {**env, **extra}

    def argv(self, *cmd: str) -> list[str]:
        if os.geteuid() == self.uid:
            return list(cmd)
        if os.geteuid() != 0:
            pytest.fail(
                f"acting as {self.user} needs root (runuser); this test runs as uid "
                f"{os.geteuid()}: run it as root (tests/run_as_user.sh is for single-user modules)",
                pytrace=False,
            )
        return [RUNUSER, "-u", self.user, "--", *cmd]

    def run(
        self, *cmd: str, timeout: float = 120, cwd: Path | None = None, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` as the user (in ``cwd``, default its work folder); output captured."""
        return subprocess.run(self.argv(*cmd), capture_output=True, text=True, timeout=timeout,
                              env=self.env(**env), cwd=cwd or self.work)  # fmt: skip

    def python(self, code: str, *args: str, timeout: float = 300, **env: str):
        """``python -c CODE ARGS`` as the user (the venv's interpreter)."""
        return self.run(sys.executable, "-c", code, *args, timeout=timeout, **env)

    def hpcdl(self, *args: str, timeout: float = 180, **env: str):
        """``hpcdl ARGS`` as the user."""
        return self.run(HPCDL, *args, timeout=timeout, **env)


def check_usable_by(user: AsUser) -> None:
    """Fail with what to do when ``user`` cannot run this venv's Python or import this
    checkout's hpcdl (a parent folder it cannot cross: a pyenv under /root, a checkout in a
    private folder)."""
    proc = user.python("import hpcdl, sys; print(hpcdl.__file__)", timeout=120)
    expected = str(REPO / "hpcdl" / "__init__.py")
    if proc.returncode != 0 or proc.stdout.strip() != expected:
        python = os.path.realpath(sys.executable)
        pytest.fail(
            f"{user.user} cannot run {sys.executable} (-> {python}) or import hpcdl from {REPO} "
            f"(got {proc.stdout.strip() or proc.stderr.strip()[-300:]!r}); every parent folder "
            f"must be crossable by group {USERS_GROUP}: as root, "
            f"'slurm/devcluster/devcluster.sh grant {python} {REPO}'",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def users(devcluster: str) -> Iterator[dict[str, AsUser]]:
    """``{"a": alice, "b": bob}``: two unprivileged users of one group, each with a work folder
    of its own (mode 0755, as a site's scratch folders often are: only the modes hpcdl gives its
    files protect them) under one sticky, world-writable folder in /tmp; removed at the end."""
    import grp
    import pwd
    import shutil
    import tempfile

    if os.geteuid() != 0:
        pytest.fail(f"two users need root (runuser to {USER_A} and {USER_B}); this runs as uid "
                    f"{os.geteuid()}: run this module as root, not through tests/run_as_user.sh",
                    pytrace=False)  # fmt: skip
    for name in (USER_A, USER_B):
        try:
            pwd.getpwnam(name)
        except KeyError:
            pytest.fail(f"no user {name}: run 'slurm/devcluster/devcluster.sh up' as root",
                        pytrace=False)  # fmt: skip
    base = Path(tempfile.mkdtemp(prefix="hpcdl-users-", dir="/tmp"))
    base.chmod(0o1777)
    made = {}
    for key, name in (("a", USER_A), ("b", USER_B)):
        work = base / name
        work.mkdir(mode=0o755)
        os.chown(work, pwd.getpwnam(name).pw_uid, grp.getgrnam(USERS_GROUP).gr_gid)
        made[key] = AsUser(name, work)
    for user in made.values():
        check_usable_by(user)
    yield made
    shutil.rmtree(base, ignore_errors=True)


# -- fixtures shared by a unit test file and its cluster counterpart -----------------------------
SPLIT_SITE = "devcluster-tiny-arrays"  # the dev cluster's profile with max_array_size 4


@pytest.fixture
def split_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The dev cluster's profile with max_array_size 4, found first on the site search path."""
    site_dir = tmp_path / "sites"
    site_dir.mkdir()
    data = yaml.safe_load((REPO / "hpcdl/sites/devcluster.yaml").read_text())
    data.update(name=SPLIT_SITE, max_array_size=4)
    (site_dir / f"{SPLIT_SITE}.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("HPCDL_SITE_PATH", f"{site_dir}:{REPO / 'hpcdl/sites'}")
    return SPLIT_SITE


@pytest.fixture
def no_port_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HPCDL_MASTER_PORT", raising=False)


def devcluster_profile_with(tmp_path: Path, **policies: dict) -> Path:
    """The dev cluster's profile with ``policy`` (and ``features``) set on some partitions."""
    data = yaml.safe_load((REPO / "hpcdl/sites/devcluster.yaml").read_text())
    for part in data["partitions"]:
        part.update(policies.get(part["name"], {}))
    path = tmp_path / "devcluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# A small valid site profile (as data) that tests change one field at a time.
GOOD_SITE = {
    "name": "t",
    "scheduler": "slurm",
    "partitions": [
        {"name": "cpu", "default": True, "max_time": "02:00:00", "max_nodes": 4, "cpus_per_node": 4,
         "mem_per_node": "4000M"},
        {"name": "gpu", "max_time": "01:00:00", "max_nodes": 2, "cpus_per_node": 4,
         "gpus_per_node": 2},
    ],
}  # fmt: skip


def site_data(**changes: object) -> dict:
    """GOOD_SITE with changes (``p0_FIELD``: a field of the first partition)."""
    data = yaml.safe_load(yaml.safe_dump(GOOD_SITE))
    for key, value in changes.items():
        if key.startswith("p0_"):
            data["partitions"][0][key[3:]] = value
        else:
            data[key] = value
    return data


# A partition and the warning text the site-warning tests (unit and live) share.
SITE_CPU_PARTITION = {"name": "cpu", "default": True, "max_time": "1-00:00:00", "max_nodes": 4,
       "cpus_per_node": 4, "mem_per_node": "4000M"}  # fmt: skip
REFUSED_DEFAULT = "every job given this default there is refused by sbatch"
