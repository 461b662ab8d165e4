"""``hpcdl bench hpo``'s pruning comparison: the summary over seeds, and its bad input."""

from __future__ import annotations

import math

from hpcdl.hpo.bench import summarize_ratios


def test_bench_hpo_bad_seed_count(capsys):
    from hpcdl.cli import main

    assert main(["bench", "hpo", "--seeds", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --seeds: 0 must be >= 1"], err


def test_a_seed_that_never_reaches_the_target_counts_as_infinite():
    seeds = [{"asha": {"r": r}} for r in (0.5, None, 0.25, 1.0, 0.3)]
    x = summarize_ratios(seeds, "asha", "r")
    assert x["median"] == 0.5 and x["min"] == 0.25 and math.isinf(x["max"])
    assert x["not_reached"] == 1 and x["seeds"] == 5
    assert (x["q1"], x["q3"]) == (0.3, 1.0)
