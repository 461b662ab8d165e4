"""``hpcdl bench hpo``'s pruning comparison: the summary over seeds, reused searches, and its
bad input."""

from __future__ import annotations

import math

import pytest

from hpcdl.errors import ConfigError
from hpcdl.hpo.bench import differs, parse_seeds, summarize_ratios


def test_bench_hpo_bad_seed_count(capsys):
    from hpcdl.cli import main

    assert main(["bench", "hpo", "--seeds", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --seeds: 0 must be >= 1"], err


@pytest.mark.parametrize(
    "text, seeds",
    [
        ("5", [0, 1, 2, 3, 4]),  # a count: the bench's default seeds
        ("1", [0]),
        ("10-14", [10, 11, 12, 13, 14]),  # seeds held out from those a setting was picked on
        ("7-7", [7]),
        ("0,3,9", [0, 3, 9]),
        (" 2,1 ", [2, 1]),  # the order given is the order run
    ],
)
def test_seeds_are_a_count_a_range_or_a_list(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["0", "-1", "5-3", "a", "1,1", "1,-2", "", "1-", "3,x"])
def test_bad_seeds_are_refused(text):
    with pytest.raises(ConfigError, match="--seeds"):
        parse_seeds(text)


def test_bench_hpo_bad_seed_range(capsys):
    from hpcdl.cli import main

    assert main(["bench", "hpo", "--seeds", "9-5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --seeds: '9-5': give a count N (seeds 0..N-1), a range A-B or a list "
                   "a,b,c of distinct seeds >= 0"], err  # fmt: skip


def test_pbt_searches_with_other_settings_have_other_names():
    from hpcdl.hpo.bench_pbt import pbt_name

    names = {pbt_name(0, "S", i, q) for i in (1, 3) for q in (0.25, 0.5)}
    assert len(names) == 4 and pbt_name(0, "S", 3, 0.25) == "bench-pbt-i3-q0.25-s0-S"


def test_a_seed_that_never_reaches_the_target_counts_as_infinite():
    seeds = [{"asha": {"r": r}} for r in (0.5, None, 0.25, 1.0, 0.3)]
    x = summarize_ratios(seeds, "asha", "r")
    assert x["median"] == 0.5 and x["min"] == 0.25 and math.isinf(x["max"])
    assert x["not_reached"] == 1 and x["seeds"] == 5
    assert (x["q1"], x["q3"]) == (0.3, 1.0)


def test_bench_hpo_bad_pbt_quantile(capsys):
    from hpcdl.cli import main

    assert main(["bench", "hpo", "--pbt", "3", "--pbt-quantile", "0.6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --pbt-quantile: 0.6: give a number in (0, 0.5]"], err


_SPEC = {"objective": "x", "space": {"lr": 1}, "sampler": {"name": "random", "seed": 3},
         "pruner": {"name": "none"}, "pbt": None, "metric": "val_acc", "direction": "maximize",
         "trials": 32, "overrides": {"epochs": 27}, "name": "bench-random-s3-S", "train": "a.yaml",
         "resources": {"site": "local"}}  # fmt: skip


@pytest.mark.parametrize(
    "change, expected",
    [
        ({}, []),
        # what a read-back sweep may differ in: its name, its copied train config, where it ran
        ({"name": "other", "train": "/sweeps/x/train.yaml", "resources": {"site": "dev"}}, []),
        ({"sampler": {"name": "random", "seed": 4}}, ["sampler"]),
        ({"overrides": {"epochs": 12}}, ["overrides"]),
        ({"trials": 16, "pruner": {"name": "asha"}}, ["pruner", "trials"]),
        ({"pbt": {"interval_epochs": 3}}, ["pbt"]),
    ],
)
def test_a_reused_search_must_have_searched_the_same_way(change, expected):
    assert differs(_SPEC, {**_SPEC, **change}) == expected


@pytest.mark.parametrize("name", ["sweep_digits.yaml", "sweep_digits_wide.yaml",
                                  "sweep_digits_long.yaml", "sweep_digits_val.yaml"])  # fmt: skip
def test_the_bench_configs_are_valid_specs(name):
    from pathlib import Path

    from hpcdl.hpo.spec import load_spec

    spec = load_spec(Path(__file__).parents[3] / "configs" / name)
    assert spec.metric == "val_acc" and spec.trials >= 16
