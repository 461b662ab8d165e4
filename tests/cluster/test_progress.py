"""Progress: the library reports done/total through callbacks; the CLI draws bars on stderr only
on a terminal (forced here with HPCDL_FORCE_PROGRESS=1) and leaves stdout unchanged."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest

from hpcdl.cli import main
from hpcdl.data import Manifest, stage, verify, write_shards
from hpcdl.data.sources import SynthSource


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))

    def check(self, total: int) -> None:
        """Starts at 0, never goes back, one total throughout, ends at it."""
        assert self.calls, "on_progress was never called"
        dones = [d for d, _ in self.calls]
        assert {t for _, t in self.calls} == {total}
        assert dones[0] == 0 and dones[-1] == total
        assert all(a <= b for a, b in itertools.pairwise(dones))
        assert len(set(dones)) > 2  # several steps, not just start and end


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("progress") / "ds"
    write_shards(SynthSource(3000, (4, 4)), out, shard_size="8KiB", chunk_size="1KiB")
    return out / "train"


def _bytes(d: Path) -> int:
    return sum(s.bytes for s in Manifest.load(d).shards)


def test_write_shards_reports_bytes_written(tmp_path: Path) -> None:
    rec = Recorder()
    source = SynthSource(3000, (4, 4))
    write_shards(source, tmp_path, val=0.1, shard_size="8KiB", chunk_size="1KiB", on_progress=rec)
    rec.check(3000 * (16 + 8))  # uint8 4x4 plus an int64 label per sample


def test_verify_reports_shard_bytes(dataset: Path) -> None:
    rec = Recorder()
    verify(dataset, on_progress=rec)
    rec.check(_bytes(dataset))


def test_stage_reports_bytes_copied_once(dataset: Path, tmp_path: Path) -> None:
    rec = Recorder()
    local = stage(dataset, tmp_path, on_progress=rec)
    rec.check(_bytes(dataset))
    again = Recorder()
    assert stage(dataset, tmp_path, on_progress=again) == local
    assert again.calls == [(_bytes(dataset), _bytes(dataset))]  # reused: complete at once


SYNTH = ["--samples", "500", "--shape", "4x4", "--shard-size", "2KiB", "--chunk-size", "1KiB"]


def _run(args: list[str], capsys: pytest.CaptureFixture[str], tmp: Path) -> tuple[str, str]:
    for folder in ("scratch", "synth"):  # every run copies/writes afresh
        shutil.rmtree(tmp / folder, ignore_errors=True)
    assert main(args) == 0
    out, err = capsys.readouterr()
    return out, err


@pytest.mark.parametrize(
    "args",
    [
        lambda ds, tmp: ["data", "verify", str(ds)],
        lambda ds, tmp: ["data", "stage", str(ds), str(tmp / "scratch")],
        lambda ds, tmp: ["data", "synth", str(tmp / "synth"), *SYNTH],
    ],
    ids=["verify", "stage", "synth"],
)
def test_bar_on_a_terminal_only_and_stdout_unchanged(
    args, dataset: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    argv = args(dataset, tmp_path)
    plain_out, plain_err = _run(argv, capsys, tmp_path)  # captured: not a terminal
    assert plain_err == ""
    monkeypatch.setenv("HPCDL_FORCE_PROGRESS", "1")
    out, err = _run(argv, capsys, tmp_path)
    assert out == plain_out
    assert "━" in err and "\x1b[" in err  # a drawn bar
    assert any(word in err for word in ("verifying", "staging", "writing shards"))
    monkeypatch.setenv("HPCDL_NO_PROGRESS", "1")
    assert _run(argv, capsys, tmp_path) == (plain_out, "")


def test_bench_io_counts_timed_runs(dataset: Path) -> None:
    from hpcdl.data.bench import run_io_bench

    rec = Recorder()
    run_io_bench(
        dataset, batch_size=256, workers=(0,), threads=1, naive_workers=0, naive_seconds=0.2,
        limit_seconds=1.0, repeat=2, cold=False, on_progress=rec,
    )  # fmt: skip
    rec.check(3 * 2 + 1)  # (raw read + shuffle ceiling + hpcdl) x repeat + naive, warm only


def test_sync_bar_counts_runs(tmp_path: Path, capsys, monkeypatch) -> None:
    from types import SimpleNamespace

    import hpcdl.cli.sweep as sweep_cli
    from hpcdl.hpo import Sweep

    for i in range(3):
        (tmp_path / f"trial-{i}" / f"offline-run-{i}").mkdir(parents=True)
    fake = SimpleNamespace(paths=SimpleNamespace(root=tmp_path))
    monkeypatch.setattr(Sweep, "load", staticmethod(lambda name: fake))
    monkeypatch.setattr(sweep_cli, "_wandb", lambda: shutil.which("true"))  # a sync that works
    plain_out, plain_err = _run(["sync", "s"], capsys, tmp_path)
    assert plain_out.count("synced ") == 3 and plain_err == ""
    monkeypatch.setenv("HPCDL_FORCE_PROGRESS", "1")
    out, err = _run(["sync", "s"], capsys, tmp_path)
    assert out == plain_out
    assert "syncing W&B runs" in err and "3/3" in err


def test_long_work_off_a_terminal_prints_a_plain_line_now_and_then(capsys, monkeypatch):
    from hpcdl.cli.progress import OFF_ENV, bar

    with bar("searching", lines_every_s=3600) as update:  # capsys: stderr is no terminal
        assert update is not None
        for done in (0, 1, 2, 3, 4):
            update(done, 4)
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" after ")[0] for line in err] == [
        "hpcdl: searching: 1/4",  # the first step done, then nothing for an hour, but the end
        "hpcdl: searching: 4/4",
    ]
    with bar("quiet") as update:  # short work: nothing off a terminal, as before
        assert update is None
    monkeypatch.setenv(OFF_ENV, "1")
    with bar("searching", lines_every_s=0) as update:
        assert update is None
