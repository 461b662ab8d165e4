"""Which of a sweep's offline W&B runs to upload (``hpcdl sync``, ``hpcdl sync --follow``).

A run is uploaded when it is new or has changed since its last successful upload: each upload
is recorded with the run's *signature* (its files' total size and newest modification time) in
``SWEEP/synced.json``, so ``sync --follow`` picks new and growing runs up while the sweep runs,
uploads each finished run's last state once, and never uploads an unchanged run again (nor does
a second ``sync --follow`` after an interrupted one)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from hpcdl.hpo.folder import SweepPaths
from hpcdl.util import atomic_write_json

Signature = tuple[int, int]  # (total bytes, newest mtime in ns) of a run's files


def offline_runs(paths: SweepPaths) -> list[Path]:
    """The sweep's offline W&B run folders (trials' and the final model's)."""
    return sorted(p for p in paths.root.rglob("offline-run-*") if p.is_dir())


def signature(run_dir: Path) -> Signature:
    size = newest = 0
    for f in run_dir.rglob("*"):
        try:
            st = f.stat()
        except FileNotFoundError:  # W&B replaced a file meanwhile: the next look sees it
            continue
        if f.is_file():
            size, newest = size + st.st_size, max(newest, st.st_mtime_ns)
    return size, newest


def to_upload(runs: Mapping[str, Signature], synced: Mapping[str, Signature]) -> list[str]:
    """The runs to upload now: new ones, and those whose files changed since their last upload."""
    return [run for run, sig in sorted(runs.items()) if synced.get(run) != sig]


def read_synced(paths: SweepPaths) -> dict[str, Signature]:
    try:
        data = json.loads(paths.synced.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {run: (int(sig[0]), int(sig[1])) for run, sig in data.items()}


def write_synced(paths: SweepPaths, synced: Mapping[str, Signature]) -> None:
    atomic_write_json(paths.synced, {run: list(sig) for run, sig in sorted(synced.items())})
