"""Preemption the way shared clusters do it, in one process (world size 1, gloo): a job requeued
right after its final checkpoint, and SIGTERM (the site's preemption signal) at a random step.

A requeue is played by running the :class:`Trainer` again on the same run folder, as the
requeued job's task does; the reference is an uninterrupted run of the same config.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "helpers"))
from test_trainer_units import make_run, train_run
from train_setup import history, rows, same_weights

from hpcdl import preemption
from hpcdl.errors import HpcdlError
from hpcdl.scheduler import SlurmRequeue, _requeue
from hpcdl.train.config import preemption_settings
from hpcdl.train.trainer import Trainer

TIMING = ("step_time_mean_s",)
SLURM = SlurmRequeue()  # its sacct and scontrol calls are replaced where a test calls it


def events(run_dir: Path) -> list[tuple[str, int]]:
    return [(r["event"], r["step"]) for r in rows(run_dir, "event")]


def result(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "result.json").read_text())


# -- a requeue right after the final checkpoint -------------------------------------------------
@pytest.mark.parametrize(
    ("every", "final_saved"),
    [
        (10, "in the loop, before the last epoch's validation"),  # step 30 is a periodic save
        (8, "by finish(), after the last epoch's validation"),  # 30 is not a multiple of 8
    ],
)
def test_requeue_after_the_final_checkpoint_keeps_every_epoch_row(
    world1,
    synth,
    tmp_path,
    every,
    final_saved,
):
    ref = make_run(tmp_path, synth, "ref", checkpoint__every_steps=every)
    assert train_run(ref)["status"] == "completed"
    cut = make_run(tmp_path, synth, "cut", checkpoint__every_steps=every)
    train_run(cut)
    # Requeued after the final checkpoint: the job had not reported its end.
    (cut / "result.json").unlink()
    (cut / "model.pt").unlink()
    again = train_run(cut)

    assert again["status"] == "completed" and again["step"] == 30 and again["epochs"] == 2
    resume = [r for r in rows(cut, "event") if r["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["checkpoint"] == "step00000030", final_saved
    assert [(r["epoch"], r["step"]) for r in rows(cut, "epoch")] == [(0, 15), (1, 30)]
    assert history(cut) == history(ref)  # every step and epoch row, timings aside
    assert events(cut) == [*events(ref), ("resume", 30), ("completed", 30)]
    assert same_weights(cut, ref)
    want = {k: v for k, v in result(ref).items() if k not in TIMING}
    assert {k: v for k, v in again.items() if k not in TIMING} == want
    # The timings of the run before the requeue, carried in the checkpoint.
    assert again["step_time_mean_s"] > 0
    assert result(cut)["step_time_mean_s"] == again["step_time_mean_s"]


def test_requeue_after_the_final_checkpoint_of_a_max_steps_run(world1, synth, tmp_path):
    """max_steps ends the run mid-epoch: the partial epoch's row is logged once, not lost."""
    ref = make_run(tmp_path, synth, "ref", max_steps=20, epochs=3)
    assert train_run(ref)["step"] == 20
    cut = make_run(tmp_path, synth, "cut", max_steps=20, epochs=3)
    train_run(cut)
    (cut / "result.json").unlink()
    again = train_run(cut)
    assert again["step"] == 20 and again["epochs"] == result(ref)["epochs"]
    assert history(cut) == history(ref) and len(history(ref)["epoch"]) == 2


# -- SIGTERM: the signal a site preempts with ----------------------------------------------------
@pytest.fixture
def own_signals(monkeypatch) -> Iterator[None]:
    """The real PreemptionFlag installs handlers in this process: put pytest's back after."""
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2, signal.SIGHUP)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def signalled_run(run_dir: Path, at: int, signum: signal.Signals = signal.SIGTERM) -> None:
    """Train ``run_dir`` with the real flag; this process signals itself once at step ``at``
    (in the middle of a gradient-accumulation window, as a preemption comes)."""
    flag = preemption.PreemptionFlag()
    trainer = Trainer(run_dir, flag)
    micro_step, sent = trainer.micro_step, []

    def signalling(batch: dict[str, torch.Tensor]) -> bool:
        if trainer.state.step >= at and not sent:
            sent.append(trainer.state.step)
            os.kill(os.getpid(), signum)
        return micro_step(batch)

    trainer.micro_step = signalling  # type: ignore[method-assign]
    trainer.run()


def test_sigterm_at_a_random_step_checkpoints_there_and_resumes_exactly(
    world1,
    synth,
    tmp_path,
    own_signals,
):
    at = random.Random(2026).randint(11, 27)  # after the first periodic checkpoint (10)
    ref = make_run(tmp_path, synth, "ref")
    assert train_run(ref)["status"] == "completed"
    cut = make_run(tmp_path, synth, "cut")
    with pytest.raises(HpcdlError, match=r"stopped by SIGTERM at step \d+ \(not a Slurm job"):
        signalled_run(cut, at)
    stop = [r for r in rows(cut, "event") if r["event"] == "preempted"]
    assert len(stop) == 1 and stop[0]["signal"] == "SIGTERM"
    step = stop[0]["step"]
    assert at <= step <= at + 2 * 4, (at, step)  # seen at the sync after the next (every 4)
    periodic = [s for e, s in events(cut) if e == "checkpoint" and s != step]
    assert periodic and step > max(periodic), (periodic, step)
    want = [("start", 0)] + [("checkpoint", s) for s in periodic]
    assert events(cut) == [*want, ("checkpoint", step), ("preempted", step)]
    assert (cut / "checkpoints/latest").read_text() == f"step{step:08d}"

    again = train_run(cut)  # the requeued job: resumes from the preemption checkpoint
    resume = [r for r in rows(cut, "event") if r["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == step
    assert history(cut) == history(ref) and same_weights(cut, ref)
    want_result = {k: v for k, v in result(ref).items() if k not in TIMING}
    assert {k: v for k, v in again.items() if k not in TIMING} == want_result


def no_grace_run(tmp_path: Path, synth: Any) -> tuple[Path, list[dict[str, Any]]]:
    """A run on a site whose grace time (recorded in site.json) is 0 s, SIGTERM at step 13:
    its folder and its ``grace_too_short`` events."""
    cut = make_run(tmp_path, synth, "cut")
    site = {"site": "local", "preemption": {"preempt_signals": ["TERM"], "grace_time_s": 0}}
    (cut / "site.json").write_text(json.dumps(site))
    with pytest.raises(HpcdlError, match="stopped by SIGTERM"):
        signalled_run(cut, 13)
    return cut, [r for r in rows(cut, "event") if r["event"] == "grace_too_short"]


def test_grace_time_too_short_is_in_the_event_log(world1, synth, tmp_path, own_signals):
    """The site's grace time is 0 s: the event log says so before the save, which is tried
    anyway and here completes."""
    cut, late = no_grace_run(tmp_path, synth)
    assert len(late) == 1 and late[0]["signal"] == "SIGTERM" and late[0]["budget_s"] == 0
    assert late[0]["last_save_s"] > 0  # the periodic save at step 10 was measured
    assert "more than the 0s before SIGKILL; saving anyway" in late[0]["why"]
    # step 10's asynchronous save may commit after the report on a loaded machine
    ev = events(cut)
    assert ("checkpoint", 10) in ev, ev
    assert [e for e in ev if e != ("checkpoint", 10)][-3:] == [
        ("grace_too_short", 15), ("checkpoint", 15), ("preempted", 15)]  # fmt: skip


def test_a_save_still_being_written_counts_in_the_grace_report(
    world1, synth, tmp_path, own_signals, monkeypatch
):
    """The periodic save of step 10 is still being written when SIGTERM comes (a slow file
    system; it once happened by chance on a loaded machine): the report counts the time it
    has taken so far instead of saying nothing of it (it said None)."""
    from hpcdl.train import async_checkpoint

    reported, write_file, report = (
        threading.Event(),
        async_checkpoint.write_file,
        preemption.grace_report,
    )

    def slow_write(path: Path, data: Any) -> Any:  # the step-10 save waits for the report
        reported.wait(60)
        return write_file(path, data)

    def grace_report(*args: Any) -> Any:
        try:
            return report(*args)
        finally:
            reported.set()

    monkeypatch.setattr(async_checkpoint, "write_file", slow_write)
    monkeypatch.setattr(preemption, "grace_report", grace_report)
    cut, late = no_grace_run(tmp_path, synth)
    assert len(late) == 1 and late[0]["last_save_s"] is not None and late[0]["last_save_s"] > 0
    # step 10's save commits after the report, before the stop's own
    assert events(cut)[-4:] == [("grace_too_short", 15), ("checkpoint", 10), ("checkpoint", 15),
                                ("preempted", 15)]  # fmt: skip
    assert (cut / "checkpoints/latest").read_text() == "step00000015"


def test_the_sites_signal_list_decides_what_the_flag_handles(own_signals, tmp_path):
    flag = preemption.PreemptionFlag()  # before the config: the time-limit signal and TERM
    ours = flag._handle
    assert signal.getsignal(signal.SIGTERM) == ours and signal.getsignal(signal.SIGUSR2) == ours
    settings = preemption_settings({"preemption": {"preempt_signals": ["HUP"]}}, "local")
    policy = preemption.configure(flag, settings)
    assert policy.signals == (signal.SIGHUP,) and policy.grace_time_s == 30  # local.yaml's
    assert signal.getsignal(signal.SIGHUP) == ours and signal.getsignal(signal.SIGUSR2) == ours
    assert signal.getsignal(signal.SIGTERM) != ours  # given back
    assert policy.budget(signal.SIGHUP) == 30 and policy.budget(signal.SIGUSR2) == 30  # delay_s
    os.kill(os.getpid(), signal.SIGHUP)
    assert flag.requested and flag.received == signal.SIGHUP


def test_a_cancelled_job_is_not_requeued_after_its_sigterm_checkpoint(monkeypatch):
    """scancel sends SIGTERM too: the checkpoint is written, but the job must stay cancelled."""
    from hpcdl.scheduler import SlurmScheduler

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    requeued: list[str] = []
    monkeypatch.setattr(SlurmScheduler, "requeue", lambda self, target: requeued.append(target))
    monkeypatch.setattr(_requeue, "cancelled", lambda target: True)
    with pytest.raises(HpcdlError, match=r"job 77 was cancelled \(SIGTERM at step 5\)"):
        preemption.after_checkpoint(5, "step00000005", "/runs/x", 3, 0, "SIGTERM", slurm=SLURM)
    assert requeued == []
    assert (
        preemption.after_checkpoint(5, "step00000005", "/runs/x", 3, 0, "SIGUSR2", slurm=SLURM)
        == "77"
    )
    monkeypatch.setattr(_requeue, "cancelled", lambda target: False)
    assert (
        preemption.after_checkpoint(5, "step00000005", "/runs/x", 3, 0, "SIGTERM", slurm=SLURM)
        == "77"
    )
    assert requeued == ["77", "77"]


def test_a_job_slurm_already_requeued_is_not_an_error(monkeypatch):
    """A failed node: Slurm requeues the job itself and SIGTERMs the ranks left; their
    checkpoint's own `scontrol requeue` is then refused ("Job is pending execution")."""
    from hpcdl.scheduler import SlurmScheduler

    monkeypatch.setenv("SLURM_JOB_ID", "78")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setattr(_requeue, "cancelled", lambda target: False)
    answer = {"why": "Job is pending execution"}

    def refuse(self, target):
        raise HpcdlError(f"scontrol requeue {target} failed: {answer['why']} for job {target}")

    monkeypatch.setattr(SlurmScheduler, "requeue", refuse)
    monkeypatch.setattr(_requeue, "requeued_by_slurm", lambda target: False)
    assert (
        preemption.after_checkpoint(9, "step00000009", "/runs/x", 3, 0, "SIGTERM", slurm=SLURM)
        == "78"
    )
    answer["why"] = "Requested operation is presently disabled"
    with pytest.raises(HpcdlError, match="presently disabled for job 78; resubmit with run_dir="):
        preemption.after_checkpoint(9, "step00000009", "/runs/x", 3, 0, "SIGTERM", slurm=SLURM)
    monkeypatch.setattr(_requeue, "requeued_by_slurm", lambda target: True)  # sacct says so
    assert (
        preemption.after_checkpoint(9, "step00000009", "/runs/x", 3, 0, "SIGTERM", slurm=SLURM)
        == "78"
    )
