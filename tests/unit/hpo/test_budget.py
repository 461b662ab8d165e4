"""A sweep's budget: the spec's validation, what the trials spent (workers' clock), when a new
trial is refused and what the sweep folder then counts as missing (tables; no process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import one_line_error

from hpcdl.cli import main
from hpcdl.hpo.budget import Span, refuse_new_trial, span_seconds, spans, spent, spent_hours
from hpcdl.hpo.folder import Slot, SweepPaths
from hpcdl.hpo.spec import SweepSpec

BASE = {
    "name": "b",
    "objective": "tests.helpers.objectives:curve",
    "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
    "trials": 10,
    "resources": {"site": "local", "time": "10m"},
}

BAD_BUDGETS = [
    ({}, "budget: give one of node_hours or gpu_hours"),
    ({"node_hours": 1, "gpu_hours": 2}, "budget: give one of node_hours or gpu_hours"),
    ({"node_hours": 0}, "budget.node_hours: Input should be greater than 0"),
    ({"node_hours": -2}, "budget.node_hours: Input should be greater than 0"),
    ({"node_hours": "lots"}, "budget.node_hours: Input should be a valid number"),
    ({"gpu_hours": 4}, "budget: gpu_hours needs trials with GPUs"),
    ({"node_hour": 4}, "budget.node_hour: unknown field"),
    (3, "budget: Input should be a valid dictionary"),
]  # fmt: skip


@pytest.mark.parametrize(("budget", "expected"), BAD_BUDGETS)
def test_bad_budget_is_one_line(tmp_path, capsys, budget, expected):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**BASE, "budget": budget}))
    line = one_line_error(capsys, main(["sweep", "run", str(path)]))
    assert line.startswith(f"error: {path}: ") and expected in line
    assert not (tmp_path / "jobs").exists()


def test_good_budgets():
    assert SweepSpec.model_validate({**BASE, "budget": {"node_hours": 0.5}}).budget.unit == (
        "node-hours"
    )
    gpu = {**BASE, "budget": {"gpu_hours": 8}, "resources": {"gpus_per_node": 2, "nodes": 2}}
    b = SweepSpec.model_validate(gpu).budget
    assert (b.hours, b.unit) == (8, "GPU-hours")


def _slot(i: int, state: str, claimed_at: float | None = None) -> Slot:
    return Slot(slot=i, trial=i, params={}, run_id=f"r{i}", state=state, claimed_at=claimed_at)


JOURNALS = {
    "1_0": [
        {"event": "start", "time": 0.0},
        {"event": "trial", "slot": 0, "trial": 0, "state": "complete", "claimed": 10.0, "ended": 70.0},
        {"event": "trial", "slot": 2, "trial": 2, "state": "running", "claimed": 71.0, "ended": 101.0},
    ],
    "1_1": [
        {"event": "trial", "slot": 1, "trial": 1, "state": "pruned", "claimed": 12.0, "ended": 42.0},
        {"event": "requeued", "signal": "SIGTERM"},
    ],
}  # fmt: skip


def test_spans_count_ended_attempts_and_running_slots():
    slots = [_slot(0, "complete", 10), _slot(1, "pruned", 12), _slot(2, "running", 200),
             _slot(3, "retry", 150), _slot(4, "running", None)]  # fmt: skip
    got = spans(JOURNALS, slots)
    assert sorted((s.slot, s.claimed, s.ended) for s in got) == [
        (0, 10.0, 70.0), (1, 12.0, 42.0), (2, 71.0, 101.0), (2, 200.0, None)
    ]  # fmt: skip
    # 60 + 30 + 30 s ended, slot 2's second attempt 100 s so far; two nodes per trial
    assert spent_hours(got, 2, now=300.0, limit_s=600) == pytest.approx(2 * 220 / 3600)


@pytest.mark.parametrize(
    ("ended", "now", "limit", "seconds"),
    [(70.0, 1e9, 5, 60.0),  # ended: its own length, whatever the limit
     (None, 40.0, 600, 30.0),  # running: up to now
     (None, 5000.0, 600, 600.0),  # left 'running' by a dead worker: never past the time limit
     (None, 5.0, 600, 0.0)],  # a clock behind the claim: nothing, not negative
)  # fmt: skip
def test_span_seconds(ended, now, limit, seconds):
    assert span_seconds(Span(0, 0, "x", 10.0, ended), now, limit) == seconds


def _folder(tmp_path: Path, budget: dict, slots: list[Slot]) -> tuple[SweepPaths, SweepSpec]:
    spec = SweepSpec.model_validate({**BASE, "budget": budget})
    paths = SweepPaths(tmp_path)
    paths.workers.mkdir(exist_ok=True)
    paths.slots.mkdir(exist_ok=True)
    for task, lines in JOURNALS.items():
        (paths.workers / f"{task}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    for s in slots:
        paths.write_slot(s)
    return paths, spec


def test_refuse_new_trial_once_spent_and_unsampled_slots_stop_being_missing(tmp_path):
    slots = [_slot(0, "complete"), _slot(1, "pruned"), _slot(2, "running", None)]
    # 120 s spent on one node: a budget of 121 s is not spent yet, 120 s is
    paths, spec = _folder(tmp_path, {"node_hours": 121 / 3600}, slots)
    assert spent(paths, spec, "node-hours") == pytest.approx(120 / 3600)
    assert not refuse_new_trial(paths, spec) and not paths.budget_spent.exists()
    assert paths.missing_slots(range(10)) == [2, 3, 4, 5, 6, 7, 8, 9]
    paths, spec = _folder(tmp_path, {"node_hours": 120 / 3600}, [])
    assert refuse_new_trial(paths, spec)
    note = json.loads(paths.budget_spent.read_text())
    assert note["unit"] == "node-hours" and note["spent"] == pytest.approx(120 / 3600)
    # the running trial still counts as missing (it finishes); the never sampled do not
    assert paths.missing_slots(range(10)) == [2]


def test_no_budget_never_refuses(tmp_path):
    spec = SweepSpec.model_validate(BASE)
    assert not refuse_new_trial(SweepPaths(tmp_path), spec)
