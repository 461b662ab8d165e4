"""``hpcdl bench array``'s table and rounds (hpcdl.scheduler.array_bench; the runs themselves are
in tests/cluster/test_bench_array.py)."""

from __future__ import annotations

from hpcdl.scheduler.array_bench import PathResult, median_run, render


def test_rounds_become_one_row_of_medians_and_the_fewest_tasks_run_once() -> None:
    runs = [PathResult("p", ["1"], 30.0, 500, 500, 0.2), PathResult("p", ["2"], 10.0, 500, 499, 0.4),
            PathResult("p", ["3"], 20.0, 500, 500, 0.3)]  # fmt: skip
    row = median_run(runs)
    assert (row.wall_s, row.submit_s, row.completed_once, row.job_ids) == (20.0, 0.3, 499, ["1", "2", "3"])  # fmt: skip


def test_the_table_fits_80_columns() -> None:
    """Up to 9,999 tasks (one Slurm array: MaxArraySize is 1,001 by default) and 9,999 s."""
    rows = [PathResult("raw sbatch --array --wrap", ["1"], 24.5, 9999, 9999, 0.0, 1.0),
            PathResult("hpcdl command (Python runner)", ["2"], 9999.9, 9999, 9998, 123.4, 0.002)]  # fmt: skip
    lines = render(rows, 9999, 16, "devcluster", repeat=3)
    assert lines[0] == "bench array: 9999 tasks, throttle 16, site devcluster, median of 3 rounds"
    assert all(len(line) <= 80 for line in lines), [len(line) for line in lines]
    assert lines[-1].split()[2:] == [
        "(Python",
        "runner)",
        "9999.9",
        "123.4",
        "1.0",
        "0.00",
        "9998/9999",
    ]
