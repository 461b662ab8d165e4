"""Small helpers every layer uses: atomic writes, hashing, dotted keys, the library logger.

This module imports nothing from hpcdl: it is the bottom layer of the import contract.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import subprocess

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
    and is created exclusively (:func:`atomic_path`). ``fsync`` makes the content durable before
    the rename (checkpoint pointers need that).
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        # The descriptor from the exclusive create is not at hand here; reopening the random
        # name with O_NOFOLLOW is safe: only a writer of this folder could have swapped it.
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd, "w") as f:  # closed before the rename
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    return path


def atomic_write_json(path: str | Path, data: Any, fsync: bool = False) -> Path:
    """``atomic_write_text`` of ``data`` as indented JSON (non-JSON values as ``str``)."""
    return atomic_write_text(path, json.dumps(data, indent=1, default=str) + "\n", fsync=fsync)


@contextmanager
def atomic_path(path: str | Path, directory: bool = False) -> Iterator[Path]:
    """A new temporary sibling of ``path`` (``.NAME.tmp-PID-RANDOM``) to fill, renamed over
    ``path`` when the block succeeds and removed (file or folder) when it fails. For content that
    a library writes itself (an HDF5 file, a folder of copies); text and JSON have the functions
    above. A folder (``directory=True``) can only replace a missing or empty one: remove a stale
    target inside the block.

    The temporary exists when the block starts: an empty file (or folder) created exclusively
    (``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600; a folder 0700) under a random name, so a
    symlink or file someone planted at a predictable name can neither redirect the write nor
    receive it: creation fails instead of following it. Renamed into place, it has the mode
    any new file would have under the current umask."""
    path = Path(path)
    tmp = _create_temp(path, directory)
    try:
        yield tmp
        # Private while being filled; in place, the mode any new file would get (the umask:
        # 077 inside hpcdl's jobs and submissions, see :func:`share_umask`).
        os.chmod(tmp, (0o777 if directory else 0o666) & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _create_temp(path: Path, directory: bool) -> Path:
    """Create and return a fresh temporary beside ``path`` (see :func:`atomic_path`)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            if directory:
                os.mkdir(tmp, 0o700)  # mkdir never follows a symlink at its own name
            else:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                os.close(os.open(tmp, flags, 0o600))
            return tmp
        except FileExistsError:
            continue  # a name someone took (or planted): draw another
    raise FileExistsError(f"{path}: no free temporary name beside it")


# What hpcdl creates is private to its user unless the site profile shares it with a group
# (``share: group``): the umask in force while hpcdl creates job roots, job folders, sweep
# trees, run folders and submits (sbatch hands it to the job as SLURM_UMASK).
SHARE_UMASK = {"private": 0o077, "group": 0o027}


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only set it, and a
    set-and-restore would give other threads a wrong umask for a moment)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o077)  # no /proc: the short race is the lesser evil
    os.umask(old)
    return old


@contextmanager
def share_umask(share: str = "private") -> Iterator[int]:
    """Run the block under the umask of ``share`` (``private``: 077, ``group``: 027) and
    restore the previous one: everything the block creates (and every process it starts, a
    local job, ``sbatch``) is private whatever the caller's umask. The umask is per process:
    a library call made while another thread creates files changes theirs too."""
    mask = SHARE_UMASK[share]
    old = os.umask(mask)
    try:
        yield mask
    finally:
        os.umask(old)


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
    return _records(path, data.split(b"\n"), parse, 1)


def read_jsonl_tail(
    path: str | Path, n: int, parse: Callable[[bytes], Any] = _json_object, block: int = 1 << 16
) -> list[Any]:
    """The records of the last ``n`` lines of a JSON-lines file (blank lines not counted; a
    torn end is one of them), as :func:`read_jsonl` reads them (bad and torn lines skipped and
    said once), reading backwards block by block: the newest records of a large append-only
    file without reading the rest. Without bad lines it is ``read_jsonl(path)[-n:]``."""
    path = Path(path)
    if n <= 0:
        return []
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed by the with below)
    except FileNotFoundError:
        return []
    with f:
        pos = f.seek(0, os.SEEK_END)
        data = b""
        while pos > 0 and sum(1 for x in data.split(b"\n")[1:] if x.strip()) <= n:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    lines = data.split(b"\n")
    if pos > 0:
        lines = lines[1:]  # it may be the end of a longer line
    torn = lines.pop()
    whole = [x for x in lines if x.strip()]
    keep = n - 1 if torn.strip() else n
    return _records(path, [*(whole[-keep:] if keep > 0 else []), torn], parse, None)


def _records(path: Path, lines: list[bytes], parse: Callable[[bytes], Any],
             first: int | None) -> list[Any]:  # fmt: skip
    """``lines`` (a file's split at newlines, from its line ``first``; None: its end, numbers
    unknown) through ``parse``; the last element is what follows the last newline."""
    torn = lines.pop()  # b"" when the file ends with a newline, as every whole line does
    rows, bad = [], []
    for number, line in enumerate(lines, start=first or 1):
        if not line.strip():
            continue
        try:
            rows.append(parse(line))
        except ValueError:  # json's, pydantic's ValidationError and UnicodeDecodeError are
            bad.append(number)
    if bad and first is None:
        _warn_once(path, f"bad tail {len(bad)}", f"{path}: skipped {len(bad)} unreadable "
                   "line(s) near its end (cut short by a crash or a full disk, or not a record)")  # fmt: skip
    elif bad:
        shown = ", ".join(map(str, bad[:10])) + (
            f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        )
        _warn_once(path, f"bad {bad}", f"{path}: skipped unreadable line(s) {shown} (cut short "
                   "by a crash or a full disk, or not a record)")  # fmt: skip
    if torn.strip():
        try:
            rows.append(parse(torn))  # whole, just without its newline
        except ValueError:
            where = f"line {len(lines) + 1}, " if first is not None else ""
            _warn_once(path, f"torn {where or len(torn)}", f"{path}: skipped a torn last line "
                       f"({where}{len(torn)} bytes without a newline: its "
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
    # read: the tail; never through a symlink planted at the name; the mode is the umask's
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
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


def fsync_file(path: str | Path) -> None:
    """Make a file's data durable (fsync needs no write access on Linux)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make the entries of folder ``path`` durable (a rename or a new file in it), as a file's
    ``fsync`` makes its content durable: needed before a record names what the folder holds."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_measured(argv: list[str], env: dict[str, str] | None = None, timeout: float = 120
                 ) -> tuple[float, float, subprocess.CompletedProcess[str]]:  # fmt: skip
    """Wall and CPU seconds (user + system) of one process: ``os.wait4``'s usage of that child
    alone (``RUSAGE_CHILDREN`` would also count any other child reaped meanwhile). For the
    figures of ``hpcdl bench`` and the scale tests: what a user waits for and pays."""
    import subprocess
    import tempfile
    import time

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - t0 > timeout:
                proc.kill()
                raise TimeoutError(f"{argv} ran over {timeout} s")
            time.sleep(0.01)
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(argv, proc.returncode, out.read().decode(),
                                           err.read().decode())  # fmt: skip
    return wall, usage.ru_utime + usage.ru_stime, done


def process_age() -> float:
    """Seconds since the kernel started this process (``/proc``: to a clock tick, 10 ms), so
    that a start-up is measured from before the interpreter ran (Linux only)."""
    with open("/proc/self/stat") as f:  # field 22, after the ')' that ends the command name
        started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - started_ticks / os.sysconf("SC_CLK_TCK")
