"""Two users of one cluster (issue 19): user A's jobs, training run and sweep on the dev cluster,
run as the unprivileged ``hpcdl-alice``, are out of reach of ``hpcdl-bob`` (same primary group),
and A's ``status``, ``clean`` and ``sweep resume`` never load, run or delete what B planted.

The users come from ``slurm/devcluster/devcluster.sh up``; the tests drive both through
``runuser`` (conftest's ``users``), so they run as root. A's job root and run folders sit in a
folder of A's with mode 0755 under a world-writable /tmp folder, as scratch folders on many
sites are: only the modes hpcdl gives what it creates keep B out.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import AsUser

pytestmark = [pytest.mark.slurm, pytest.mark.root]  # it switches to two users itself

TIMEOUT = 480  # for A's jobs, run and sweep together, on a shared 2-core machine

# What user B tries on each path: read a byte of a file, list a folder; prints, as JSON, every
# path where that did not end in EACCES (with what happened instead).
PROBE = """
import errno, json, os, sys
out = {}
for p in json.load(sys.stdin):
    try:
        if os.path.isdir(p) and not os.path.islink(p):
            os.listdir(p)
        else:
            with open(p, "rb") as f:
                f.read(1)
        out[p] = "readable"
    except PermissionError:
        pass
    except OSError as exc:
        out[p] = f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
print(json.dumps(out))
"""


def _ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _probe(user: AsUser, paths: list[Path]) -> dict[str, str]:
    proc = subprocess.run(user.argv(sys.executable, "-c", PROBE), input=json.dumps([str(p) for p in paths]),
                          capture_output=True, text=True, timeout=120, env=user.env(), cwd=user.work)  # fmt: skip
    return json.loads(_ok(proc).stdout)


def _mode(path: Path) -> str:
    st = path.lstat()
    return f"{oct(st.st_mode & 0o7777)} uid={st.st_uid}"


@pytest.fixture(scope="module")
def alice_work(users: dict[str, AsUser]) -> Iterator[dict[str, object]]:
    """A's job (``hpcdl submit``), a one-epoch training run (``hpcdl train``, W&B offline,
    checkpoints) and a two-trial sweep (``hpcdl sweep run``), submitted together as
    ``hpcdl-alice`` and finished; returns where each landed."""
    a = users["a"]
    sweep = f"mu-{secrets.token_hex(3)}"  # the names of A's jobs here start with it
    _ok(a.python(textwrap.dedent(f"""
        from pathlib import Path
        from tests.helpers.train_setup import write_config, write_digits
        work = Path({str(a.work)!r})
        digits = write_digits(work / "digits")
        write_config(work / "train.yaml", digits, work / "runs", name={sweep!r}, epochs=1,
                     checkpoint__every_steps=10, checkpoint__keep=1, job__tasks_per_node=1,
                     log__every_steps=5)
    """)))  # fmt: skip
    try:
        yield _submit_and_wait(a, sweep)
    finally:  # nothing of A's is left in the queue, even when a wait failed
        out = subprocess.run(["squeue", "-h", "-u", a.user, "-o", "%A %j"], capture_output=True,
                             text=True, timeout=30).stdout  # fmt: skip
        mine = [
            ln.split()[0]
            for ln in out.splitlines()
            if ln.split()[-1].startswith((sweep, f"sweep-{sweep}"))
        ]
        if mine:
            subprocess.run(["scancel", *mine], timeout=30)


def _submit_and_wait(a: AsUser, sweep: str) -> dict[str, object]:
    (a.work / "sweep.yaml").write_text(
        json.dumps(
            {
                "name": sweep,
                "objective": "tests.helpers.objectives:curve",
                "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
                "sampler": {"name": "random", "seed": 0},
                "trials": 2,
                "parallelism": 2,
                "final": False,
                "resources": {"site": "devcluster", "time": "10m"},
            }
        )
    )
    job = _ok(a.hpcdl("submit", "--site", "devcluster", "-t", "5m", "--parsable", "--name",
                      f"{sweep}-job", "--", "sh", "-c", "echo private output; echo private >&2"))  # fmt: skip
    job_id = job.stdout.strip()
    train = _ok(a.hpcdl("train", str(a.work / "train.yaml"), "--site", "devcluster"))
    run_dir = Path(next(ln.split(": ", 1)[1] for ln in train.stdout.splitlines()
                        if ln.startswith("run folder: ")))  # fmt: skip
    train_id = next(ln.split()[2] for ln in train.stdout.splitlines()
                    if ln.startswith("submitted job "))  # fmt: skip
    _ok(a.hpcdl("sweep", "run", str(a.work / "sweep.yaml")))
    waited = a.python(textwrap.dedent(f"""
        from hpcdl.hpo import Sweep
        from hpcdl.scheduler import find_handle, log_tail
        for jid in ({job_id!r}, {train_id!r}):
            handle = find_handle(jid)
            state = handle.wait(timeout={TIMEOUT})
            assert state == "COMPLETED", (jid, state, log_tail(handle))
        sweep = Sweep.load({sweep!r})
        sweep.wait(timeout={TIMEOUT})
        assert [s.state for s in sweep.slots()] == ["complete"] * 2, sweep.status()
    """), timeout=2 * TIMEOUT + 60)  # fmt: skip
    assert waited.returncode == 0, waited.stdout + waited.stderr
    return {"job": job_id, "run_dir": run_dir, "sweep": a.job_root / "sweeps" / sweep}


def _categories(a: AsUser, work: dict[str, object]) -> dict[str, list[Path]]:
    root, run_dir, sweep = a.job_root, Path(work["run_dir"]), Path(work["sweep"])  # type: ignore[arg-type]
    everything = [root, *root.rglob("*"), run_dir, *run_dir.rglob("*")]
    job_folders = [p for p in root.iterdir() if p.is_dir() and p.name != "sweeps"]
    return {
        "job root and registry": [root, *root.glob("registry.jsonl")],
        "job folders": [
            p
            for p in everything
            if any(p == f or f in p.parents for f in job_folders)
            and not p.name.endswith((".out", ".err"))
        ],
        "job logs": [p for p in everything if p.name.endswith(("_log.out", "_log.err"))],
        "run folder": [
            p
            for p in everything
            if p == run_dir
            or (
                run_dir in p.parents
                and not {"checkpoints", "wandb"} & set(p.relative_to(run_dir).parts)
            )
        ],
        "checkpoints": [
            p for p in run_dir.rglob("*") if "checkpoints" in p.relative_to(run_dir).parts
        ],
        "W&B offline runs": [
            p for p in run_dir.rglob("*") if "wandb" in p.relative_to(run_dir).parts
        ],
        "sweep tree and journals": [sweep, *sweep.rglob("*")],
    }


def test_b_cannot_read_a_job_folders_logs_runs_checkpoints_sweeps_or_wandb(users, alice_work):
    """Every file and folder A's job, run and sweep left (found as root) is EACCES to B."""
    a, b = users["a"], users["b"]
    cats = _categories(a, alice_work)
    assert all(cats.values()), {k: len(v) for k, v in cats.items()}  # each kind exists
    assert any(p.name.endswith(".jsonl") for p in cats["sweep tree and journals"])
    reached = _probe(b, sorted({p for paths in cats.values() for p in paths}))
    leaks = {
        name: [f"{p} ({_mode(Path(p))}): {reached[str(p)]}" for p in paths if str(p) in reached]
        for name, paths in cats.items()
    }
    leaks = {
        k: v[:5] + ([f"... {len(v) - 5} more"] if len(v) > 5 else []) for k, v in leaks.items() if v
    }
    assert not leaks, "hpcdl-bob reached hpcdl-alice's files:\n" + json.dumps(leaks, indent=1)


def test_b_cannot_plant_lines_or_files_in_a_registry_job_root_run_or_sweep(users, alice_work):
    """B cannot append a line to A's registry, nor create a file in A's job root, a job folder,
    the run folder, the sweep tree or its worker journals."""
    a, b = users["a"], users["b"]
    sweep, run_dir = Path(alice_work["sweep"]), Path(alice_work["run_dir"])  # type: ignore[arg-type]
    journals = sweep / "workers"
    job_folder = next(p for p in a.job_root.iterdir() if p.is_dir() and p.name != "sweeps")
    targets = {
        "registry line": (a.job_root / "registry.jsonl", "a"),
        "submissions line": (sweep / "submissions.jsonl", "a"),
        "journal line": (next(journals.glob("*.jsonl")), "a"),
        "file in job root": (a.job_root / "planted.jsonl", "x"),
        "file in job folder": (job_folder / "planted_result.pkl", "x"),
        "file in run folder": (run_dir / "planted.txt", "x"),
        "file in sweep tree": (sweep / "planted.jsonl", "x"),
        "file in journals": (journals / "planted.jsonl", "x"),
    }
    code = textwrap.dedent("""
        import json, sys
        out = {}
        for what, (path, mode) in json.loads(sys.argv[1]).items():
            try:
                with open(path, mode) as f:
                    f.write('{"planted": "by bob"}\\n')
                out[what] = "written"
            except PermissionError:
                pass
            except OSError as exc:
                out[what] = repr(exc)
        print(json.dumps(out))
    """)
    done = json.loads(
        _ok(b.python(code, json.dumps({k: [str(p), m] for k, (p, m) in targets.items()}))).stdout
    )
    assert not done, f"hpcdl-bob wrote into hpcdl-alice's files: {done}"


def test_everything_a_job_run_and_sweep_create_is_private_to_a(users, alice_work):
    """Beyond what B reaches today (A's job root is 0700, so the tree under it is out of reach
    whatever its modes): nothing hpcdl made for A's job, run and sweep grants the group or others
    any access, so moving a run folder or a sweep tree elsewhere does not open it. Symlinks
    (W&B's ``latest-run``) are skipped: their mode means nothing."""
    a = users["a"]
    cats = _categories(a, alice_work)
    paths = sorted({p for ps in cats.values() for p in ps if not p.is_symlink()})
    a_root = a.job_root.parent  # A's own 0755 work folder: made by the test, not by hpcdl
    open_ = [f"{p} {_mode(p)}" for p in paths if p != a_root and p.lstat().st_mode & 0o077]
    assert not open_, f"{len(open_)} paths grant group/other access:\n" + "\n".join(open_[:40])


# -- B owns a shared location A uses ---------------------------------------------------------
def _plant(b: AsUser, shared: Path, marker: Path) -> dict[str, str]:
    """As B, in ``shared`` (a job root B made, 0777): a registry with a line whose folder holds
    a result pickle that touches ``marker`` when loaded, a line for a world-writable folder of
    B's with a successful result and a file, a line whose folder is a symlink into B's own
    files; a sweep tree ``planted`` whose submission and journal name the payload, and one,
    ``plantedreal``, whose submission is a failed job of B's (Slurm knows its state: nothing
    to unpickle). Returns the planted job ids."""
    code = textwrap.dedent("""
        import json, os, pickle, sys, time
        from pathlib import Path
        from hpcdl.hpo import SweepSpec
        from hpcdl.scheduler.base import JobHandle
        shared, marker, mine = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

        class Payload:  # touches the marker when loaded, then reads as a failed job's result
            def __reduce__(self):
                code = f"(__import__('os').system('touch {marker}'), ('error', None))[1]"
                return (eval, (code,))

        def folder(path):
            path.mkdir(mode=0o777)
            path.chmod(0o777)
            (path / "precious.txt").write_text("bob's\\n")
            os.chmod(path / "precious.txt", 0o666)
            return path

        old = time.time() - 30 * 86400
        ids = {"payload": "424201", "writable": "424202", "symlink": "424203"}
        shared.mkdir(mode=0o777)
        shared.chmod(0o777)
        evil = folder(shared / "20200101-000000-evil-000001")
        with open(evil / f"{ids['payload']}_0_result.pkl", "wb") as f:
            pickle.dump(Payload(), f)
        writable = folder(shared / "20200101-000000-bobs-000002")
        victim = folder(mine / f"victim-{shared.name}")
        for d, jid in ((writable, ids["writable"]), (victim, ids["symlink"])):
            with open(d / f"{jid}_0_result.pkl", "wb") as f:
                pickle.dump(("success", None), f)
        link = shared / "20200101-000000-link-000003"
        link.symlink_to(victim)
        lines = [JobHandle(job_id=ids[k], name=f"planted-{k}", site="devcluster", scheduler="slurm",
                           folder=str(d), submitted_at=old).model_dump_json()
                 for k, d in (("payload", evil), ("writable", writable), ("symlink", link))]
        (shared / "registry.jsonl").write_text("\\n".join(lines) + "\\n")
        os.chmod(shared / "registry.jsonl", 0o666)
        def sweep_tree(name, submission):
            tree = shared / "sweeps" / name
            (tree / "workers").mkdir(parents=True)
            spec = SweepSpec.model_validate({
                "name": name, "objective": "tests.helpers.objectives:curve",
                "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}}, "trials": 2,
                "parallelism": 1, "final": False, "resources": {"site": "devcluster", "time": "5m"}})
            (tree / "spec.json").write_text(spec.model_dump_json())
            (tree / "submissions.jsonl").write_text(json.dumps(
                {"kind": "workers", "slots": [0, 1], **submission}) + "\\n")
            (tree / "workers" / f"{submission['job_id']}_0.jsonl").write_text(json.dumps(
                {"event": "trial", "slot": 0, "pid": 1, "claimed": 0, "ended": 0}) + "\\n")
            for p in [tree, *tree.rglob("*")]:
                os.chmod(p, 0o777 if p.is_dir() else 0o666)

        sweep_tree("planted", json.loads(lines[0]))  # its submission: the payload
        real = JobHandle(job_id=sys.argv[4], name="sweep-plantedreal", site="devcluster",
                         scheduler="slurm", folder=str(evil), submitted_at=old)
        sweep_tree("plantedreal", real.model_dump())  # a job Slurm knows: FAILED, no pickle read
        print(json.dumps(ids))
    """)
    failed = b.run("sbatch", "--parsable", "--wait", "-t", "1", "-o", "/dev/null", "--wrap", "false",
                   timeout=120)  # fmt: skip
    job = failed.stdout.strip()
    assert job.isdigit(), failed.stdout + failed.stderr
    return json.loads(_ok(b.python(code, str(shared), str(marker), str(b.work), job)).stdout)


@pytest.fixture()
def planted(users) -> tuple[Path, Path, dict[str, str]]:
    b = users["b"]
    shared = b.work.parent / f"shared-{secrets.token_hex(3)}"
    marker = b.work.parent / f"pwned-{secrets.token_hex(3)}"
    return shared, marker, _plant(b, shared, marker)


def test_a_status_and_clean_ignore_what_b_planted_in_a_shared_job_root(users, planted):
    """A uses a job root B created (0777): ``hpcdl status`` does not unpickle B's result pickle
    (the payload would touch a marker as A), and ``hpcdl clean`` deletes neither B's
    world-writable folder nor, through a symlink, B's own files."""
    a, b = users["a"], users["b"]
    shared, marker, _ids = planted
    status = a.hpcdl("status", HPCDL_JOB_ROOT=str(shared), COLUMNS="200")
    ran = marker.exists()
    clean = a.hpcdl("clean", "--older-than", "0", HPCDL_JOB_ROOT=str(shared))
    said = f"status: {status.stdout}{status.stderr}\nclean: {clean.stdout}{clean.stderr}"
    problems = ["hpcdl status ran B's pickle payload"] if ran else []
    if marker.exists() and not ran:
        problems.append("hpcdl clean ran B's pickle payload")
    kept = [shared / "20200101-000000-bobs-000002/precious.txt",
            b.work / f"victim-{shared.name}/precious.txt"]  # fmt: skip
    problems += [f"hpcdl clean deleted B's {p}" for p in kept if not p.exists()]
    assert not problems, "\n".join(problems) + "\n" + said


@pytest.mark.parametrize("name", ["planted", "plantedreal"])
def test_a_sweep_resume_ignores_a_sweep_tree_b_planted(users, planted, name):
    """A sweep tree B wrote in a job root A uses: A's ``sweep status`` and ``sweep resume``
    neither load B's pickle (through the planted submission line) nor submit a job for it (the
    job would run what B's spec names, as A)."""
    a = users["a"]
    shared, marker, _ids = planted
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    status = a.hpcdl("sweep", "status", name, HPCDL_JOB_ROOT=str(shared), COLUMNS="200")
    resume = a.hpcdl("sweep", "resume", name, HPCDL_JOB_ROOT=str(shared))
    said = f"status: {status.stdout}{status.stderr}\nresume: {resume.stdout}{resume.stderr}"
    names = f"sweep-{name},sweep-{name}-follow,sweep-{name}-final"
    time.sleep(2)  # accounting lags the submission a little
    acct = subprocess.run(["sacct", "-n", "-X", "-P", "-u", a.user, f"--name={names}", "-S",
                           "now-1hour", "-o", "JobID,Submit"], capture_output=True, text=True,
                          timeout=30).stdout  # fmt: skip
    queue = subprocess.run(["squeue", "-h", "-u", a.user, "-n", names, "-o", "%i|%V"],
                           capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    ids = sorted({ln.split("|")[0] for ln in (acct + queue).splitlines()
                  if ln.split("|")[-1] >= started})  # fmt: skip
    if ids:
        subprocess.run(["scancel", *ids], timeout=30)
    problems = ["A's hpcdl ran B's pickle payload"] if marker.exists() else []
    if ids:
        problems.append(f"A's sweep resume submitted jobs {ids} for B's sweep tree")
    assert not problems, "\n".join(problems) + "\n" + said


def test_the_cluster_runs_a_job_as_its_submitter(users):
    """The dev cluster's point: a job runs as the user who submitted it (not root), with that
    user's umask, and reaches that user's private files only."""
    a, b = users["a"], users["b"]
    secret = a.work / "mine.txt"
    _ok(a.run("sh", "-c", f"umask 077 && echo alice-only > {secret}"))
    out = a.work / "whoami.out"
    _ok(a.run("sbatch", "--parsable", "--wait", "-t", "2", "-o", str(out), "--wrap",
              f"id -un; umask; cat {secret}; cat {b.home}/.profile 2>&1 | head -1", timeout=180))  # fmt: skip
    lines = out.read_text().splitlines()
    assert lines[:3] == [a.user, "0022", "alice-only"], lines
    assert "Permission denied" in lines[3], lines
    assert _probe(b, [secret]) == {}
