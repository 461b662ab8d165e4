"""Writer round trips for every source, splits, chunking, MPI, atomicity."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from hpcdl.cli import main
from hpcdl.data import Manifest, write_shards
from hpcdl.data.sources import ArraySource, SynthSource, digits_source
from hpcdl.errors import HpcdlError

BIN = Path(sys.executable).parent


def read_all(path: Path) -> dict[str, np.ndarray]:
    """Every field of a dataset, shards concatenated in manifest order."""
    m = Manifest.load(path)
    out: dict[str, list[np.ndarray]] = {f: [] for f in m.fields}
    for s in m.shards:
        with h5py.File(path / s.file) as f:
            for name in m.fields:
                out[name].append(f[name][:])
    return {k: np.concatenate(v) for k, v in out.items()}


def rows(a: np.ndarray) -> list[bytes]:
    return sorted(r.tobytes() for r in a)


def test_digits_round_trip(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    assert main(["data", "shard", "digits", str(tmp_path / "d")]) == 0
    d = load_digits()
    parts = {s: read_all(tmp_path / "d" / s) for s in ("train", "val", "test")}
    assert {s: len(p["y"]) for s, p in parts.items()} == {"train": 1437, "val": 180, "test": 180}
    x = np.concatenate([p["x"] for p in parts.values()])
    y = np.concatenate([p["y"] for p in parts.values()])
    assert x.dtype == np.float32 and x.shape == (1797, 1, 8, 8) and y.dtype == np.int64
    # every (image, label) pair exactly once, values bit-exact
    want = np.concatenate(
        [(d.images / 16.0).astype(np.float32).reshape(1797, -1), d.target[:, None]], 1
    )
    got = np.concatenate([x.reshape(1797, -1), y[:, None].astype(np.float32)], 1)
    assert rows(got) == rows(want.astype(np.float32))
    # shuffled globally: the training set is not in the original order
    assert not np.array_equal(parts["train"]["y"][:50], d.target[:50])
    m = Manifest.load(tmp_path / "d" / "train")
    assert m.classes == [str(i) for i in range(10)] and m.split == "train"


def test_npz_and_npy_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 255, (500, 2, 3), dtype=np.uint8)
    tok = rng.integers(0, 1000, (500, 7), dtype=np.int32)
    y = np.arange(500, dtype=np.int64)
    np.savez(tmp_path / "a.npz", x=x, tok=tok, y=y)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    assert main(["data", "shard", str(tmp_path / "a.npz"), str(tmp_path / "z"), "--val", "0", "--test", "0", "--chunk-size", "256", "--shard-size", "4KiB"]) == 0  # fmt: skip
    got = read_all(tmp_path / "z" / "train")
    order = np.argsort(got["y"])
    assert np.array_equal(got["y"][order], y)
    assert np.array_equal(got["x"][order], x) and np.array_equal(got["tok"][order], tok)
    m = Manifest.load(tmp_path / "z" / "train")
    assert len(m.shards) > 1 and sum(s.samples for s in m.shards) == 500
    assert m.chunk_samples == 256 // (6 + 28 + 8)
    assert main(["data", "shard", str(tmp_path / "x.npy"), str(tmp_path / "n"), "--labels", str(tmp_path / "y.npy")]) == 0  # fmt: skip
    parts = [read_all(tmp_path / "n" / s) for s in ("train", "val", "test")]
    ys = np.concatenate([p["y"] for p in parts])
    xs = np.concatenate([p["x"] for p in parts])
    assert [len(p["y"]) for p in parts] == [400, 50, 50]
    assert np.array_equal(xs[np.argsort(ys)], x)


def test_image_folder_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    want = {}
    for cls in ("cat", "dog", "emu"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(4):
            a = rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / "img" / cls / f"{i}.png")
            want[a.transpose(2, 0, 1).tobytes()] = cls
    assert main(["data", "shard", str(tmp_path / "img"), str(tmp_path / "o"), "--val", "0.25", "--test", "0"]) == 0  # fmt: skip
    m = Manifest.load(tmp_path / "o" / "train")
    assert m.classes == ["cat", "dog", "emu"] and m.fields["x"].shape == (3, 6, 5)
    got = {}
    for split in ("train", "val"):
        d = read_all(tmp_path / "o" / split)
        got.update({xi.tobytes(): m.classes[yi] for xi, yi in zip(d["x"], d["y"], strict=True)})
    assert got == want


def test_synth_sizes_and_learnable(tmp_path: Path) -> None:
    out = tmp_path / "s"
    assert main(["data", "synth", str(out), "--size", "1MiB", "--shape", "2x4x4", "--classes", "3", "--chunk-size", "4KiB", "--shard-size", "64KiB"]) == 0  # fmt: skip
    m = Manifest.load(out / "train")
    assert m.samples == (1 << 20) // (32 + 8) and m.chunk_samples == 4096 // 40
    assert all(s.samples % m.chunk_samples == 0 for s in m.shards[:-1])
    d = read_all(out / "train")
    assert set(np.unique(d["y"])) == {0, 1, 2}
    # learnable: nearest class mean recovers the labels
    means = np.stack([d["x"][d["y"] == c].reshape(-1, 32).mean(0) for c in range(3)])
    dist = ((d["x"].reshape(-1, 1, 32) - means[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == d["y"]).mean() > 0.99
    # same seed, other shard size: same samples
    write_shards(SynthSource(m.samples, (2, 4, 4), "uint8", 3), tmp_path / "t", shard_size="1MiB")
    e = read_all(tmp_path / "t" / "train")
    assert np.array_equal(e["x"], d["x"]) and np.array_equal(e["y"], d["y"])


@pytest.mark.parametrize("compression", ["gzip", "lz4"])
def test_compression_round_trip(tmp_path: Path, compression: str) -> None:
    src = digits_source()
    write_shards(src, tmp_path / compression, compression=compression, chunk_size="8KiB")
    m = Manifest.load(tmp_path / compression / "train")
    assert m.compression == compression
    d = read_all(tmp_path / compression / "train")
    assert rows(d["x"].reshape(1797, -1)) == rows(src.arrays["x"].reshape(1797, -1))


def test_existing_output_needs_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["data", "synth", str(tmp_path / "o"), "--samples", "300", "--shape", "4"]
    assert main(args) == 0
    before = (tmp_path / "o" / "train" / "manifest.json").read_text()
    assert main([*args, "--seed", "5"]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "o" / "train" / "manifest.json").read_text() == before
    assert main([*args, "--seed", "5", "--overwrite"]) == 0
    assert Manifest.load(tmp_path / "o" / "train").seed == 5


class _Failing:
    """A source part that fails after a few reads, as if the writer were killed."""

    def __init__(self, inner, after: int):
        self.inner, self.after, self.samples = inner, after, inner.samples

    def read(self, start: int, stop: int):
        self.after -= 1
        if self.after < 0:
            raise RuntimeError("disk on fire")
        return self.inner.read(start, stop)


def test_interrupted_writer_leaves_no_valid_dataset(tmp_path: Path) -> None:
    from hpcdl.data import ShardedDataset, verify

    src = SynthSource(4000, (8,), "uint8", 2)
    real_split = src.split
    src.split = lambda v, t, s: {k: _Failing(p, 3) for k, p in real_split(v, t, s).items()}
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_shards(src, tmp_path / "o", shard_size="8KiB", chunk_size="1KiB")
    d = tmp_path / "o" / "train"
    assert sorted(p.name for p in d.iterdir()) == [f"shard-0000{i}.h5" for i in range(3)]  # no temp
    for check in (lambda: verify(d), lambda: Manifest.load(d), lambda: ShardedDataset(d, 4)):
        with pytest.raises(HpcdlError, match=r"manifest\.json: missing"):
            check()


def test_killed_writer_leaves_no_valid_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "o"
    cmd = [
        str(BIN / "hpcdl"),
        "data",
        "synth",
        str(out),
        "--size",
        "400MiB",
        "--shard-size",
        "8MiB",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out / "train" / "shard-00001.h5").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "train" / "shard-00001.h5").exists()
    assert not (out / "train" / "manifest.json").exists()
    assert main(["data", "verify", str(out)]) == 2
    err = capsys.readouterr().err
    assert "manifest.json: missing" in err and err.count("\n") == 1


def test_mpi_ranks_write_the_same_dataset(tmp_path: Path) -> None:
    mpiexec = BIN / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("mpiexec (mpich wheel) not installed")
    args = ["data", "synth", "--samples", "5000", "--shape", "4x4", "--shard-size", "16KiB", "--chunk-size", "2KiB", "--val", "0.1"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "SLURM_", "OMPI_"))}
    p = subprocess.run([str(mpiexec), "-n", "2", str(BIN / "hpcdl"), args[0], args[1], str(tmp_path / "mpi"), *args[2:]],
                       capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("train:") == 1  # only rank 0 reports
    assert main([*args[:2], str(tmp_path / "one"), *args[2:]]) == 0
    for split in ("train", "val"):
        a = Manifest.load(tmp_path / "mpi" / split)
        assert a == Manifest.load(tmp_path / "one" / split)  # byte-identical shards (sha256)
    assert len(a.shards) >= 1 and len(Manifest.load(tmp_path / "mpi" / "train").shards) > 2


def test_array_source_rejects_bad_arrays() -> None:
    with pytest.raises(HpcdlError, match="equal lengths"):
        ArraySource({"x": np.zeros((3, 2)), "y": np.zeros(4)})
    with pytest.raises(HpcdlError, match="dtype complex128 is not supported"):
        ArraySource({"x": np.zeros((3, 2), complex)})
    with pytest.raises(HpcdlError, match="identifiers"):
        ArraySource({"x-1": np.zeros((3, 2))})
