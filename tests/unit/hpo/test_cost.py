"""A sweep's cost figures (pure: tables) and the report's 80-column rendering."""

from __future__ import annotations

import io

import pytest

from hpcdl.cli.report import sweep_lines, trial_table, usage_table
from hpcdl.hpo.budget import Span
from hpcdl.hpo.cost import TrialCost, held_hours, summarize, trial_costs
from hpcdl.hpo.folder import Slot
from hpcdl.scheduler.efficiency import Usage


def _slot(i: int, state: str, value: float | None) -> Slot:
    return Slot(slot=i, trial=i, params={}, run_id=f"r{i}", state=state, value=value)


def test_trial_costs_sum_attempts_times_nodes():
    slots = [_slot(0, "complete", 0.9), _slot(1, "pruned", 0.5), _slot(2, "running", None),
             _slot(3, "failed", None)]  # fmt: skip
    spans = [Span(0, 0, "complete", 0, 3600), Span(1, 1, "running", 0, 600),
             Span(1, 1, "pruned", 700, 1300), Span(2, 2, "running", 100, None),
             Span(3, 3, "failed", 0, 60)]  # fmt: skip
    costs = trial_costs(spans, slots, held=2, now=1900, limit_s=1e9)
    assert [(c.slot, c.hours, c.ended) for c in costs] == [
        (0, 2.0, 3600), (1, pytest.approx(2 * 1200 / 3600), 1300),
        (2, pytest.approx(2 * 1800 / 3600), None), (3, pytest.approx(2 * 60 / 3600), 60)
    ]  # fmt: skip


def _c(trial: int, state: str, value: float | None, hours: float, ended: float | None):
    return TrialCost(trial, trial, state, value, hours, ended)


COSTS = [
    _c(0, "complete", 0.80, 1.0, 100),
    _c(1, "pruned", 0.40, 0.2, 50),
    _c(2, "complete", 0.95, 1.2, 300),  # the best (maximize)
    _c(3, "pruned", 0.30, 0.3, 320),
    _c(4, "complete", 0.90, 0.8, 400),
    _c(5, "running", None, 0.5, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("maximize", "best", "to_best"),
    [(True, 2, 1.0 + 0.2 + 1.2),  # trials ended by trial 2's end (300)
     (False, 0, 1.0 + 0.2)],  # minimize: trial 0 (0.80), ended at 100
)  # fmt: skip
def test_summarize(maximize, best, to_best):
    s = summarize(COSTS, maximize, "node-hours", held=5.0, other=0.1)
    assert s.best_trial == best and s.to_best == pytest.approx(to_best)
    assert s.used == pytest.approx(4.0)
    assert s.per_trial == pytest.approx(3.5 / 5)  # finished trials only
    # median complete trial 1.0: pruned ones saved 0.8 and 0.7
    assert s.pruning_saved == pytest.approx(1.5)
    assert s.held == 5.0 and s.idle == pytest.approx(1.0) and s.other == 0.1


def test_summarize_without_accounting_or_finished_trials():
    s = summarize([_c(0, "running", None, 0.5, None)], True, "GPU-hours")
    assert (s.per_trial, s.to_best, s.best_trial, s.pruning_saved, s.held, s.idle) == (
        None, None, None, None, None, None
    )  # fmt: skip
    assert any("local profile" in line for line in sweep_lines(s))


def _render(renderable) -> list[str]:
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=80).print(renderable)
    return out.getvalue().splitlines()


def test_tables_fit_80_columns():
    u = Usage("123456789_1000", "OUT_OF_MEMORY", 93784.0, 86399, 128, 64, 512, 1.0e6,
              2 * 2**40, 2**40 + 5, 99.0)  # fmt: skip
    small = Usage("14624", "COMPLETED", 30.0, 1, 1, 1, 0, 0.4, 1000 * 2**20, None, None)
    wide = Usage("9_9", "COMPLETED", 0, 3600, 1, 1, 1, 0.4, 1000 * 2**20, 999 * 2**20, None)
    lines = _render(usage_table([u, small, wide]))
    assert all(len(line) <= 80 for line in lines), lines
    assert lines[1].split() == ["123456789_1000", "OUT_OF_MEM", "26h03", "23h59", "9%", "1T/2T",
                                "99%", "1536", "12288"]  # fmt: skip
    assert lines[2].split() == ["14624", "COMPLETED", "0:30", "0:01", "40%", "-/1000M", "-",
                                "<0.001", "-"]  # fmt: skip
    assert lines[3].split()[5:] == ["999M/1000M", "-", "1.00", "1.00"]
    s = summarize(COSTS, True, "node-hours", held=12345.6, other=0.1)
    assert all(len(line) <= 80 for line in sweep_lines(s) + _render(trial_table(s)))


@pytest.mark.parametrize(
    ("args", "expected"),
    [(["report", "no-such-sweep"], "no sweep named 'no-such-sweep'"),
     (["report", "4242"], "no job '4242' in the registry"),
     (["report", "4242_x"], "no sweep named '4242_x'"),
     (["status", "--efficiency", "4242"], "no job '4242' in the registry")],
)  # fmt: skip
def test_unknown_targets_are_one_line(capsys, args, expected):
    from conftest import one_line_error

    from hpcdl.cli import main

    assert expected in one_line_error(capsys, main(args))


def test_held_hours_splits_trial_jobs_from_the_others():
    subs = [{"kind": "workers", "job_id": "10", "parts": []},
            {"kind": "array", "job_id": "20", "parts": [{"job_id": "20"}, {"job_id": "21"}]},
            {"kind": "final", "job_id": "30"}, {"kind": "follow", "job_id": "31"}]  # fmt: skip

    def u(task: str, seconds: int, nodes: int = 1, gpus: int = 0) -> Usage:
        return Usage(task, "COMPLETED", 0, seconds, 1, nodes, gpus, 1.0, None, None)

    usage = [u("10_0", 3600, 2, 8), u("10_1", 1800), u("20_5", 360), u("21_0", 360),
             u("30", 720, 1, 4), u("31", 36), u("99", 3600)]  # fmt: skip
    trials, other = held_hours(subs, usage, "node-hours")
    assert trials == pytest.approx(2 + 0.5 + 0.1 + 0.1)
    assert other == pytest.approx(0.2 + 0.01 + 1)  # a job the sweep did not submit: not a trial's
    assert held_hours(subs, usage, "GPU-hours") == (pytest.approx(8), pytest.approx(0.8))
