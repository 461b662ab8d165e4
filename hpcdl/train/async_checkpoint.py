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
from typing import Any

from hpcdl.util import atomic_write_text, fsync_file, get_logger, sha256_file

logger = get_logger(__name__)

WRITES = ".writes"  # RUN/checkpoints/.writes/TAG/rankNNNNN.json: one rank's files, written
NOTE_WAIT_S = 1800.0  # rank 0 waits this long at most for the other ranks' notes


def staging_engine(engine: Any) -> StagingEngine:
    """Put a :class:`StagingEngine` in place of ``engine``'s checkpoint engine (once)."""
    current = engine.checkpoint_engine
    if isinstance(current, StagingEngine):
        return current
    staged = StagingEngine(current)
    engine.checkpoint_engine = staged
    return staged


class StagingEngine:
    """DeepSpeed's checkpoint engine, its ``save`` kept in memory (``take`` hands the files
    over); everything else is the engine it replaces (loads, folders, commit)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.staged: list[tuple[Path, memoryview]] = []

    def save(self, state_dict: Any, path: str) -> None:
        import torch

        buf = io.BytesIO()
        zipfile = bool(getattr(self.inner, "zipfile_serialization", True))
        torch.save(state_dict, buf, _use_new_zipfile_serialization=zipfile)
        self.staged.append((Path(path), buf.getbuffer()))

    def take(self) -> list[tuple[Path, memoryview]]:
        staged, self.staged = self.staged, []
        return staged

    def __getattr__(self, name: str) -> Any:  # load, create, commit, makedirs, ...
        return getattr(self.inner, name)


def write_file(path: Path, data: memoryview) -> tuple[int, str]:
    """Write ``data`` to ``path`` and fsync it; (bytes, sha256) from memory."""
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
        files: list[tuple[Path, memoryview]],
        commit: Callable[[dict[str, tuple[int, str]]], None] | None,
    ):
        self.root, self.tag, self.rank, self.world = root, tag, rank, world
        self.files, self.commit = files, commit  # commit: rank 0's (manifest, latest, prune)
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.ended: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"hpcdl-ckpt-{tag}")
        self.thread.start()

    @property
    def notes(self) -> Path:
        return self.root / WRITES / self.tag

    def done(self) -> bool:
        return not self.thread.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    def _run(self) -> None:
        try:
            folder = self.root / self.tag
            sums = {str(p.relative_to(folder)): write_file(p, data) for p, data in self.files}
            self.files = []  # the memory goes as soon as it is on disk
            self._note({"files": sums})
            if self.commit is not None:
                self.commit(self._gather())
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
                if time.monotonic() > deadline:
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
