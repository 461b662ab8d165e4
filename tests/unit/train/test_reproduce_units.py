"""``hpcdl reproduce``'s pure parts on hand-made run folders: what the comparison calls a
difference (timings are not), and the one-line errors for what a folder lacks. The re-run
itself is tests/cluster/test_reproduce.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hpcdl.errors import ConfigError
from hpcdl.train.reproduce import NEEDED, check, compare

ROWS = [
    {"kind": "event", "event": "start", "step": 0, "world_size": 1, "time": 1.0},
    {"kind": "step", "step": 1, "epoch": 0, "loss": 2.5, "acc": 0.1, "lr": 0.001,
     "samples_per_s": 100.0, "step_time_s": 0.5, "time": 2.0},
    {"kind": "step", "step": 2, "epoch": 0, "loss": 2.25, "acc": 0.2, "lr": 0.001,
     "samples_per_s": 90.0, "step_time_s": 0.6, "time": 3.0},
    {"kind": "epoch", "epoch": 0, "step": 2, "val_loss": 2.0, "val_acc": 0.3, "time": 4.0},
]  # fmt: skip
RESULT = {"status": "completed", "step": 2, "epochs": 1, "val_loss": 2.0, "val_acc": 0.3,
          "world_size": 1, "step_time_mean_s": 0.55}  # fmt: skip


def _folder(path: Path, rows=ROWS, result=RESULT, weights=None) -> Path:
    """A run folder as the trainer leaves it: the result is also its 'completed' event."""
    path.mkdir(parents=True)
    done = {"kind": "event", "event": "completed", **result}
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, done]))
    (path / "result.json").write_text(json.dumps(result))
    weights = weights or {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2)}
    torch.save(weights, path / "model.pt")
    return path


def test_identical_runs_have_no_difference_whatever_their_timings(tmp_path):
    timed = [{**r, "time": 9.0, "samples_per_s": 1.0} if "time" in r else r for r in ROWS]
    a = _folder(tmp_path / "a")
    b = _folder(tmp_path / "b", rows=timed, result={**RESULT, "step_time_mean_s": 9.9})
    assert compare(a, b) == ([], {"rows": 3, "tensors": 2})


CHANGES = [
    ("a step's loss", {"rows": [*ROWS[:2], {**ROWS[2], "loss": 2.2500001}, ROWS[3]]},
     ["step row of step 2: loss 2.25 recorded, 2.2500001 re-run", "weights"]),
    ("a row fewer", {"rows": ROWS[:3]}, ["metrics: 3 step/epoch rows recorded, 2 in the re-run"]),
    ("the result", {"result": {**RESULT, "val_acc": 0.31}}, ["result val_acc: 0.3 recorded, 0.31"]),
    ("one weight", {"weights": {"w": torch.arange(6.0).reshape(2, 3) + 1e-7 * torch.eye(2, 3),
                                "b": torch.zeros(2)}}, ["weights 'w': differ (largest difference 1e-07)"]),
    ("a tensor more", {"weights": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2),
                                   "c": torch.ones(1)}}, ["weights: tensors ['c'] in only one"]),
]  # fmt: skip


@pytest.mark.parametrize(("label", "change", "expected"), CHANGES, ids=[c[0] for c in CHANGES])
def test_each_kind_of_difference_is_named(tmp_path, label, change, expected):
    if label == "a step's loss":  # a metric differs: so would the weights it came from
        change = {**change, "weights": {"w": torch.ones(2, 3), "b": torch.zeros(2)}}
    a, b = _folder(tmp_path / "a"), _folder(tmp_path / "b", **change)
    diffs, _ = compare(a, b)
    for text in expected:
        assert any(text in d for d in diffs), (text, diffs)


@pytest.mark.parametrize("name", list(NEEDED))
def test_a_missing_file_is_named_with_what_it_is_for(tmp_path, name):
    run = _folder(tmp_path / "run")
    for other in NEEDED:
        if not (run / other).exists():
            (run / other).write_text("{}")
    (run / name).unlink()
    with pytest.raises(ConfigError, match=rf"^{run}: {name}: missing: \S") as info:
        check(run)
    assert len(str(info.value).splitlines()) == 1


def test_the_result_is_the_trainings_even_where_a_sweep_replaced_result_json(tmp_path):
    """A sweep's final folder: result.json holds the sweep's final result (trial, params,
    test_acc), the training's own is its 'completed' event."""
    a, b = _folder(tmp_path / "a"), _folder(tmp_path / "b")
    (a / "result.json").write_text(json.dumps({"trial": 0, "val_acc": 0.29, "test_acc": 0.3}))
    assert compare(a, b)[0] == []
    (b / "metrics.jsonl").write_text((b / "metrics.jsonl").read_text().replace(
        '"val_acc": 0.3, "world_size"', '"val_acc": 0.31, "world_size"'))  # fmt: skip
    assert compare(a, b)[0] == ["result val_acc: 0.3 recorded, 0.31 re-run"]


def test_a_run_that_did_not_complete_is_refused(tmp_path):
    run = _folder(tmp_path / "run", rows=ROWS)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))  # no event
    shutil.copy(Path(__file__).parents[3] / "configs/train_digits.yaml", run / "config.yaml")
    (run / "provenance.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"metrics\.jsonl: no 'completed' event: the run did "
                       r"not complete \(or was pruned\)"):  # fmt: skip
        check(run)


def test_a_record_made_without_git_says_so(tmp_path):
    run = _folder(tmp_path / "run")
    shutil.copy(Path(__file__).parents[3] / "configs/train_digits.yaml", run / "config.yaml")
    (run / "provenance.json").write_text(json.dumps({
        "versions": {"torch": "2"}, "data": {}, "code": {"error": "'git' is not on PATH"}}))  # fmt: skip
    with pytest.raises(ConfigError, match=r"provenance\.json: code: not recorded when the run "
                       r"was made: 'git' is not on PATH$"):  # fmt: skip
        check(run)
