"""Resuming on a different world size: the re-split of an interrupted epoch (every sample of it
exactly once, equal batch counts per rank), the DeepSpeed side (ZeRO state re-sharded through a
universal checkpoint), bad inputs, and on the dev cluster 4 -> 2 and 2 -> 4 ranks."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcdl.cli import main
from hpcdl.data import ShardedDataset, ShardLoader, write_shards
from hpcdl.data.reader import RECORD_ENV, SAMPLE_IDS
from hpcdl.data.remainder import Layout, consumed_per_slot, remaining, resplit_batches
from hpcdl.data.sources import ArraySource, load_source
from hpcdl.errors import HpcdlError
from hpcdl.scheduler import FINISHED, JobHandle, find_handle, log_tail
from hpcdl.train.run import Run

sys.path.insert(0, str(Path(__file__).parents[1] / "helpers"))
from conftest import HPCDL, one_line_error
from train_setup import env_with_helpers, last_step, rows, write_config, write_digits

N = 2003  # not a multiple of anything: partial chunks, shards and batches


@pytest.fixture(scope="module")
def ds_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2003 samples (field ``i`` is the sample's index), 21 per chunk, 5 chunks per shard."""
    out = tmp_path_factory.mktemp("resize")
    idx = np.arange(N, dtype=np.int64)
    write_shards(ArraySource({"i": idx}), out, chunk_size=21 * 8, shard_size=5 * 21 * 8)
    return out / "train"


def _ranks(ds_path: Path, bs: int, world: int, workers: int, **kw) -> list[ShardedDataset]:
    return [
        ShardedDataset(
            ds_path, bs, rank=r, world_size=world, num_workers=workers, block_units=3, **kw
        )
        for r in range(world)
    ]


def _take(ds: ShardedDataset, n: int | None = None) -> tuple[list[np.ndarray], ShardLoader]:
    loader = ShardLoader(ds)
    out = []
    for batch in loader:
        out.append(batch["i"].numpy())
        if n is not None and len(out) == n:
            break
    return out, loader


# -- the remainder arithmetic alone: many layouts, positions and world sizes -------------------
def test_remainder_plan_property_many_seeds() -> None:
    """Consumed + remainder == the epoch's samples, none twice; the re-split gives every rank
    the same number of batches, none larger than the batch size, and covers the remainder."""
    rng = random.Random(1234)
    for trial in range(60):
        sizes = np.array([rng.randint(1, 9) for _ in range(rng.randint(20, 80))])
        bs = rng.randint(1, 6)
        lay = Layout(sizes, 9, bs, trial, rng.random() < 0.8, rng.randint(1, 4), rng.random() < 0.7)
        w0, k0 = rng.randint(1, 5), rng.choice([0, 1, 2, 3])
        slots, _, used = lay.slot_span(w0, k0)
        if used < bs:
            continue
        per_rank = used // bs * max(1, k0) if lay.drop_last else -(-used // bs) * max(1, k0)
        state = {"epoch": rng.randint(0, 5), "world_size": w0, "num_workers": k0,
                 "batches": rng.randint(0, per_rank)}  # fmt: skip
        covered = lay.covered(w0, k0)
        left = remaining(lay, state)
        consumed = []
        for slot in range(slots):
            plan = lay.normal(state["epoch"], w0, k0, slot)
            got = consumed_per_slot(state["batches"], k0)[slot % max(1, k0)]
            consumed.append(lay.yielded(state["epoch"], plan, int(plan.bounds[got])))
        done = np.concatenate(consumed)
        both = np.concatenate([done, left])
        assert len(both) == len(set(both.tolist())) and set(both.tolist()) == set(covered.tolist())
        w1, k1 = rng.randint(1, 6), rng.choice([0, 1, 2])
        try:
            per = resplit_batches(len(left), w1, bs)
        except HpcdlError:
            assert len(left) // w1 < -(-len(left) // (w1 * bs))
            continue
        again = []
        for rank in range(w1):
            counts = []
            for role in range(max(1, k1)):
                slot = rank * max(1, k1) + role
                plan = lay.resplit(state["epoch"], left, w1, k1, slot, 1)
                assert (
                    np.diff(plan.bounds).max(initial=0) <= bs
                    and np.diff(plan.bounds).min(initial=1) >= 1
                )
                counts.append(plan.batches)
                again.append(lay.yielded(state["epoch"], plan, int(plan.bounds[-1])))
            assert sum(counts) == per
        again_all = np.concatenate([np.empty(0, np.int64), *again])
        assert sorted(again_all.tolist()) == left.tolist()


def test_too_few_samples_left_for_the_ranks_is_a_clear_error() -> None:
    with pytest.raises(HpcdlError, match=r"3 samples are left .* each of 4 ranks 1 batch"):
        resplit_batches(3, 4, 8)
    assert resplit_batches(0, 4, 8) == 0 and resplit_batches(65, 2, 32) == 2


# -- through the loader: the ids it hands out ---------------------------------------------------
@pytest.mark.parametrize(
    ("w0", "k0", "w1", "k1", "bs", "shuffle"),
    [(4, 0, 2, 0, 16, True), (2, 0, 4, 0, 16, True), (2, 2, 3, 0, 7, True),
     (3, 1, 2, 2, 10, False), (1, 0, 5, 0, 9, True)],
)  # fmt: skip
def test_loader_resumed_on_another_world_size_yields_the_rest_exactly_once(
    ds_path: Path, w0: int, k0: int, w1: int, k1: int, bs: int, shuffle: bool
) -> None:
    epoch_cut = 1
    full = []
    for ds in _ranks(ds_path, bs, w0, k0, shuffle=shuffle):
        ds.set_epoch(epoch_cut)
        full += _take(ds)[0]
    expected = np.concatenate(full)
    cut = random.Random(w0 * 10 + w1).randint(1, len(_ranks(ds_path, bs, w0, k0)[0]) - 1)
    first, state = [], None
    for ds in _ranks(ds_path, bs, w0, k0, shuffle=shuffle):
        ds.set_epoch(epoch_cut)
        got, loader = _take(ds, cut)
        first += got
        state = loader.state_dict()
    assert state is not None and state["batches"] == cut
    second, lengths = [], []
    for ds in _ranks(ds_path, bs, w1, k1, shuffle=shuffle):
        loader = ShardLoader(ds)
        loader.load_state_dict(state)
        loader.set_epoch(epoch_cut)  # keeps the loaded position
        got = [b["i"].numpy() for b in loader]
        lengths.append(len(got))
        assert all(0 < len(b) <= bs for b in got)
        second += got
        # the next epoch follows this world size's normal plan
        loader.set_epoch(epoch_cut + 1)
        assert len([b for b in loader]) == len(ds)
    assert len(set(lengths)) == 1  # every rank the same number of batches
    both = np.concatenate(first + second)
    assert len(both) == len(set(both.tolist())) == len(expected)
    assert set(both.tolist()) == set(expected.tolist())


def test_resized_state_resumes_again_on_the_same_or_another_world_size(ds_path: Path) -> None:
    """A state saved inside a re-split epoch carries its origin: resuming it on the same
    world size continues the re-split plan, on another one re-splits what is left."""
    bs, ep = 8, 2
    expected, first, state = [], [], None
    for ds in _ranks(ds_path, bs, 4, 0):
        ds.set_epoch(ep)
        expected += _take(ds)[0]
    for ds in _ranks(ds_path, bs, 4, 0):
        ds.set_epoch(ep)
        got, loader = _take(ds, 5)
        first += got
        state = loader.state_dict()
    second, state2 = [], None
    for ds in _ranks(ds_path, bs, 2, 0):
        loader = ShardLoader(ds)
        loader.load_state_dict(state)
        got = []
        for batch in loader:
            got.append(batch["i"].numpy())
            if len(got) == 7:
                break
        second += got
        state2 = loader.state_dict()
    assert state2 is not None and state2["resized"] == state and state2["batches"] == 7
    for world in (2, 3):  # the same world size (continue), another (re-split again)
        third = []
        for ds in _ranks(ds_path, bs, world, 0):
            loader = ShardLoader(ds)
            loader.load_state_dict(state2)
            third += [b["i"].numpy() for b in loader]
        both = np.concatenate(first + second + third)
        assert len(both) == len(set(both.tolist()))
        assert set(both.tolist()) == set(np.concatenate(expected).tolist())


def test_sample_ids_are_recorded_when_asked(ds_path: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(RECORD_ENV, str(tmp_path / "ids"))
    ds = ShardedDataset(ds_path, 16, rank=1, world_size=2)
    batches = [b["i"].tolist() for b in ShardLoader(ds)]
    rows = [json.loads(x) for x in (tmp_path / "ids/train-rank001.jsonl").read_text().splitlines()]
    # an id is a sample's position in the shards laid end to end (the writer shuffled them)
    stored = np.concatenate([h5py.File(ds_path / s.file)["i"][:] for s in ds.manifest.shards])
    assert [stored[r["ids"]].tolist() for r in rows] == batches
    assert rows[-1]["batch"] == len(batches) - 1
    assert {r["world_size"] for r in rows} == {2} and {r["epoch"] for r in rows} == {0}
    monkeypatch.delenv(RECORD_ENV)
    assert SAMPLE_IDS not in next(iter(ShardLoader(ShardedDataset(ds_path, 16))))


def test_resize_keeps_the_other_settings_fixed(ds_path: Path) -> None:
    state = ShardedDataset(ds_path, 12, world_size=2).state_dict(3)
    with pytest.raises(HpcdlError, match=r"^cannot resume the data position exactly: shuffle was"):
        ShardedDataset(ds_path, 12, shuffle=False).load_state_dict(state)
    with pytest.raises(HpcdlError, match="past the end of epoch"):
        ShardedDataset(ds_path, 12, world_size=3).load_state_dict({**state, "batches": 10**6})


# -- bad input on a resume: one line, nothing written -------------------------------------------
def test_resume_with_another_model_or_an_indivisible_world_size_is_refused(tmp_path, capsys):
    digits = write_digits(tmp_path / "digits")
    config = write_config(tmp_path / "train.yaml", digits, tmp_path / "runs")
    run_dir = tmp_path / "runs/r"
    Run.from_config(config, [f"run_dir={run_dir}"]).prepare()  # a run folder to resume
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    line = one_line_error(capsys, main(["train", str(config), "--local", f"run_dir={run_dir}",
                                        "model.hidden=[32]"]))  # fmt: skip
    assert f"{run_dir} holds a run with a different 'model'" in line, line
    import torch.distributed as dist

    assert not dist.is_initialized(), "a refused run left its process group behind"
    line = one_line_error(capsys, main(["train", str(config), "--site", "devcluster",
                                        f"run_dir={run_dir}", "job.nodes=3"]))  # fmt: skip
    assert "batch.size: 64 is not divisible by batch.micro 16 x 6 ranks = 96" in line, line
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


# -- on the dev cluster: 4 -> 2 and 2 -> 4 ranks, side by side ---------------------------------
STEP_DELAY = {"name": "train_models:SlowMLP", "delay_s": 0.1, "hidden": [128, 64], "dropout": 0.1}
FOUR, TWO = ("job.nodes=2", "job.tasks_per_node=2"), ("job.nodes=1", "job.tasks_per_node=2")


def _submit(config: Path, *overrides: str) -> subprocess.Popen[str]:
    """``hpcdl train CONFIG --site devcluster OVERRIDES`` in the background (see _submitted)."""
    return subprocess.Popen([HPCDL, "train", str(config), "--site", "devcluster", *overrides],
                            env={**os.environ, **env_with_helpers()}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _submitted(proc: subprocess.Popen[str]) -> tuple[Path, JobHandle]:
    """The run folder and job of a finished ``hpcdl train`` submission."""
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, out + err
    run_dir = Path(re.search(r"run folder: (\S+)", out)[1])
    return run_dir, find_handle(re.search(r"submitted job (\d+)", out)[1])


def _ids(folder: Path, epoch: int, world: int) -> list[int]:
    """Every train sample id the ranks of ``world`` handed out in ``epoch`` (a multiset)."""
    out = []
    for path in folder.glob("train-rank*.jsonl"):
        for row in map(json.loads, path.read_text().splitlines()):
            if row["epoch"] == epoch and row["world_size"] == world:
                out += row["ids"]
    return out


def _drive(runs: dict[str, dict], stop_at: int, deadline: float) -> None:
    """Until every job ends: USR2 to each ``cut`` run once it logged ``stop_at`` (with
    ``max_requeues=0`` it checkpoints and ends), then its resubmission on the other shape."""
    while not all(r["job"].state() in FINISHED for r in runs.values()):
        for name, other in (("cut4", TWO), ("cut2", FOUR)):
            run = runs[name]
            if run["part"] == 1 and last_step(run["dir"]) >= stop_at:
                subprocess.run(["scancel", "--signal=USR2", run["job"].job_id], check=True,
                               timeout=30)  # fmt: skip
                run["part"] = 1.5
            if run["part"] == 1.5 and run["job"].state() in FINISHED:  # stopped, not requeued
                run["job"] = _submitted(_submit(run["config"], f"run_dir={run['dir']}", *other))[1]
                run["part"] = 2  # resubmitted on another world size
        late = time.monotonic() > deadline
        assert not late, "\n".join(f"{n}: {log_tail(r['job'])}" for n, r in runs.items())
        time.sleep(0.3)


@pytest.mark.slurm
def test_resume_on_half_and_on_double_the_ranks_on_the_dev_cluster(devcluster, tmp_path):
    """4 ranks (2 nodes x 2 tasks) stopped mid-epoch by USR2 (the time-limit signal), resubmitted on 2
    (1 node x 2 tasks), and 2 -> 4, next to uninterrupted runs of 4 and 2 ranks: the resume is
    at the checkpoint's step, the interrupted epoch's samples (recorded by the loaders) are
    those of the uninterrupted epoch, each once, and the final val_acc is within 0.01."""
    digits = tmp_path / "digits"  # a larger validation set: 0.01 of it is ~5 samples
    write_shards(load_source("digits"), digits, val=0.3, test=0.05, chunk_size="4KiB")
    runs, stop_at = {}, 6 * 18 + 8  # mid epoch 6 of 10 (18 steps per epoch at 4 and 2 ranks)
    for name, shape in (("ref4", FOUR), ("ref2", TWO), ("cut4", FOUR), ("cut2", TWO)):
        config = write_config(tmp_path / f"{name}.yaml", digits, tmp_path / "runs", name=name,
                              model=STEP_DELAY, epochs=10, log__every_steps=1,
                              checkpoint__every_steps=50, job__max_requeues=0,
                              job__env={RECORD_ENV: str(tmp_path / f"ids-{name}")})  # fmt: skip
        runs[name] = {"config": config, "proc": _submit(config, *shape), "part": 1}
    for run in runs.values():  # submitted side by side
        run["dir"], run["job"] = _submitted(run.pop("proc"))
    try:
        _drive(runs, stop_at, deadline=time.monotonic() + 600)
    finally:
        for run in runs.values():
            if run["job"].state() not in FINISHED:
                run["job"].cancel()
    for cut, ref, before, after in (("cut4", "ref4", 4, 2), ("cut2", "ref2", 2, 4)):
        run_dir, ref_dir = runs[cut]["dir"], runs[ref]["dir"]
        assert runs[cut]["job"].state() == "COMPLETED", log_tail(runs[cut]["job"])
        events = [r for r in rows(run_dir, "event") if r["event"] in ("preempted", "resume")]
        assert [e["event"] for e in events] == ["preempted", "resume"], events
        stop, resume = events
        assert resume["step"] == stop["step"] and resume["checkpoint"] == stop["tag"]
        assert resume["world_size"] == after and resume["checkpoint_world_size"] == before
        assert resume["resized"] == f"resumed on {after} ranks from a checkpoint of {before} ranks"
        epoch = stop["step"] // 18
        assert stop["step"] % 18, stop  # mid-epoch
        first = _ids(tmp_path / f"ids-{cut}", epoch, before)
        second = _ids(tmp_path / f"ids-{cut}", epoch, after)
        uninterrupted = _ids(tmp_path / f"ids-{ref}", epoch, before)
        assert first and second and len(first) + len(second) == len(set(first + second))
        assert sorted(first + second) == sorted(uninterrupted)
        result = json.loads((run_dir / "result.json").read_text())
        reference = json.loads((ref_dir / "result.json").read_text())
        assert result["world_size"] == after and result["epochs"] == 10
        print(f"{cut}: val_acc {result['val_acc']:.4f}, uninterrupted {reference['val_acc']:.4f}")
        assert abs(result["val_acc"] - reference["val_acc"]) <= 0.01, (result, reference)
        assert not (run_dir / "checkpoints/universal").exists()
