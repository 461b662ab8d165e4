"""The sweep folder: its layout, its records and what they say, in one place.

Everything a sweep keeps on the shared file system is named here and nowhere else; the sweep,
the CLI, the lifecycle, the workers, the final job and the chaos driver ask this module::

    SWEEP/spec.json            the validated spec (SweepSpec)
    SWEEP/train.yaml           the base training config as of `sweep run`
    SWEEP/study.journal        Optuna's journal storage (JournalFileBackend), unless the spec's
                               storage is a database (hpcdl.hpo.storage)
    SWEEP/slots/N.json         one Slot per trial slot, written under SWEEP/.slots.lock
    SWEEP/trials/trial-NNNNN/  a trial's run folder (and its abort-attemptK.json markers)
    SWEEP/workers/TASK.jsonl   each warm worker's journal
    SWEEP/submissions.jsonl    every round the lifecycle submitted
    SWEEP/events.jsonl         what the final and follow-up jobs decided
    SWEEP/final/result.json    the final model's scores (the sweep's last record)
    SWEEP/round                how many rounds were submitted (part of the sampler seeds)
    SWEEP/alerts/KEY.json      an alert sent (or tried): its claim, made once (hpcdl.hpo.alerts)
    SWEEP/synced.json          each offline W&B run's state as last uploaded (hpo.wandb_sync)

"Finished" is decided once: :meth:`SweepPaths.finished` (every slot finished and, when the spec
asks for a final model, its result written).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from hpcdl.errors import HpcdlError
from hpcdl.hpo.spec import SweepSpec
from hpcdl.util import atomic_write_json, atomic_write_text

SlotStateName = Literal["running", "retry", "complete", "pruned", "failed"]
FINISHED_SLOT = frozenset({"complete", "pruned", "failed"})  # nothing left to run for the slot
ENDED = FINISHED_SLOT | {"retry"}  # the attempt running the slot is over


class Slot(BaseModel):
    """What a sweep knows about one trial slot."""

    slot: int
    trial: int  # the Optuna trial's number
    params: dict[str, Any]
    run_id: str
    state: SlotStateName = "running"
    attempts: int = 1
    value: float | None = None  # the (first) objective's
    values: dict[str, float] | None = None  # every objective and constraint recorded
    epochs: int = 0
    node: str | None = None
    job: str | None = None
    error: str | None = None
    claimed_at: float | None = None  # this attempt's claim (the budget counts a running trial)
    pbt: list[dict[str, Any]] = []  # PBT's decisions at each interval (hpcdl.hpo.pbt)


#: The sweep report's two files: in the sweep folder, or in the folder ``sweep report`` is given.
REPORT_PNG, REPORT_HTML = "report.png", "report.html"


class SweepPaths:
    """The sweep folder's layout (on the shared filesystem) and its records."""

    def __init__(self, root: Path):
        self.root = root
        self.spec = root / "spec.json"
        self.slots = root / "slots"
        self.trials = root / "trials"
        self.submissions = root / "submissions.jsonl"
        self.final = root / "final"
        self.events = root / "events.jsonl"  # what the final and follow-up jobs decided
        self.train = root / "train.yaml"  # the base training config, as of `sweep run`
        self.study = root / "study.journal"
        self.workers = root / "workers"  # each warm worker's journal
        self.final_started = root / ".final-started"  # the final job began (a requeue resumes)
        self.final_result = self.final / "result.json"
        self.round = root / "round"  # how many rounds were submitted (a sampler seed part)
        # a claim between the study's ask and its slot write (hpcdl.hpo.trial.claim): if it is
        # still here at the next claim, that one died in between and left an orphan trial
        self.asking = root / ".asking.json"
        self.alerts = root / "alerts"  # one KEY.json per alert claimed (exactly once)
        self.synced = root / "synced.json"  # offline W&B runs uploaded, with their signatures
        # the budget stopped sampling (hpcdl.hpo.budget): slots never sampled are not missing
        self.budget_spent = root / "budget-spent.json"
        self._slots: list[Slot] | None = None  # all_slots() as read once (one_read)

    def check_owned(self) -> None:
        """Raise HpcdlError unless the sweep folder and its spec are this user's and writable by
        nobody else: a sweep's spec names what its jobs run, so a tree another user wrote (in a
        shared job root) must never be resumed, cancelled or read as one's own."""
        me = os.geteuid()
        for path in (self.root, self.spec):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode) or st.st_uid != me or st.st_mode & 0o022:
                raise HpcdlError(
                    f"sweep folder {self.root} is not yours alone ({path.name}: owner uid "
                    f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}"
                    f"{', a symlink' if stat.S_ISLNK(st.st_mode) else ''}): hpcdl acts only "
                    "on sweeps its user owns and nobody else can write"
                )

    # -- slots ------------------------------------------------------------------------------------
    def slot_file(self, slot: int) -> Path:
        return self.slots / f"{slot}.json"

    def trial_dir(self, slot: Slot) -> Path:
        return self.trials / f"trial-{slot.trial:05d}"

    def read_slot(self, slot: int) -> Slot | None:
        path = self.slot_file(slot)
        return Slot.model_validate_json(path.read_text()) if path.is_file() else None

    def write_slot(self, slot: Slot) -> None:
        atomic_write_text(self.slot_file(slot.slot), slot.model_dump_json(indent=1))

    def all_slots(self) -> list[Slot]:
        if self._slots is not None:
            return list(self._slots)
        return sorted(
            (Slot.model_validate_json(p.read_text()) for p in self.slots.glob("*.json")),
            key=lambda s: s.slot,
        )

    @contextmanager
    def one_read(self) -> Iterator[None]:
        """Within: every question about the slots (states, missing, finished) answers from one
        read of the slot files. A status page asks three times; with 10,000 trials each read
        took 0.34 s of the 1.6 s of 'sweep status'. Only for a view: nothing is written."""
        self._slots = self.all_slots()
        try:
            yield
        finally:
            self._slots = None

    @contextmanager
    def lock(self) -> Iterator[None]:
        self.slots.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".slots.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    @contextmanager
    def changing(self, name: str) -> Iterator[None]:
        """Held by ``sweep resume`` and ``sweep extend`` while they change the sweep's spec and
        submit a round: two at once both read the same spec and both submitted a round (the
        slots lock is not it: workers claim under that one). A second is refused, not queued."""
        with open(self.root / ".changing.lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise HpcdlError(f"another 'hpcdl sweep resume' or 'extend' of {name!r} is "
                                 "running: wait for it, then look at 'hpcdl sweep status'") from None  # fmt: skip
            yield

    def load_spec(self) -> SweepSpec:
        return SweepSpec.model_validate_json(self.spec.read_text())

    # -- what the records say ---------------------------------------------------------------------
    def slot_finished(self, slot: int) -> bool:
        s = self.read_slot(slot)
        return s is not None and s.state in FINISHED_SLOT

    def missing_slots(self, slots: Iterable[int]) -> list[int]:
        """Those of ``slots`` with something left to run (``range(spec.trials)``: the sweep's)."""
        slots_now = self.all_slots()
        done = {s.slot for s in slots_now if s.state in FINISHED_SLOT}
        if self.budget_spent.exists():  # never sampled, and never will be
            done |= set(slots) - {s.slot for s in slots_now}
        return [i for i in slots if i not in done]

    def finished_count(self) -> int:
        return sum(s.state in FINISHED_SLOT for s in self.all_slots())

    def has_final_result(self) -> bool:
        return self.final_result.is_file()

    def read_final_result(self) -> dict[str, Any] | None:
        if not self.final_result.is_file():
            return None
        result: dict[str, Any] = json.loads(self.final_result.read_text())
        return result

    def write_final_result(self, result: dict[str, Any]) -> None:
        self.final.mkdir(exist_ok=True)
        atomic_write_json(self.final_result, result)

    def finished(self, spec: SweepSpec) -> bool:
        """The sweep has nothing left to do: every slot finished and, when ``spec.final`` asks
        for a final model, its result is written."""
        missing = self.missing_slots(range(spec.trials))
        return not missing and (not spec.final or self.has_final_result())

    # -- alerts -------------------------------------------------------------------------------------
    def notified(self) -> set[str]:
        """The keys of the alerts claimed so far (``finished``, ``stuck-round2`` ...)."""
        return {p.stem for p in self.alerts.glob("*.json")}

    def archive_finished_alert(self, trials: int) -> None:
        """``sweep extend``: the sweep will finish again, and its ``finished`` claim (which
        silences every later alert) is kept as ``finished-N-trials.sent`` beside the others."""
        with contextlib.suppress(FileNotFoundError):
            (self.alerts / "finished.json").replace(self.alerts / f"finished-{trials}-trials.sent")

    def claim_alert(self, key: str, record: dict[str, Any]) -> bool:
        """Claim alert ``key`` for this process: True for exactly one caller, ever, however many
        jobs, watchers and threads race (the final job and ``sweep watch`` on two hosts). The
        record is written whole under a temporary name of its own (``mkstemp``: created
        exclusively, so no two claimers share it, whatever their host and pid), then hard-linked
        to ``KEY.json``: ``link`` fails when the name exists (atomic and exclusive, NFS
        included), so no reader sees half a record and no second claimer wins."""
        self.alerts.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.alerts)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=1, default=str)
            os.link(tmp, self.alerts / f"{key}.json")
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def update_alert(self, key: str, record: dict[str, Any]) -> None:
        """Record how the claimed alert's delivery went (the claim stays)."""
        atomic_write_json(self.alerts / f"{key}.json", record)


def abort_file(trial_dir: Path, attempt: int) -> Path:
    """The marker of a multi-rank trial's attempt that one rank ended for all."""
    return trial_dir / f"abort-attempt{attempt}.json"


def read_round(sweep_dir: Path) -> int:
    """The sweep's round (0 before any resubmission): ``SWEEP/round``."""
    try:
        return int(SweepPaths(sweep_dir).round.read_text())
    except (FileNotFoundError, ValueError):
        return 0
