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
from collections.abc import Callable, Iterator
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


# -- records: JSON lines that survive a kill or a full disk --------------------------------------
_warned: set[tuple[str, str]] = set()  # (file, what): each problem is said once per process


def _warn_once(path: Path, what: str, message: str) -> None:
    key = (str(path), what)
    if key not in _warned:
        _warned.add(key)
        logging.getLogger(f"{LOGGER_NAME}.util").warning(message)


def _json_object(line: bytes) -> Any:
    row = json.loads(line)
    if not isinstance(row, dict):  # every hpcdl record is an object; callers index into it
        raise ValueError("not a JSON object")
    return row


def read_jsonl(path: str | Path, parse: Callable[[bytes], Any] = _json_object) -> list[Any]:
    """The records of a JSON-lines file (``[]`` if it does not exist), each line through
    ``parse`` (default: a JSON object). A line ``parse`` refuses is skipped with a warning, once
    per process and file: a torn last line (no newline: its writer was killed or the disk
    filled mid-line) or a bad line in the middle (a torn line that another append followed)
    costs that record, never the file. Blank lines are skipped silently."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline, as every whole line does
    rows, bad = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(parse(line))
        except ValueError:  # json's, pydantic's ValidationError and UnicodeDecodeError are
            bad.append(number)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (
            f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        )
        _warn_once(path, f"bad {bad}", f"{path}: skipped unreadable line(s) {shown} (cut short "
                   "by a crash or a full disk, or not a record)")  # fmt: skip
    if torn.strip():
        try:
            rows.append(parse(torn))  # whole, just without its newline
        except ValueError:
            _warn_once(path, f"torn {len(lines) + 1}", f"{path}: skipped a torn last line "
                       f"(line {len(lines) + 1}, {len(torn)} bytes without a newline: its "
                       "writer was stopped mid-line)")  # fmt: skip
    return rows


def append_jsonl(path: str | Path, row: Any) -> None:
    """Append ``row`` as one JSON line, whole: one ``write`` of the line and its newline on an
    ``O_APPEND`` descriptor, under an exclusive ``flock`` of the file, so lines of several
    processes (on several nodes of a shared file system, where ``O_APPEND`` alone does not
    serialize) never interleave. A torn last line left by a killed writer first gets its
    newline, so it stays one bad line and never swallows this one."""
    import fcntl

    line = (json.dumps(row, default=str) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)  # read: the tail
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        view = memoryview(line)
        while view:  # a regular file takes it in one write; a short one is retried, not lost
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)  # releases the lock


def fsync_dir(path: str | Path) -> None:
    """Make the entries of folder ``path`` durable (a rename or a new file in it), as a file's
    ``fsync`` makes its content durable: needed before a record names what the folder holds."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
