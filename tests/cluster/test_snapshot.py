"""Code snapshots (``snapshot: git|rsync|none``) and submitit's ``checkpoint()`` protocol through
hpcdl's task wrapper: what is copied and recorded, bad inputs, the render line, and on the dev
cluster an array edited after submission and a Checkpointable callable preempted by USR2."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, release_requeued

from hpcdl import Job
from hpcdl.cli import main
from hpcdl.runner import Task
from hpcdl.site import load_site
from hpcdl.snapshot import DEFAULT_EXCLUDE, Snapshot
from tests.helpers.checkpointable import Counter, plain, where


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A committed project: a script in sub/, a module at the top, tracked data; then an
    uncommitted edit, an untracked file and a cache folder."""
    root = tmp_path / "proj"
    (root / "sub").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "sub/run.py").write_text("import lib\nprint('version', lib.VERSION)\n")
    (root / "lib.py").write_text("VERSION = 1\n")
    (root / "data/big.csv").write_text("1,2\n")
    (root / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    (root / "tool.sh").chmod(0o755)
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "v1")
    (root / "lib.py").write_text("VERSION = 2\n")  # uncommitted: goes in (and into the diff)
    (root / "notes.txt").write_text("untracked\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__/lib.cpython-311.pyc").write_bytes(b"\0")
    return root


def files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}


def staged(repo: Path, tmp_path: Path, spec: object, cwd: Path | None = None) -> tuple[Job, Path]:
    folder = tmp_path / "jobfolder"
    folder.mkdir(parents=True, exist_ok=True)
    job = Job(command=["python3", "run.py"], cwd=str(cwd or repo / "sub"), snapshot=spec)
    return job.staged(load_site("local"), folder), folder


# -- what is copied and recorded ----------------------------------------------------------------
def test_git_snapshot_copies_tracked_files_as_on_disk_and_records_commit_and_diff(repo, tmp_path):
    job, folder = staged(repo, tmp_path, "git")
    code = folder / "code"
    assert files(code) == {"sub/run.py", "lib.py", "tool.sh"}  # data/ excluded, untracked not
    assert (code / "lib.py").read_text() == "VERSION = 2\n"  # the working tree, not HEAD
    assert os.access(code / "tool.sh", os.X_OK)
    assert job.cwd == str(code / "sub")
    record = json.loads((folder / "snapshot.json").read_text())
    assert record["commit"] == git(repo, "rev-parse", "HEAD").strip()
    assert record["source"] == str(repo.resolve()) and record["workdir"] == "sub"
    assert record["dirty"] and record["files"] == 3 and record["untracked_not_copied"] >= 1
    assert (folder / "snapshot.diff").read_text() == git(repo, "diff", "--binary", "HEAD")
    assert "+VERSION = 2" in (folder / "snapshot.diff").read_text()
    # the tasks start in the copy, with the copy ahead on PYTHONPATH
    lines = job.setup_lines(load_site("local"))
    assert f"cd {code / 'sub'}" in lines
    assert any(ln.startswith(f"export PYTHONPATH={code}${{PYTHONPATH") for ln in lines)


def test_rsync_snapshot_takes_untracked_files_minus_the_excludes(repo, tmp_path):
    _, folder = staged(repo, tmp_path, {"mode": "rsync", "exclude": ["*.txt", ".git"]})
    got = files(folder / "code")
    assert {"sub/run.py", "lib.py", "data/big.csv", "__pycache__/lib.cpython-311.pyc"} <= got
    assert "notes.txt" not in got and not any(f.startswith(".git/") for f in got)
    _, folder2 = staged(repo, tmp_path / "b", "rsync")  # the default excludes
    got = files(folder2 / "code")
    assert got == {"sub/run.py", "lib.py", "tool.sh", "notes.txt"}
    assert json.loads((folder2 / "snapshot.json").read_text())["exclude"] == list(DEFAULT_EXCLUDE)


def test_anchored_and_path_excludes_apply_to_git_snapshots(repo, tmp_path):
    spec = {"mode": "git", "exclude": ["/tool.sh", "data/*.csv", "/run.py"]}
    _, folder = staged(repo, tmp_path, spec)
    assert files(folder / "code") == {"lib.py", "sub/run.py"}  # "/run.py": only at the top


def test_a_job_root_inside_the_project_is_not_copied_into_itself(repo, tmp_path):
    folder = repo / "jobs/one"
    folder.mkdir(parents=True)
    (repo / "jobs/old.txt").write_text("x")
    job = Job(command=["python3", "run.py"], cwd=str(repo / "sub"), snapshot="rsync")
    job.staged(load_site("local"), folder)
    got = files(folder / "code")
    assert "jobs/old.txt" in got and not any(f.startswith("jobs/one") for f in got)


def test_outside_git_rsync_copies_the_working_directory(tmp_path):
    work = tmp_path / "plain"
    work.mkdir()
    (work / "run.py").write_text("print(1)\n")
    job, folder = staged(work, tmp_path, "rsync", cwd=work)
    assert files(folder / "code") == {"run.py"} and job.cwd == str(folder / "code")
    assert json.loads((folder / "snapshot.json").read_text())["commit"] is None


def test_a_job_submitted_from_a_snapshotted_job_copies_the_same_code(repo, tmp_path):
    """A sweep's follow-up job submits the next round from inside its own copy (no git there):
    the new job gets that copy again, with the first snapshot's commit and diff."""
    first, folder = staged(repo, tmp_path / "first", "git")
    (repo / "lib.py").write_text("VERSION = 9\n")  # the live tree moved on
    again, folder2 = staged(repo, tmp_path / "second", "git", cwd=Path(first.cwd or ""))
    assert files(folder2 / "code") == files(folder / "code")
    assert (folder2 / "code/lib.py").read_text() == "VERSION = 2\n"
    assert again.cwd == str(folder2 / "code/sub")
    record = json.loads((folder2 / "snapshot.json").read_text())
    assert record["commit"] == git(repo, "rev-parse", "HEAD").strip()
    assert record["copy_of"] == str(folder)
    assert (folder2 / "snapshot.diff").read_text() == (folder / "snapshot.diff").read_text()


def test_snapshot_comes_from_the_site_unless_the_job_sets_one(repo, tmp_path):
    site = load_site("local").model_copy(update={"snapshot": Snapshot(mode="git")})
    folder = tmp_path / "f"
    folder.mkdir()
    job = Job(command=["python3", "run.py"], cwd=str(repo / "sub"))
    assert job.staged(site, folder).cwd == str(folder / "code/sub")
    off = Job(command=["python3", "run.py"], cwd=str(repo / "sub"), snapshot="none")
    assert off.staged(site, folder) is off


# -- the render line ------------------------------------------------------------------------------
def test_render_says_which_snapshot_will_run(repo, monkeypatch, capsys):
    monkeypatch.chdir(repo / "sub")
    assert main(["render", "--site", "devcluster", "--snapshot", "git", "--", "true"]) == 0
    script = capsys.readouterr().out
    commit = git(repo, "rev-parse", "HEAD").strip()[:12]
    line = next(ln for ln in script.splitlines() if ln.startswith("# hpcdl code snapshot:"))
    assert f"git (tracked files) of {repo.resolve()} at commit {commit}" in line
    assert "+ uncommitted changes (snapshot.diff)" in line and "<job-folder>/code/sub" in line
    assert any(ln.startswith("cd ") and ln.endswith("code/sub'") for ln in script.splitlines())
    assert main(["render", "--site", "devcluster", "--", "true"]) == 0
    assert "snapshot" not in capsys.readouterr().out  # none: the script is unchanged


def test_training_config_job_section_takes_a_snapshot():
    from hpcdl.train.config import JobConfig

    assert JobConfig.model_validate({"snapshot": "rsync"}).snapshot == Snapshot(mode="rsync")


# -- bad inputs: one line each, nothing queued ----------------------------------------------------
def _one_line(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), out
    assert "Traceback" not in out.err + out.out
    return lines[0]


@pytest.mark.parametrize("verb", ["submit", "render"])
@pytest.mark.parametrize(
    ("args", "where", "expected"),
    [
        (["--snapshot", "svn"], "repo", "command line: snapshot: must be git, rsync or none (got 'svn')"),
        (["snapshot=hg"], "file", "job.yaml: snapshot: must be git, rsync or none (got 'hg')"),
        (["snapshot.exclude=[' ']"], "file", "snapshot.exclude: invalid exclude pattern ' '"),
        (["snapshot.excludes=[a]"], "file", "snapshot.excludes: unknown field"),
        (["--snapshot", "git"], "outside", "snapshot: git: "),
        (["--snapshot", "rsync"], "no-rsync", "snapshot: rsync is not on PATH"),
    ],
    ids=["cli-mode", "file-mode", "pattern", "unknown-key", "git-outside-repo", "rsync-missing"],
)  # fmt: skip
def test_bad_snapshot_inputs(
    repo, tmp_path, monkeypatch, capsys, job_root, verb, args, where, expected
):
    site = "devcluster" if verb == "render" else "local"
    monkeypatch.chdir(repo / "sub" if where != "outside" else tmp_path)
    if where == "no-rsync":
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "true").symlink_to("/bin/true")
        monkeypatch.setenv("PATH", str(bin_dir))
    if where == "file":
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump({"command": ["true"], "site": site}))
        argv = [verb, str(path), *args]
    else:
        argv = [verb, "--site", site, *args, "--", "true"]
    line = _one_line(capsys, main(argv))
    assert expected in line, line
    if where == "outside":
        assert "is not inside a git repository (use snapshot: rsync, or none)" in line
    assert not job_root.exists(), "nothing may be written for a rejected job"


def test_a_script_missing_from_the_snapshot_is_refused_and_leaves_no_folder(repo, monkeypatch, capsys, job_root):  # fmt: skip
    (repo / "sub/new.py").write_text("print('not added')\n")
    monkeypatch.chdir(repo / "sub")
    line = _one_line(capsys, main(["submit", "--snapshot", "git", "--", "python3", "new.py"]))
    assert "snapshot: 'new.py' is not in the git snapshot (untracked: git add it" in line
    assert not list(job_root.glob("2*")), "the half-made job folder is removed"


def test_bad_site_snapshot_is_one_line(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "scheduler": "local", "snapshot": "cvs"}))
    line = _one_line(capsys, main(["site", "show", str(path)]))
    assert "snapshot: must be git, rsync or none (got 'cvs')" in line


# -- a local job runs the copy -------------------------------------------------------------------
def test_local_function_job_imports_from_the_snapshot(repo, tmp_path, monkeypatch):
    """The callable's module and the working directory are the copy's, even with the original
    tree on PYTHONPATH (as an editable install would have it)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(repo), str(REPO)]))
    monkeypatch.syspath_prepend(str(repo))
    import lib  # the project's module: pickled by reference, imported again by the task

    out = tmp_path / "where.json"
    job = Job(function=where, args=(str(out), lib), cwd=str(repo / "sub"), snapshot="git")
    handle = job.submit(load_site("local"))
    assert handle.wait(timeout=60) == "COMPLETED", handle.log_paths()[1].read_text()
    got = json.loads(out.read_text())
    code = Path(handle.folder) / "code"
    assert got == {"cwd": str(code / "sub"), "lib": str(code / "lib.py"), "version": 2}


# -- submitit's checkpoint() protocol through the task wrapper -----------------------------------
def test_the_task_has_checkpoint_only_when_the_callable_has_one(tmp_path):
    assert not hasattr(Task(function=plain, args=("x",)), "checkpoint")
    assert not hasattr(Task(argv=["true"]), "checkpoint")
    assert hasattr(Task(function=Counter(str(tmp_path / "c"), 3, 0)), "checkpoint")


def test_submitits_checkpoint_rewraps_the_callable_with_the_tasks_environment(tmp_path):
    """submitit's own code path (``_checkpoint``): the dumped submission is hpcdl's task again,
    with its environment, around the callable's checkpointed state."""
    from submitit.core.job_environment import _checkpoint
    from submitit.core.utils import DelayedSubmission

    counter = Counter(str(tmp_path / "progress.jsonl"), 5, 0)
    counter.done = 3  # the state at the preemption
    task = Task(function=counter, env={"HPCDL_JOB_NAME": "c"}, array_task_id=2, cwd="/x")
    pkl = tmp_path / "submitted.pkl"
    assert _checkpoint(DelayedSubmission(task), pkl, countdown=0) == ""  # "" = requeue
    again = DelayedSubmission.load(pkl)
    assert isinstance(again.function, Task)
    assert (again.function.env, again.function.array_task_id, again.function.cwd) == (
        task.env, 2, "/x")  # fmt: skip
    assert again.function.function.done == 3 and again.result() == 5
    steps = [json.loads(ln) for ln in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if s["event"] == "step"] == [4, 5]


def test_a_checkpoint_returning_none_is_passed_through(tmp_path):
    class Never(Counter):
        def checkpoint(self, *args: object, **kwargs: object) -> None:
            return None

    assert Task(function=Never(str(tmp_path / "n"), 1, 0)).checkpoint() is None
    assert pickle.loads(pickle.dumps(Task(argv=["true"]))).argv == ["true"]


# -- on the dev cluster ---------------------------------------------------------------------------
@pytest.mark.slurm
def test_a_snapshotted_array_edited_after_submission_runs_the_submitted_version(
    devcluster, repo, monkeypatch
):
    monkeypatch.chdir(repo / "sub")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(repo), str(REPO)]))
    monkeypatch.setenv("SBATCH_HOLD", "1")  # sbatch --hold: edit while the array waits
    job = Job(site=devcluster, name="snap", command=[sys.executable, "run.py"], array=3,
              time="5m", snapshot="git")  # fmt: skip
    handle = job.submit()
    try:
        (repo / "lib.py").write_text("VERSION = 3\n")  # edited after submission ...
        (repo / "sub/run.py").write_text("print('edited')\n")
        git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "v3")
        subprocess.run(["scontrol", "release", handle.job_id], check=True, timeout=30)
        state = handle.wait(timeout=120)
        outs = [handle.log_paths(array_task=i)[0].read_text() for i in range(3)]
        assert state == "COMPLETED", outs
        for out in outs:  # ... every task runs the submitted version (lib.py as it was on disk)
            assert "version 2" in out and "edited" not in out, out
    finally:
        if handle.state() not in {"COMPLETED", "FAILED", "CANCELLED"}:
            handle.cancel()


@pytest.mark.slurm
def test_a_checkpointable_callable_preempted_by_usr2_resumes_from_its_checkpoint(
    devcluster, tmp_path
):
    progress = tmp_path / "progress.jsonl"
    counter = Counter(str(progress), steps=30, delay_s=0.3)
    # 30 min: submitit counts a signal in the first 80% of the time as a preemption (requeue)
    handle = Job(site=devcluster, name="ckpt", function=counter, time="30m").submit()

    def rows() -> list[dict]:
        text = progress.read_text() if progress.exists() else ""
        return [json.loads(ln) for ln in text.splitlines()]

    deadline, signalled = time.monotonic() + 150, False
    try:
        while handle.state() != "COMPLETED":
            steps = [r for r in rows() if r["event"] == "step"]
            if not signalled and len(steps) >= 5:
                subprocess.run(["scancel", "--signal=USR2", handle.job_id], check=True, timeout=30)
                signalled = True
            release_requeued(handle.job_id)  # requeued: start it in 3 s, not in 2 minutes
            state, log = handle.state(), handle.log_paths()[1]
            assert state not in {"FAILED", "CANCELLED", "TIMEOUT"}, log.read_text()
            assert time.monotonic() < deadline, f"{state}\n{rows()}\n{log.read_text()}"
            time.sleep(0.5)
    finally:
        if handle.state() not in {"COMPLETED", "FAILED", "CANCELLED"}:
            handle.cancel()
    got = rows()
    starts = [r for r in got if r["event"] == "start"]
    assert [s["run"] for s in starts] == [0, 1], got  # preempted once, requeued once
    first = [r["step"] for r in got if r["event"] == "step" and r["run"] == 0]
    second = [r["step"] for r in got if r["event"] == "step" and r["run"] == 1]
    assert len(first) >= 5 and starts[1]["done"] >= 5, got  # resumed, not started over
    # the checkpoint is taken at the signal (submitit's handler then ends the task): no step lost
    # or counted twice
    assert second == list(range(first[-1] + 1, 31)) and starts[1]["done"] == first[-1], got
    assert got[-1] == {"event": "end", "run": 1, "done": 30}
