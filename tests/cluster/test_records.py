"""Records that survive a kill or a full disk (issue 19, finding 8).

- every JSON-lines reader of hpcdl skips a torn last line (and a bad line in the middle) with
  one warning naming the file, and the writers append whole lines, even after a torn one;
- ``hpcdl sweep status`` on a sweep whose ``submissions.jsonl`` ends in a torn line;
- a trial's slot updates are written under the sweep's lock and do not undo a decision taken
  there meanwhile;
- the submission pickle written on preemption: atomic, and a failed write (a full disk) does not
  break the next one;
- checkpoint files fsynced before the manifest that names them; a file system that fills up
  during a checkpoint: the save fails clearly, the previous checkpoint stays valid, and the run
  resumes from it with nothing lost (against an uninterrupted run).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from conftest import run_cli

sys.path.insert(0, str(Path(__file__).parents[1] / "helpers"))
from train_setup import history, rows, same_weights, write_config

from hpcdl.errors import HpcdlError
from hpcdl.util import append_jsonl, read_jsonl

TORN = b'{"kind": "step", "st'  # a line its writer never finished (no newline)


def util_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# -- every reader: a torn last line costs that line, and one warning -------------------------------
def _sweep_paths(tmp: Path) -> Any:
    from hpcdl.hpo.folder import SweepPaths

    paths = SweepPaths(tmp / "sweep")
    paths.slots.mkdir(parents=True)
    return paths


def _lifecycle(tmp: Path) -> Any:
    from hpcdl.hpo.lifecycle import Lifecycle

    life = Lifecycle.__new__(Lifecycle)  # only its records are used: no site, no scheduler
    life.paths = _sweep_paths(tmp)
    return life


def _handle(i: int) -> Any:
    from hpcdl.scheduler.interface import JobHandle

    return JobHandle(job_id=str(100 + i), site="local", scheduler="local", name=f"j{i}", folder=f"/x/{i}",
                     submitted_at=1000.0 + i)  # fmt: skip


def submissions(tmp: Path) -> tuple[Path, Callable[[], list[Any]]]:
    life = _lifecycle(tmp)
    for i in range(3):
        life._record("array", _handle(i), [i])
    return life.paths.submissions, lambda: [s["job_id"] for s in life.submissions()]


def events(tmp: Path) -> tuple[Path, Callable[[], list[Any]]]:
    from hpcdl.hpo.final import log_event

    life = _lifecycle(tmp)
    for i in range(3):
        log_event(life.paths, "final", f"decision {i}")
    return life.paths.events, lambda: [e["text"] for e in life.events(last=10)]


def journals(tmp: Path) -> tuple[Path, Callable[[], list[Any]]]:
    from hpcdl.hpo.worker import journal, note, read_journals

    paths = _sweep_paths(tmp)
    for i in range(3):
        note(paths, "trial", slot=i)
    return journal(paths), lambda: [r["slot"] for r in read_journals(paths)[journal(paths).stem]]


def registry(tmp: Path) -> tuple[Path, Callable[[], list[Any]]]:
    from hpcdl.scheduler import registry as reg

    site = SimpleNamespace(job_root_path=tmp / "jobroot", share="private", share_group=None)
    for i in range(3):
        reg.record(site, _handle(i))  # type: ignore[arg-type]
    path = tmp / "jobroot" / reg.REGISTRY_FILE
    return path, lambda: [h.job_id for h in reg.load_handles([tmp / "jobroot"])]


def registry_tail(tmp: Path) -> tuple[Path, Callable[[], list[Any]]]:
    from hpcdl.scheduler import registry as reg

    path, _ = registry(tmp)
    return path, lambda: [h.job_id for h in reg.recent_handles(20, [tmp / "jobroot"])]


def metrics_rewind(tmp: Path) -> tuple[Path, Callable[[], list[Any]]]:
    from hpcdl.track import Tracker, rewind_jsonl

    tracker = Tracker(tmp, enabled=True, config={}, name="t", wandb=False, wandb_mode="disabled",
                      wandb_project="p")  # fmt: skip
    for step in (1, 2, 3):
        tracker.log("step", {"step": step}, echo=False)
    tracker.close()
    path = tmp / "metrics.jsonl"

    def read() -> list[Any]:
        rewind_jsonl(path, 2)  # reads, keeps the rows up to step 2, rewrites
        return [r["step"] for r in read_jsonl(path)]

    return path, read


def metrics_bench(tmp: Path) -> tuple[Path, Callable[[], list[Any]]]:
    from hpcdl.hpo.bench_slots import _setup_s
    from hpcdl.hpo.folder import Slot

    paths = _sweep_paths(tmp)
    slot = Slot(slot=0, trial=0, params={}, run_id="r")
    paths.write_slot(slot)
    paths.trial_dir(slot).mkdir(parents=True)
    path = paths.trial_dir(slot) / "metrics.jsonl"
    append_jsonl(path, {"kind": "step", "step": 1, "time": 5.0})
    append_jsonl(path, {"kind": "event", "event": "start", "time": 12.5})
    sweep = SimpleNamespace(paths=paths)
    return path, lambda: [_setup_s(sweep, {"slot": 0, "claimed": 10.0})]  # type: ignore[arg-type]


def plain(tmp: Path) -> tuple[Path, Callable[[], list[Any]]]:
    path = tmp / "plain.jsonl"
    for i in range(3):
        append_jsonl(path, {"i": i})
    return path, lambda: [r["i"] for r in read_jsonl(path)]


READERS = {
    "submissions.jsonl (sweep status)": (submissions, ["100", "101", "102"]),
    "events.jsonl (sweep status)": (events, ["decision 0", "decision 1", "decision 2"]),
    "workers/TASK.jsonl (lifecycle, bench hpo)": (journals, [0, 1, 2]),
    "registry.jsonl (clean, find)": (registry, ["100", "101", "102"]),
    "registry.jsonl tail (status)": (registry_tail, ["100", "101", "102"]),
    "metrics.jsonl (rewind at resume)": (metrics_rewind, [1, 2]),
    "metrics.jsonl (bench hpo set-up time)": (metrics_bench, [2.5]),
    "read_jsonl": (plain, [0, 1, 2]),
}


@pytest.mark.parametrize("name", list(READERS))
def test_every_reader_skips_a_torn_last_line_with_one_warning(name, tmp_path, caplog):
    """Good lines through hpcdl's own writer, then a line cut short: the good ones come back
    and one warning names the file. Before the fix the sweep readers raised JSONDecodeError
    and the registry and the rewind dropped the line without a word."""
    make, expected = READERS[name]
    path, read = make(tmp_path)
    with open(path, "ab") as f:
        f.write(TORN)
    caplog.set_level(logging.WARNING, logger="hpcdl")
    assert read() == expected
    warned = util_warnings(caplog)
    assert len(warned) == 1 and str(path) in warned[0] and "torn last line" in warned[0], warned
    read()  # said once per process, not at every read (sweep status --watch reads every second)
    assert len(util_warnings(caplog)) == 1


def test_a_bad_line_in_the_middle_is_skipped_with_its_number(tmp_path, caplog):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"i": 0}\n{"i": 1, "cut\n{"i": 2}\n\n[3]\n{"i": 4}')
    caplog.set_level(logging.WARNING, logger="hpcdl")
    assert [r["i"] for r in read_jsonl(path)] == [0, 2, 4]  # a last line without \n is whole
    warned = util_warnings(caplog)
    assert len(warned) == 1 and f"{path}: skipped unreadable line(s) 2, 5" in warned[0], warned


def test_an_append_after_a_torn_line_stays_whole(tmp_path, caplog):
    """A writer killed mid-line, then the next append: the torn line is closed first, so it
    costs only itself (without that, the new line would be glued to it and lost too)."""
    path = tmp_path / "x.jsonl"
    append_jsonl(path, {"i": 0})
    with open(path, "ab") as f:
        f.write(TORN)
    append_jsonl(path, {"i": 1})
    caplog.set_level(logging.WARNING, logger="hpcdl")
    assert [r["i"] for r in read_jsonl(path)] == [0, 1]
    assert "skipped unreadable line(s) 2" in util_warnings(caplog)[0]


def test_appends_of_many_processes_never_interleave(tmp_path):
    """4 processes append 200 lines of 20 kB each (more than one pipe or buffer's worth) to one
    file: every line comes back whole."""
    path = tmp_path / "x.jsonl"
    code = ("import sys; from hpcdl.util import append_jsonl\n"
            "for i in range(200): append_jsonl(sys.argv[1], {'w': sys.argv[2], 'i': i, "
            "'pad': 'x' * 20000})")  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(w)]) for w in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    got = read_jsonl(path)
    assert len(got) == 800 and all(len(r["pad"]) == 20000 for r in got)


# -- the CLI: hpcdl sweep status on a torn submissions.jsonl ---------------------------------------
TOY = {
    "name": "torn-toy",
    "objective": "tests.helpers.objectives:curve",
    "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
    "trials": 2,
    "parallelism": 1,
    "final": False,
    "resources": {"site": "local", "time": "10m"},
}


def test_sweep_status_with_a_torn_submissions_line(tmp_path, job_root):
    """A local sweep, then a crash's torn line at the end of its submissions.jsonl: `sweep
    status` still shows every trial and says once which file it skipped a line of (before:
    a JSONDecodeError traceback)."""
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump(TOY))
    proc = run_cli("sweep", "run", str(spec), "--wait", "--timeout", "300", timeout=400)
    assert proc.returncode == 0, proc.stderr
    subs = job_root / "sweeps/torn-toy/submissions.jsonl"
    with open(subs, "ab") as f:
        f.write(b'{"kind": "final", "slots": [], "job_id": "12')
    status = run_cli("sweep", "status", "torn-toy", env={"COLUMNS": "120"})
    assert status.returncode == 0, status.stderr
    assert "Traceback" not in status.stderr and "2 complete" in status.stdout.splitlines()
    said = [line for line in status.stderr.splitlines() if "torn last line" in line]
    assert len(said) == 1 and str(subs) in said[0], status.stderr
    assert any(line.startswith("workers") for line in status.stdout.splitlines()), status.stdout


# -- slot updates under the sweep's lock -----------------------------------------------------------
def test_slot_updates_wait_for_the_lock_and_keep_a_decision_taken_there(tmp_path, monkeypatch):
    """A running trial's progress update (``ctx.report``) waits while another process holds the
    sweep's lock, and an attempt that another rank ended meanwhile (marked for retry, under the
    lock) stays ended. Before the fix the update was written at once and overwrote the
    decision with ``running``."""
    import optuna

    from hpcdl.hpo import trial as trial_module
    from hpcdl.hpo.protocol import BaseObjective
    from hpcdl.hpo.spec import SweepSpec
    from hpcdl.hpo.study import storage

    paths = _sweep_paths(tmp_path)
    seen: dict[str, Any] = {}

    class Contended(BaseObjective):
        def run(self, params, ctx):
            held = threading.Event()

            def hold() -> None:
                with paths.lock():  # another process (a rank aborting the attempt) decides
                    held.set()
                    time.sleep(1.0)
                    now = paths.read_slot(0)
                    paths.write_slot(now.model_copy(update={"state": "retry", "error": "rank 1"}))

            thread = threading.Thread(target=hold)
            thread.start()
            held.wait(10)
            started = time.monotonic()
            ctx.report(1, 0.5)
            seen["waited"] = time.monotonic() - started
            thread.join()
            seen["state"] = paths.read_slot(0).state
            return 0.5

    spec = SweepSpec.model_validate({
        "name": "lock", "objective": "tests.helpers.objectives:curve", "trials": 1,
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}}, "final": False,
    })  # fmt: skip
    study = optuna.create_study(study_name="lock", storage=storage(paths.root),
                                direction="maximize")  # fmt: skip
    slot = trial_module.claim(paths, spec, study, 0)
    monkeypatch.setattr(trial_module, "resolve_objective", lambda spec: Contended())
    trial_module.run_trial(paths, spec, study, slot)
    assert seen["waited"] > 0.8, seen  # the update waited for the lock
    assert seen["state"] == "retry", seen  # and did not undo the decision taken under it


# -- the submission pickle submitit's preemption handler rewrites ----------------------------------
@contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``folder`` (root only), unmounted (lazily) whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                   check=True, timeout=30)  # fmt: skip
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False, timeout=30)


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` up to its last byte; returns the filler to delete."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:  # ENOSPC: full
        pass
    finally:
        os.close(fd)
    return filler


class Resumable:
    """A Checkpointable callable whose checkpoint carries ``payload`` bytes."""

    def __init__(self, payload: int = 0):
        self.data = os.urandom(payload)

    def __call__(self) -> int:
        return len(self.data)

    def checkpoint(self) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(Resumable(len(self.data) + 100_000))


@pytest.mark.root  # mounts a tmpfs: make test runs it as root
def test_preemption_pickle_survives_a_full_disk(tmp_path):
    """The job's ``_submitted.pkl`` rewritten on preemption, on a file system with no room left:
    the write fails, the old pickle still loads and no temporary is left; once there is room,
    the next preemption's write works. submitit's own write (``_checkpoint``) left its
    ``.save_tmp`` behind and failed the next time on an assertion (checked by hand: replacing
    ``checkpoint_submission`` by ``submitit.core.job_environment._checkpoint`` here fails)."""
    from submitit.helpers import DelayedSubmission

    from hpcdl.scheduler.checkpointable import checkpoint_submission, write_pickle

    with small_disk(tmp_path / "disk", "256k") as disk:
        pkl = disk / "77_submitted.pkl"
        delayed = DelayedSubmission(Resumable(1000))
        delayed.set_timeout(10, 3)
        write_pickle(pkl, delayed)
        filler = fill(disk)
        with pytest.raises(OSError):
            checkpoint_submission(delayed, pkl, 3)
        assert sorted(p.name for p in disk.iterdir()) == ["77_submitted.pkl", "filler"]
        assert DelayedSubmission.load(pkl).function() == 1000  # the old one, whole
        filler.unlink()
        assert checkpoint_submission(delayed, pkl, 2) == ""
        again = DelayedSubmission.load(pkl)
        assert again.function() == 101_000 and again._timeout_countdown == 2
        assert sorted(p.name for p in disk.iterdir()) == ["77_submitted.pkl"]


# -- checkpoints ------------------------------------------------------------------------------------
def make_run(tmp: Path, synth: Path, output: Path, name: str, **changes: Any) -> Path:
    """A run folder (under ``output``) as ``hpcdl train`` leaves it for its ranks."""
    from hpcdl.train.config import dump_config, load_train_config, with_absolute_data

    base = dict(epochs=2, batch__size=32, log__every_steps=4, log__wandb=False,
                checkpoint__every_steps=10)  # fmt: skip
    config = write_config(tmp / f"{name}.yaml", synth, output, **{**base, **changes})
    run_dir = output / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(with_absolute_data(load_train_config(config))))
    return run_dir


def train_run(run_dir: Path) -> dict[str, Any]:
    from hpcdl.train.trainer import Trainer

    flag = SimpleNamespace(requested=False)
    return Trainer(run_dir, flag).run()


@pytest.fixture(autouse=True)
def fresh_logging() -> Iterator[None]:
    """The library logger as a new process has it (the trainer configures it), then as it was."""
    logger = logging.getLogger("hpcdl")
    handlers, level = logger.handlers[:], logger.level
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


# Asynchronous saves are the default; synchronous ones (checkpoint.async_save: false) keep
# their own path through Checkpointer.save, checked as well.
SAVES = pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])


@SAVES
def test_checkpoint_files_are_fsynced_before_their_manifest(
    world1, synth, tmp_path, monkeypatch, async_save
):
    """Every file a manifest names, and its folder, is fsynced before the manifest is written;
    the manifest and ``latest`` are durable (their folder fsynced) too. Before the fix only the
    manifest and ``latest`` themselves were."""
    from hpcdl.train import checkpoint as ckpt

    order: list[str] = []
    real_fsync, real_write = os.fsync, ckpt.atomic_write_text

    def fsync(fd: int) -> None:
        order.append(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}")
        real_fsync(fd)

    def write(path: Path, text: str, fsync: bool = False) -> Path:
        order.append(f"write {path}")
        return real_write(path, text, fsync=fsync)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(ckpt, "atomic_write_text", write)
    run_dir = make_run(tmp_path, synth, tmp_path / "runs", "synced", epochs=1,
                       checkpoint__async_save=async_save)  # fmt: skip
    assert train_run(run_dir)["status"] == "completed"
    root = run_dir / "checkpoints"
    for tag in ("step00000010", "step00000015"):
        manifest = json.loads((root / tag / ckpt.MANIFEST).read_text())
        at = order.index(f"write {root / tag / ckpt.MANIFEST}")
        before = order[:at]
        for rel in manifest["files"]:
            assert f"fsync {root / tag / rel}" in before, (tag, rel)
        assert f"fsync {root / tag}" in before and f"fsync {root}" in before
        after = order[at:]
        assert after.index(f"fsync {root / tag}") < after.index(f"write {root / ckpt.LATEST}")
        assert f"fsync {root}" in after[after.index(f"write {root / ckpt.LATEST}") :]


@SAVES
@pytest.mark.root  # mounts a tmpfs: make test runs it as root
def test_a_full_disk_during_a_checkpoint_loses_nothing(world1, synth, tmp_path, async_save):
    """The run folder on a 512 kB file system: the checkpoint of step 10 fits, the one of step
    20 does not (about 300 kB each). The save fails with an error naming the checkpoint that
    stays the newest complete one; that one still verifies; with room again (the file system
    grown, as after freeing space) the run resumes from it and ends exactly as an uninterrupted
    run: every step's and epoch's metrics, and the weights."""
    from hpcdl.train.checkpoint import verify_folder

    reference = make_run(tmp_path, synth, tmp_path / "ref", "ref")
    assert train_run(reference)["status"] == "completed"
    with small_disk(tmp_path / "disk", "512k") as disk:
        run_dir = make_run(tmp_path, synth, disk, "full", checkpoint__async_save=async_save)
        with pytest.raises(HpcdlError) as failed:
            train_run(run_dir)
        root = run_dir / "checkpoints"
        message = str(failed.value)
        assert f"checkpoint {root / 'step00000020'} not saved" in message, message
        assert re.search(r"; \d+ kB free on its file system\)", message), message
        assert "the newest complete checkpoint is still step00000010" in message, message
        assert (root / "latest").read_text() == "step00000010"
        assert verify_folder(root / "step00000010")[1] is None
        assert not (root / "step00000020/MANIFEST.json").exists()
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True, timeout=30)
        result = train_run(run_dir)
        resume = [r for r in rows(run_dir, "event") if r["event"] == "resume"]
        assert [r["checkpoint"] for r in resume] == ["step00000010"]
        assert history(run_dir) == history(reference)
        assert same_weights(run_dir, reference)
        ref = json.loads((reference / "result.json").read_text())
        same = ("status", "step", "epochs", "val_loss", "val_acc")
        assert [result[k] for k in same] == [ref[k] for k in same]
