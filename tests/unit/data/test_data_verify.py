"""`hpcdl data verify`: every corruption gives one clear line naming the file, status 2."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcdl.cli import main
from hpcdl.data import write_shards
from hpcdl.data.sources import ArraySource


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    x = np.arange(600 * 4, dtype=np.float32).reshape(600, 4)
    write_shards(
        ArraySource({"x": x, "y": np.arange(600)}), tmp_path, chunk_size=640, shard_size=3 * 640
    )
    return tmp_path / "train"


def _flip_byte(d: Path) -> None:
    with open(d / "shard-00001.h5", "r+b") as f:
        f.seek(f.seek(0, 2) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def _truncate(d: Path) -> None:
    with open(d / "shard-00002.h5", "r+b") as f:
        f.truncate(1000)


def _edit_manifest(**changes: object) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        m = json.loads((d / "manifest.json").read_text())
        for path, value in changes.items():
            node = m
            *keys, last = path.split("__")
            for k in keys:
                node = node[k]
            node[last] = value
        (d / "manifest.json").write_text(json.dumps(m))

    return edit


def _rewrite_shard_as_float64(d: Path) -> None:
    """A consistent shard (size and sha256 match the manifest) whose x has another dtype."""
    from hpcdl.data.writer import sha256_file

    p = d / "shard-00000.h5"
    with h5py.File(p) as f:
        data = {k: f[k][:] for k in f}
    p.unlink()
    with h5py.File(p, "w") as f:
        f.create_dataset("x", data=data["x"].astype(np.float64), chunks=(20, 4))
        f.create_dataset("y", data=data["y"], chunks=(20,))
    m = json.loads((d / "manifest.json").read_text())
    m["shards"][0].update(bytes=p.stat().st_size, sha256=sha256_file(p))
    (d / "manifest.json").write_text(json.dumps(m))


CASES = [
    ("corrupted", _flip_byte, "shard-00001.h5: corrupted: sha256 differs from the manifest"),
    ("truncated", _truncate, "shard-00002.h5: truncated: 1000 bytes, the manifest says"),
    ("missing", lambda d: (d / "shard-00003.h5").unlink(), "shard-00003.h5: missing (listed in"),
    ("extra", lambda d: shutil.copy(d / "shard-00000.h5", d / "shard-00099.h5"), "shard-00099.h5: extra file not in the manifest"),
    ("no manifest", lambda d: (d / "manifest.json").unlink(), "manifest.json: missing: not a complete hpcdl dataset"),
    ("dtype", _rewrite_shard_as_float64, "shard-00000.h5: field 'x' has dtype float64, the manifest says float32"),
    ("manifest dtype", _edit_manifest(fields__y__dtype="int32"), "shard-00000.h5: field 'y' has dtype int64, the manifest says int32"),
    ("unknown field", _edit_manifest(colour="red"), "manifest.json: colour: unknown field"),
    ("bad count", _edit_manifest(samples=601), "manifest.json: (top level): Value error, shards hold 600 samples"),
    ("bad json", lambda d: (d / "manifest.json").write_text("{"), "manifest.json: not valid JSON"),
]  # fmt: skip


def test_clean_dataset_verifies(dataset: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "verify", str(dataset.parent)]) == 0
    assert f"ok: {dataset} (600 samples, 8 shards" in capsys.readouterr().out


@pytest.mark.parametrize(("name", "damage", "message"), CASES, ids=[c[0] for c in CASES])
def test_damage_is_reported(
    dataset: Path,
    capsys: pytest.CaptureFixture,
    name: str,
    damage: Callable[[Path], None],
    message: str,
) -> None:
    damage(dataset)
    assert main(["data", "verify", str(dataset.parent)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert str(dataset) in err  # names the folder and file


def test_reader_refuses_truncated_shard(dataset: Path) -> None:
    from hpcdl.data import ShardedDataset
    from hpcdl.errors import HpcdlError

    _truncate(dataset)
    with pytest.raises(HpcdlError, match=r"shard-00002\.h5"):
        list(ShardedDataset(dataset, 8, shuffle=False))
