"""Small helpers every layer uses: atomic writes, hashing, dotted keys, the library logger.

This module imports nothing from hpcdl: it is the bottom layer of the import contract.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

LOGGER_NAME = "hpcdl"


def get_logger(name: str) -> logging.Logger:
    """The library's logger for ``name`` (a module's ``__name__``); the CLI decides what shows."""
    if name != LOGGER_NAME and not name.startswith(f"{LOGGER_NAME}."):
        name = f"{LOGGER_NAME}.{name}"
    return logging.getLogger(name)


def atomic_write_text(path: str | Path, text: str, fsync: bool = False) -> Path:
    """Write ``text`` so that readers see the old file or the new one, never a mix.

    The temporary file sits beside the target (same file system, so ``os.replace`` is atomic)
    and carries the pid, so two processes writing the same path never share a temporary.
    ``fsync`` makes the content durable before the rename (checkpoint pointers need that).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, data: Any, fsync: bool = False) -> Path:
    """``atomic_write_text`` of ``data`` as indented JSON (non-JSON values as ``str``)."""
    return atomic_write_text(path, json.dumps(data, indent=1, default=str) + "\n", fsync=fsync)


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
