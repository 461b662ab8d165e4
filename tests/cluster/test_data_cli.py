"""CLI: bad inputs give one `error:` line with status 2 and write nothing; stage; bench io."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpcdl.cli import main
from hpcdl.data import Manifest, stage, write_shards
from hpcdl.data.sources import SynthSource


def _npz_object(tmp: Path) -> str:
    np.savez(tmp / "o.npz", x=np.array([{"a": 1}], dtype=object))
    return str(tmp / "o.npz")


def _mixed_images(tmp: Path) -> str:
    for cls, size in (("a", (4, 4)), ("b", (5, 4))):
        (tmp / "img" / cls).mkdir(parents=True)
        Image.fromarray(np.zeros(size, np.uint8)).save(tmp / "img" / cls / "0.png")
    return str(tmp / "img")


def _a_file(tmp: Path) -> str:
    (tmp / "f.txt").write_text("")
    return str(tmp / "f.txt")


BAD = [
    (lambda t: ["data", "shard", str(t / "nope.npz"), "OUT"], "nope.npz: source: no such file"),
    (lambda t: ["data", "shard", str(t / "nope"), "OUT"], "nope: source: no such file or directory"),
    (lambda t: ["data", "shard", _npz_object(t), "OUT"], "o.npz: source: not a readable numpy file"),
    (lambda t: ["data", "shard", _mixed_images(t), "OUT"], "b/0.png: image: has shape (1, 5, 4) (C, H, W) but"),
    (lambda t: ["data", "shard", "digits", "OUT", "--val", "0.6", "--test", "0.5"], "leave no training samples"),
    (lambda t: ["data", "shard", "digits", "OUT", "--val", "-0.1"], "split: val: -0.1 must be a fraction in [0, 1)"),
    (lambda t: ["data", "shard", "digits", "OUT", "--chunk-size", "-4MiB"], "chunk_size: '-4MiB' is not a size"),
    (lambda t: ["data", "shard", "digits", "OUT", "--shard-size", "0"], "shard_size: '0' must be a positive size"),
    (lambda t: ["data", "shard", "digits", "OUT", "--compression", "zstd"], "'zstd' is not one of 'none', 'gzip', 'lz4'"),
    (lambda t: ["data", "shard", "digits", _a_file(t)], "f.txt/train: output: cannot create the folder"),
    (lambda t: ["data", "synth", "OUT", "--samples", "10", "--shape", "3xx2"], "--shape: shape: '3xx2' is not a shape"),
    (lambda t: ["data", "synth", "OUT", "--samples", "10", "--shape", "3x0"], "is not a shape; use positive sizes"),
    (lambda t: ["data", "synth", "OUT", "--samples", "-5"], "samples: -5 must be positive"),
    (lambda t: ["data", "synth", "OUT", "--size", "-1GiB"], "--size: size: '-1GiB' is not a size"),
    (lambda t: ["data", "synth", "OUT", "--size", "10"], "--size: size: 10 holds no sample of 3080 bytes"),
    (lambda t: ["data", "synth", "OUT"], "give exactly one of them"),
    (lambda t: ["data", "synth", "OUT", "--samples", "9", "--dtype", "complex64"], "--dtype: dtype: 'complex64' is not supported"),
    (lambda t: ["data", "synth", "OUT", "--samples", "9", "--classes", "1"], "classes: 1 must be at least 2"),
    (lambda t: ["data", "verify", str(t / "nope")], "nope: no such directory"),
    (lambda t: ["data", "stage", str(t / "nope"), str(t / "scratch")], "nope: no such dataset directory"),
    (lambda t: ["bench", "io", str(t / "nope")], "nope: no such dataset directory"),
    (lambda t: ["bench", "io", str(t), "--workers", "a,b"], "--workers: workers: 'a,b': use counts >= 0"),
    (lambda t: ["bench", "io", str(t), "--repeat", "0"], "--repeat: repeat: 0 must be >= 1"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_input(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    argv,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err
    assert not (tmp_path / "OUT").exists()  # nothing half-written


def test_digits_for_a_sweep(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "shard", "digits", str(tmp_path / "digits")]) == 0
    out = capsys.readouterr().out
    assert "train: " in out and "(1437 samples" in out and "val: " in out and "test: " in out
    assert main(["data", "verify", str(tmp_path / "digits")]) == 0
    assert capsys.readouterr().out.count("ok: ") == 3


def _stage_worker(src: str, scratch: str, q: multiprocessing.Queue) -> None:
    q.put(str(stage(src, scratch)))


def test_stage_copies_once_per_node(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_shards(SynthSource(3000, (16,)), tmp_path / "d", shard_size="8KiB")
    src = tmp_path / "d" / "train"
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_stage_worker, args=(str(src), str(tmp_path / "s"), q)) for _ in range(3)]  # fmt: skip
    for p in procs:
        p.start()
    paths = {q.get(timeout=60) for _ in procs}
    for p in procs:
        p.join()
    assert len(paths) == 1  # every local rank reads the same copy
    dest = Path(paths.pop())
    assert Manifest.load(dest) == Manifest.load(src)
    assert [p.name for p in (tmp_path / "s").iterdir() if not p.name.endswith(".lock")] == [
        dest.name
    ]
    before = (dest / "shard-00000.h5").stat().st_mtime_ns
    assert main(["data", "stage", str(src), str(tmp_path / "s"), "--checksums"]) == 0
    assert capsys.readouterr().out.strip() == str(dest)
    assert (dest / "shard-00000.h5").stat().st_mtime_ns == before  # reused, not copied again


def test_bench_io_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_shards(SynthSource(6000, (3, 8, 8)), tmp_path, shard_size="64KiB", chunk_size="8KiB")
    argv = ["bench", "io", str(tmp_path / "train"), "--batch-size", "64", "--repeat", "1"]
    assert main([*argv, "--naive-seconds", "0.3", "--no-cold", "--workers", "0,1"]) == 0
    out = capsys.readouterr().out
    for row in ("raw read, 1 stream", "raw read, 2 streams", "shuffle ceiling", "hpcdl, 0 workers", "hpcdl, 1 workers", "naive, 2 workers"):  # fmt: skip
        assert row in out
    assert out.count("│ warm") == 6 and "│ cold" not in out
    assert "cold rows skipped (--no-cold)" in out
