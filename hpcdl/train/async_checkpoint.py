"""Checkpoints written beside training (``checkpoint.async_save``, issue 25), with the crash
safety of the synchronous save (:mod:`hpcdl.train.checkpoint`).

As torch's distributed checkpoint ``async_save`` does, a save has two halves:

- **staging**, in the training loop: DeepSpeed's ``save_checkpoint`` runs as before, but its
  checkpoint engine (:class:`StagingEngine`) serialises each file into memory with the same
  ``torch.save`` call instead of writing it: the bytes are the checkpoint as it is at this step,
  whatever training does next. Then training goes on.
- **writing**, in a thread of each rank (:class:`Writer`): every staged file written, fsynced
  and hashed (from memory), then a note ``RUN/checkpoints/.writes/TAG/rankNNNNN.json`` with
  their sizes and checksums (written atomically, fsynced). Rank 0's thread then waits for every
  rank's note, fsyncs and hashes what DeepSpeed wrote directly (its recovery script), fsyncs the
  folders, and commits as the synchronous save does: ``MANIFEST.json`` (fsync), ``latest``
  (atomic, fsync), prune. No collective runs in a thread: training keeps the process group.

Nothing names a file before its data is on disk, and nothing before the manifest trusts the
checkpoint, so a kill at any point of the writing leaves a folder without a manifest: the
resume skips it (with a warning) and takes the previous checkpoint, which the prune of this
save never reached (it runs after the manifest). One save is in flight at a time: the next
save, the end of the run and a preemption wait for it first.

Staging holds this rank's share of the checkpoint in memory until it is written. A file that
would take the staged total past :func:`memory_budget` (half of the node's available memory,
shared by the node's ranks) is written directly instead, as a synchronous save writes it, and
only fsynced and hashed in the thread: a model too large to copy in memory still saves, more of
its save held in the training loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from hpcdl.util import atomic_write_text, fsync_file, get_logger, sha256_file

logger = get_logger(__name__)

WRITES = ".writes"  # RUN/checkpoints/.writes/TAG/rankNNNNN.json: one rank's files, written
NOTE_WAIT_S = 1800.0  # rank 0 waits this long at most for the other ranks' notes
MEMORY_SHARE = 0.5  # of the node's available memory, for the staged checkpoints of its ranks

# A staged file (its bytes), or None: written directly to its path (over the memory budget)
Staged = tuple[Path, memoryview | None]


def memory_budget(meminfo: str | None = None, local_ranks: int | None = None) -> int | None:
    """The bytes this rank may stage: :data:`MEMORY_SHARE` of the node's ``MemAvailable``
    over its ranks (``LOCAL_WORLD_SIZE``); None where /proc/meminfo does not say."""
    if meminfo is None:
        try:
            meminfo = Path("/proc/meminfo").read_text()
        except OSError:
            return None
    if local_ranks is None:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(int(line.split()[1]) * 1024 * MEMORY_SHARE / max(local_ranks, 1))
    return None


def tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in a (nested) state dict: what staging it will hold."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def staging_engine(engine: Any) -> StagingEngine:
    """Put a :class:`StagingEngine` in place of ``engine``'s checkpoint engine (once); its
    memory budget measured again for each save."""
    current = engine.checkpoint_engine
    if not isinstance(current, StagingEngine):
        current = StagingEngine(current)
        engine.checkpoint_engine = current
    current.budget = memory_budget()
    return current


class StagingEngine:
    """DeepSpeed's checkpoint engine, its ``save`` kept in memory (``take`` hands the files
    over) up to ``budget`` bytes; everything else is the engine it replaces (loads, folders,
    commit)."""

    def __init__(self, inner: Any, budget: int | None = None):
        self.inner = inner
        self.budget = budget
        self.staged: list[Staged] = []
        self.staged_bytes = 0

    def save(self, state_dict: Any, path: str) -> None:
        import torch

        size = tensor_bytes(state_dict)
        if self.budget is not None and self.staged_bytes + size > self.budget:
            self.inner.save(state_dict, path)  # too large to copy: written now
            self.staged.append((Path(path), None))
            return
        buf = io.BytesIO()
        zipfile = bool(getattr(self.inner, "zipfile_serialization", True))
        torch.save(state_dict, buf, _use_new_zipfile_serialization=zipfile)
        self.staged.append((Path(path), buf.getbuffer()))
        self.staged_bytes += size

    def take(self) -> list[Staged]:
        staged, self.staged, self.staged_bytes = self.staged, [], 0
        return staged

    def __getattr__(self, name: str) -> Any:  # load, create, commit, makedirs, ...
        return getattr(self.inner, name)


def write_file(path: Path, data: memoryview | None) -> tuple[int, str]:
    """Write ``data`` to ``path`` and fsync it; (bytes, sha256) from memory. ``None``: the file
    was written directly (over the memory budget): fsynced and hashed from disk."""
    if data is None:
        fsync_file(path)
        return path.stat().st_size, sha256_file(path)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return len(data), hashlib.sha256(data).hexdigest()


class Writer:
    """One rank's background half of one save (see the module's docstring)."""

    def __init__(
        self,
        root: Path,
        tag: str,
        rank: int,
        world: int,
        files: list[Staged],
        commit: Callable[[dict[str, tuple[int, str]]], None] | None,
    ):
        self.root, self.tag, self.rank, self.world = root, tag, rank, world
        self.files, self.commit = files, commit  # commit: rank 0's (manifest, latest, prune)
        self.error: BaseException | None = None
        self.lock = threading.Lock()  # abandoned and committing: one decision (wait())
        self.abandoned = self.committing = False
        self.started = time.monotonic()
        self.ended: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"hpcdl-ckpt-{tag}")
        self.thread.start()

    @property
    def notes(self) -> Path:
        return self.root / WRITES / self.tag

    def done(self) -> bool:
        return not self.thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the save ended within ``timeout``. One that did not is abandoned: it commits
        nothing afterwards (no manifest, ``latest`` or prune behind the back of whatever this
        process does next, e.g. a warm worker's next attempt on the same run folder), unless
        its commit had already begun: then that is waited for."""
        self.thread.join(timeout)
        with self.lock:
            if self.thread.is_alive() and not self.committing:
                self.abandoned = True
                return False
        self.thread.join()
        return True

    def _run(self) -> None:
        try:
            folder = self.root / self.tag
            sums = {str(p.relative_to(folder)): write_file(p, data) for p, data in self.files}
            self.files = []  # the memory goes as soon as it is on disk
            self._note({"files": sums})
            if self.commit is not None:
                gathered = self._gather()
                with self.lock:
                    if self.abandoned:
                        raise TimeoutError(f"checkpoint {self.tag} abandoned before its commit")
                    self.committing = True
                self.commit(gathered)
        except BaseException as exc:  # kept for wait(); a note tells rank 0 not to commit
            self.error = exc
            if self.rank != 0:
                with contextlib.suppress(OSError):
                    self._note({"error": f"{type(exc).__name__}: {exc}"})
        finally:
            self.ended = time.monotonic()

    def _note(self, body: dict[str, Any]) -> None:
        self.notes.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.notes / f"rank{self.rank:05d}.json", json.dumps(body), fsync=True)

    def _gather(self) -> dict[str, tuple[int, str]]:
        """Rank 0: every rank's files (waiting for their notes), then the files none of them
        staged (DeepSpeed's direct writes), each fsynced and hashed here."""
        deadline = time.monotonic() + NOTE_WAIT_S
        sums: dict[str, tuple[int, str]] = {}
        for rank in range(self.world):
            note = self.notes / f"rank{rank:05d}.json"
            while not note.is_file():
                if time.monotonic() > deadline or self.abandoned:
                    raise TimeoutError(f"rank {rank} did not finish writing checkpoint {self.tag}")
                time.sleep(0.02)
            body = json.loads(note.read_text())
            if "error" in body:
                raise OSError(f"rank {rank} could not write its files: {body['error']}")
            sums.update({k: (int(v[0]), str(v[1])) for k, v in body["files"].items()})
        folder = self.root / self.tag
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = str(path.relative_to(folder))
            if rel not in sums:
                fsync_file(path)
                sums[rel] = (path.stat().st_size, sha256_file(path))
        return sums

    def drop_notes(self) -> None:
        shutil.rmtree(self.notes, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.root / WRITES).rmdir()  # empty once no save is in flight


def asynchronous(configured: bool) -> bool:
    """Whether saves are asynchronous: the config's ``checkpoint.async_save``, or
    ``HPCDL_ASYNC_CHECKPOINTS=1`` (``0`` forces synchronous saves), e.g. to run a test suite
    written for synchronous saves with asynchronous ones."""
    env = os.environ.get("HPCDL_ASYNC_CHECKPOINTS", "")
    return configured if env not in ("0", "1") else env == "1"


class SaveTimes(Protocol):
    """What :func:`save_seconds` reads of a ``Checkpointer`` (which imports this module)."""

    pending: Writer | None
    last_save_s: float | None
    last_stage_s: float


def save_seconds(ckpt: SaveTimes) -> float | None:
    """How long a save of ``ckpt`` (a Checkpointer) takes, as far as is known: the last one's
    time, or while one is still being written at least its time so far (the grace-time report
    said nothing of a periodic save still in flight when the signal came)."""
    if ckpt.pending is None:
        return ckpt.last_save_s
    return max(ckpt.last_save_s or 0.0, time.monotonic() - ckpt.pending.started + ckpt.last_stage_s)
