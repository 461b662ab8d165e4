"""Which offline W&B runs ``hpcdl sync --follow`` uploads (hpcdl.hpo.wandb_sync), by table; the
record it keeps. The loop beside a running sweep: tests/cluster/test_sync_follow.py."""

from __future__ import annotations

import os

import pytest

from hpcdl.hpo.folder import SweepPaths
from hpcdl.hpo.wandb_sync import offline_runs, read_synced, signature, to_upload, write_synced

PLANS = [
    # (situation, runs now, recorded uploads, to upload)
    ("nothing yet", {}, {}, []),
    ("two new runs", {"b": (10, 1), "a": (5, 1)}, {}, ["a", "b"]),
    ("unchanged since its upload", {"a": (5, 1)}, {"a": (5, 1)}, []),
    ("grown since its upload", {"a": (9, 2)}, {"a": (5, 1)}, ["a"]),
    ("rewritten, same size, newer", {"a": (5, 2)}, {"a": (5, 1)}, ["a"]),
    ("one new beside one done", {"a": (5, 1), "c": (1, 3)}, {"a": (5, 1)}, ["c"]),
    ("a recorded run gone (folder moved)", {}, {"a": (5, 1)}, []),
]  # fmt: skip


@pytest.mark.parametrize("row", PLANS, ids=[r[0] for r in PLANS])
def test_to_upload(row):
    _, runs, synced, expected = row
    assert to_upload(runs, synced) == expected


def test_signature_and_record(tmp_path):
    paths = SweepPaths(tmp_path)
    run = tmp_path / "trials/trial-00000/wandb/offline-run-x"
    (run / "files").mkdir(parents=True)
    (run / "run-x.wandb").write_bytes(b"12345")
    (run / "files/config.yaml").write_bytes(b"ab")
    os.utime(run / "run-x.wandb", ns=(0, 7_000_000_000))
    os.utime(run / "files/config.yaml", ns=(0, 5_000_000_000))
    assert offline_runs(paths) == [run]
    assert signature(run) == (7, 7_000_000_000)
    assert read_synced(paths) == {}
    write_synced(paths, {str(run): signature(run)})
    assert read_synced(paths) == {str(run): (7, 7_000_000_000)}
    paths.synced.write_text("{not json")
    assert read_synced(paths) == {}  # a damaged record: every run is uploaded again
