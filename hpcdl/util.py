"""Small helpers every layer uses: atomic writes, hashing, dotted keys, the library logger.

This module imports nothing from hpcdl: it is the bottom layer of the import contract.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOGGER_NAME = "hpcdl"


def get_logger(name: str) -> logging.Logger:
    """The library's logger for ``name`` (a module's ``__name__``); the CLI decides what shows."""
    if name != LOGGER_NAME and not name.startswith(f"{LOGGER_NAME}."):
        name = f"{LOGGER_NAME}.{name}"
    return logging.getLogger(name)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to ``sys.stderr`` as it is when a record is emitted (not when the handler was
    made), so redirected or captured output (job logs, pytest's capsys) gets the warnings."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it; always stderr
        pass


class _LowerLevelFormatter(logging.Formatter):
    """``hpcdl: warning: ...``: the lower-case form job logs have always used."""

    def format(self, record: logging.LogRecord) -> str:
        return f"hpcdl: {record.levelname.lower()}: {super().format(record)}"


def configure_logging(level: int = logging.INFO) -> None:
    """Show the library's records from ``level`` up on stderr as ``hpcdl: level: message`` (for
    entry points such as a training job, whose stderr is the job log).

    Adds one handler to the ``hpcdl`` logger, once; a later call may only lower the level. Does
    nothing if the application gave that logger a handler of its own."""
    logger = logging.getLogger(LOGGER_NAME)
    if any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.setLevel(min(logger.level, level))
        return
    if logger.handlers:
        return
    handler = _StderrHandler()
    handler.setFormatter(_LowerLevelFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)


def atomic_write_text(path: str | Path, text: str, fsync: bool = False) -> Path:
    """Write ``text`` so that readers see the old file or the new one, never a mix.

    The temporary file sits beside the target (same file system, so ``os.replace`` is atomic)
    and carries the pid, so two processes writing the same path never share a temporary.
    ``fsync`` makes the content durable before the rename (checkpoint pointers need that).
    """
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w") as f:  # closed before the rename
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return path


def atomic_write_json(path: str | Path, data: Any, fsync: bool = False) -> Path:
    """``atomic_write_text`` of ``data`` as indented JSON (non-JSON values as ``str``)."""
    return atomic_write_text(path, json.dumps(data, indent=1, default=str) + "\n", fsync=fsync)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` (``.NAME.tmp-PID``) to fill, renamed over ``path`` when
    the block succeeds and removed (file or folder) when it fails. For content that a library
    writes itself (an HDF5 file, a folder of copies); text and JSON have the functions above.
    A folder can only replace a missing or empty one: remove a stale target inside the block."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: str | Path, block_bytes: int = 8 << 20) -> str:
    """Hex sha256 of a file, read in ``block_bytes`` pieces (never the whole file at once)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(block_bytes):
            h.update(block)
    return h.hexdigest()


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(d, "a.b.c", v)`` sets ``d["a"]["b"]["c"] = v``, creating missing levels.

    Raises ``ValueError`` when a level on the way exists but is not a mapping."""
    keys = dotted.split(".")
    if not all(keys):
        raise ValueError(f"empty key in {dotted!r}")
    node = data
    for i, key in enumerate(keys[:-1]):
        nxt = node.setdefault(key, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"{'.'.join(keys[: i + 1])} is not a mapping")
        node = nxt
    node[keys[-1]] = value
