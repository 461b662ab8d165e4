"""Checkpoints that every rank writes and that are never trusted half-written.

Layout of ``RUN/checkpoints``::

    step00000120/                     one DeepSpeed checkpoint (tag), written by all ranks
        mp_rank_00_model_states.pt     DeepSpeed's files (model, ZeRO optimizer shards, scheduler,
        ...                            client_state: epoch, data loader position, epoch sums)
        rng_rank00000.pt              this rank's RNG states (python, numpy, torch, cuda)
        MANIFEST.json                 written last, by rank 0: every file's size and sha256
    latest                            the newest complete tag (replaced atomically)

A save: all ranks write (DeepSpeed ends with a barrier), all ranks fsync and hash a share of the
files, rank 0 fsyncs the folders, writes the manifest, then ``latest`` (temporary file, fsync,
``os.replace``, fsync of the folder), then prunes to the last ``keep``: nothing names a file
before its data is on disk. A save that fails (a full disk) raises, naming the checkpoint that
stays the newest complete one. A resume takes the newest checkpoint whose manifest verifies; a checkpoint with a
missing manifest, a missing file or a wrong checksum is skipped with a warning naming it.

DeepSpeed writes ``client_state`` into rank 0's model file only, which is right for the state all
ranks share; RNG states differ per rank, so each rank saves its own file beside it.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hpcdl.errors import HpcdlError
from hpcdl.train.async_checkpoint import StagingEngine, Writer, staging_engine
from hpcdl.train.rng import rng_state, set_rng_state
from hpcdl.util import atomic_write_text, fsync_dir, fsync_file, get_logger, sha256_file

logger = get_logger(__name__)

MANIFEST = "MANIFEST.json"
LATEST = "latest"
UNIVERSAL = "universal"  # a checkpoint converted for a resume on another world size


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(root: Path) -> list[tuple[int, str]]:
    """(step, tag) of the checkpoints under ``root`` that have a manifest, oldest first."""
    found = []
    for d in Path(root).glob("step*"):
        if (d / MANIFEST).is_file() and d.name[4:].isdigit():
            found.append((int(d.name[4:]), d.name))
    return sorted(found)


def compare_to_manifest(
    expected: dict[str, dict[str, Any]], sums: dict[str, tuple[int, str]]
) -> str | None:
    """The first file whose (bytes, sha256) in ``sums`` differs from the manifest, or None."""
    for rel, want in sorted(expected.items()):
        if rel not in sums:
            return f"file {rel} is missing"
        size, digest = sums[rel]
        if size != want["bytes"]:
            return f"file {rel} has {size} bytes, the manifest says {want['bytes']}"
        if digest != want["sha256"]:
            return f"file {rel} does not match its checksum"
    return None


def verify_folder(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, problem) of one checkpoint folder, checked by this process alone (no process
    group: for tools such as ``hpcdl export``); problem is None when every file verifies."""
    if not folder.is_dir():
        return None, "no such checkpoint"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None, f"no {MANIFEST} (its save never completed)"
    except (OSError, ValueError) as exc:
        return None, f"unreadable {MANIFEST}: {exc}"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None, f"unreadable {MANIFEST}: no file list"
    sums = {}
    for rel in manifest["files"]:
        path = folder / rel
        if path.is_file():
            sums[rel] = (path.stat().st_size, sha256_file(path))
    return manifest, compare_to_manifest(manifest["files"], sums)


class Checkpointer:
    """Save and resume DeepSpeed checkpoints collectively (call every method on every rank)."""

    def __init__(self, root: Path, keep: int, asynchronous: bool = False):
        self.root = Path(root)
        self.keep = keep
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.last_save_s: float | None = None  # how long this process's last save took
        # asynchronous: saves are written beside training (hpcdl.train.async_checkpoint)
        self.asynchronous = asynchronous
        self.pending: Writer | None = None  # the save in flight, with its step
        self.pending_step = 0
        # (step, tag, seconds training was held by its save) committed since the last take
        self.committed: list[tuple[int, str, float]] = []
        self.last_stage_s = 0.0  # the training time the last asynchronous save took
        self.last_blocked_s = 0.0  # the training time the last save held (waits included)

    # -- helpers shared by save and verify -------------------------------------------------
    def _bcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _hash_shared(
        self, tag: str, files: list[str], fsync: bool = False
    ) -> dict[str, tuple[int, str]]:
        """``{file: (bytes, sha256)}``, every rank hashing a share; missing files are absent.
        ``fsync``: each file is also made durable, so no manifest names a file whose data a
        crash (of the node, or of the file server) could still lose."""
        mine = {}
        for i, rel in enumerate(files):
            path = self.root / tag / rel
            if i % self.world == self.rank and path.is_file():
                if fsync:
                    fsync_file(path)
                mine[rel] = (path.stat().st_size, sha256_file(path))
        parts: list[dict[str, tuple[int, str]]] = [{} for _ in range(self.world)]
        dist.all_gather_object(parts, mine)
        return {k: v for part in parts for k, v in part.items()}

    def complete(self) -> list[tuple[int, str]]:
        """(step, tag) of the checkpoints with a manifest, oldest first (rank 0's view)."""
        return complete_tags(self.root)

    # -- save ------------------------------------------------------------------------------
    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> str:
        """Write checkpoint ``step`` on all ranks, then commit it (manifest, ``latest``, prune)."""
        entered = time.monotonic()
        self.wait()  # one save in flight at a time (asynchronous saves)
        tag = tag_for(step)
        folder, started = self.root / tag, time.monotonic()
        if self.rank == 0 and folder.exists():  # a leftover of an interrupted save
            shutil.rmtree(folder)
        dist.barrier()
        staging = staging_engine(engine) if self.asynchronous else None
        try:
            self._write(engine, folder, client_state, staging)
        except Exception as exc:  # a full disk, a quota: say which save failed and what is safe
            if staging is not None:
                staging.take()
            raise self._not_saved(folder, exc) from exc
        if staging is not None:  # the files are in memory: written and committed beside
            commit = functools.partial(self._commit, tag, step) if self.rank == 0 else None
            self.pending = Writer(self.root, tag, self.rank, self.world, staging.take(), commit)
            self.pending_step = step
            self.last_stage_s = time.monotonic() - started
            self.last_blocked_s = time.monotonic() - entered
            return tag
        files = self._bcast(
            sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            if self.rank == 0
            else None
        )
        sums = self._hash_shared(tag, files, fsync=True)  # all_gather: every rank's are synced
        if self.rank == 0:
            self._commit(tag, step, sums)
        dist.barrier()
        self.last_save_s = time.monotonic() - started
        self.last_blocked_s = time.monotonic() - entered
        return tag

    def _commit(self, tag: str, step: int, sums: dict[str, tuple[int, str]]) -> None:
        """Rank 0, once every file of ``tag`` is on disk (``sums``: each one's bytes and
        sha256): the folders synced, the manifest, ``latest``, the prune."""
        folder = self.root / tag
        # the folders' entries too (new files, the tag folder itself) before the manifest
        for d in sorted({(folder / rel).parent for rel in sums}, reverse=True):
            fsync_dir(d)
        fsync_dir(self.root)
        manifest = {
            "tag": tag,
            "step": step,
            "world_size": self.world,
            "created": time.time(),
            "files": {rel: {"bytes": n, "sha256": h} for rel, (n, h) in sorted(sums.items())},
        }
        # fsync: the manifest and the pointer must be on disk before anyone trusts them.
        atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1), fsync=True)
        fsync_dir(folder)  # the manifest's rename
        atomic_write_text(self.root / LATEST, tag, fsync=True)
        fsync_dir(self.root)
        self._prune(step)

    def _not_saved(self, folder: Path, exc: BaseException) -> HpcdlError:
        """The error of a save that failed: which one, and what a resume starts from."""
        # torch reports a full disk as "unexpected pos": the free space says what happened
        free = shutil.disk_usage(self.root).free // 1024
        return HpcdlError(
            f"checkpoint {folder} not saved ({type(exc).__name__}: {exc}; {free} kB free on "
            f"its file system); the newest complete checkpoint is still "
            f"{self._latest() or 'none'}, a resume starts there"
        )

    def wait(self, timeout: float | None = None, raise_errors: bool = True) -> None:
        """Until the save in flight (if any) is written and, on rank 0, committed; its failure
        raised here (as a synchronous save raises it). ``timeout``: give up waiting after it
        (an unfinished save stays without a manifest: a resume skips it)."""
        writer = self.pending
        if writer is None:
            return
        if not writer.wait(timeout):  # abandoned: it commits nothing now
            logger.warning(f"checkpoint {self.root / writer.tag} still being written after "
                           f"{timeout:.0f} s; left without a manifest")  # fmt: skip
            return
        self.pending = None
        self.last_save_s = (writer.ended or time.monotonic()) - writer.started + self.last_stage_s
        if self.rank == 0:
            writer.drop_notes()
        if writer.error is None:
            self.committed.append((self.pending_step, writer.tag, self.last_blocked_s))
        elif raise_errors:
            raise self._not_saved(self.root / writer.tag, writer.error) from writer.error
        else:
            logger.warning(f"{self._not_saved(self.root / writer.tag, writer.error)}")

    def take_committed(self) -> list[tuple[int, str, float]]:
        """(step, tag, seconds training was held) of the asynchronous saves committed since the last call (the one in
        flight is checked without waiting)."""
        if self.pending is not None and self.pending.done():
            self.wait()
        done, self.committed = self.committed, []
        return done

    def _write(
        self, engine: Any, folder: Path, client_state: dict[str, Any],
        staging: StagingEngine | None = None,
    ) -> None:  # fmt: skip
        """This rank's files of the checkpoint in ``folder`` (its RNG states, DeepSpeed's);
        ``staging``: kept in memory by it instead (an asynchronous save)."""
        folder.mkdir(parents=True, exist_ok=True)
        rng = folder / f"rng_rank{self.rank:05d}.pt"
        if staging is not None:
            staging.save(rng_state(), str(rng))
        else:
            torch.save(rng_state(), rng)
        engine.save_checkpoint(
            str(self.root), tag=folder.name, client_state=client_state, save_latest=False
        )  # ends with a barrier: every rank's files are written (or staged)

    def _latest(self) -> str | None:
        """The tag ``latest`` names (None without one), for messages."""
        try:
            return (self.root / LATEST).read_text().strip() or None
        except OSError:
            return None

    def _prune(self, newest: int) -> None:
        """Keep the last ``keep`` complete checkpoints; drop older incomplete leftovers."""
        complete = self.complete()
        for _, tag in complete[: -self.keep]:
            shutil.rmtree(self.root / tag, ignore_errors=True)
        for d in self.root.glob("step*"):
            if not (d / MANIFEST).exists() and d.name[4:].isdigit() and int(d.name[4:]) < newest:
                shutil.rmtree(d, ignore_errors=True)

    # -- resume ----------------------------------------------------------------------------
    def _problem(self, tag: str) -> str | None:
        """Why checkpoint ``tag`` cannot be trusted (checked by all ranks together), or None."""
        manifest: dict[str, Any] | None = None
        if self.rank == 0:
            try:
                manifest = json.loads((self.root / tag / MANIFEST).read_text())
            except (OSError, ValueError) as exc:
                manifest = {"unreadable": str(exc)}
        manifest = self._bcast(manifest)
        assert manifest is not None
        if "unreadable" in manifest or not isinstance(manifest.get("files"), dict):
            return f"unreadable {MANIFEST}: {manifest.get('unreadable', 'no file list')}"
        expected = manifest["files"]
        return compare_to_manifest(expected, self._hash_shared(tag, sorted(expected)))

    def latest_valid(self) -> str | None:
        """The newest checkpoint that verifies (same answer on every rank), warning about every
        newer one that does not; None if there is none at all, an error if none verifies."""
        candidates: list[str] = []
        if self.rank == 0:
            complete = self.complete()
            newest = complete[-1][0] if complete else -1
            for d in sorted(self.root.glob("step*")):
                if (
                    not (d / MANIFEST).exists()
                    and d.name[4:].isdigit()
                    and int(d.name[4:]) > newest
                ):
                    logger.warning(
                        f"checkpoint {d} is incomplete (no {MANIFEST}: its save was "
                        "interrupted); skipped"
                    )
            candidates = [tag for _, tag in reversed(complete)]
        candidates = self._bcast(candidates)
        for tag in candidates:
            problem = self._problem(tag)
            if problem is None:
                return tag
            if self.rank == 0:
                logger.warning(
                    f"checkpoint {self.root / tag} is corrupted ({problem}); trying the previous one"
                )
        if candidates:
            raise HpcdlError(
                f"no valid checkpoint in {self.root} ({len(candidates)} corrupted): move the "
                "folder away to start over"
            )
        return None

    def find(self, partitioned: bool) -> tuple[str | None, int, Path | None]:
        """(tag, ranks that wrote it, folder to load it from) of the checkpoint to resume: the
        newest valid one; a universal copy of it when it was written by another number of
        ranks and ``partitioned`` (its optimizer state is sharded per rank), else None."""
        tag = self.latest_valid()
        if tag is None:
            return None, self.world, None
        world = self.world_of(tag)
        return tag, world, self.to_universal(tag) if world != self.world and partitioned else None

    def world_of(self, tag: str) -> int:
        """How many ranks wrote checkpoint ``tag`` (rank 0 reads its manifest for all)."""
        world = None
        if self.rank == 0:
            world = json.loads((self.root / tag / MANIFEST).read_text()).get("world_size")
        world = self._bcast(world)
        if not isinstance(world, int) or world < 1:
            raise HpcdlError(f"checkpoint {self.root / tag}: its {MANIFEST} has no world_size")
        return world

    def to_universal(self, tag: str) -> Path:
        """Convert ``tag`` to DeepSpeed's universal checkpoint (its ZeRO optimizer state, per
        parameter and unpartitioned), which loads on any number of ranks; rank 0 converts, the
        others wait. Returns the folder to load from (``UNIVERSAL/tag``), rebuilt every time:
        a conversion cut short leaves nothing trusted behind."""
        out = self.root / UNIVERSAL / tag
        failure = None
        if self.rank == 0:
            shutil.rmtree(out, ignore_errors=True)
            try:
                _ds_to_universal(self.root / tag, out)
            except Exception as exc:  # every rank must hear of it
                failure = f"cannot convert checkpoint {self.root / tag} for a new world size: {exc}"
                shutil.rmtree(out, ignore_errors=True)
        failure = self._bcast(failure)
        if failure:
            raise HpcdlError(failure)
        return out.parent

    def drop_universal(self) -> None:
        """Remove the converted copy once every rank has loaded it (a collective)."""
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(self.root / UNIVERSAL, ignore_errors=True)

    def load(self, engine: Any, tag: str, root: Path | None = None) -> dict[str, Any]:
        """Load ``tag`` (from ``root``: a universal copy) into the engine and this rank's RNG
        states; returns the client state. A rank the checkpoint had no RNG file for (a resume
        on more ranks) keeps the seeding of the trainer's setup."""
        path, client_state = engine.load_checkpoint(
            str(root or self.root), tag=tag, load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )  # fmt: skip
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        rng = self.root / tag / f"rng_rank{self.rank:05d}.pt"
        if rng.is_file():
            set_rng_state(torch.load(rng, weights_only=False))
        return client_state


def _ds_to_universal(folder: Path, out: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` in this process, its progress output kept out of the
    job's log (debug level)."""
    import contextlib
    import io
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    args = Namespace(input_folder=str(folder), output_folder=str(out), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True,
                     inject_missing_state=True)  # fmt: skip
    said = io.StringIO()
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        ds_to_universal.main(args)
    logger.debug(said.getvalue())
