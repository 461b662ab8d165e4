"""Bounded input: YAML alias bombs, deep nesting and oversized files are one clear line within a
second (through ``hpcdl render``, ``hpcdl train`` and ``hpcdl sweep run``), and arrays above the
site's ``max_array_tasks`` are refused before anything is queued or written."""

from __future__ import annotations

import time

import pytest
import yaml
from conftest import REPO, one_line_error

from hpcdl.cli import main
from hpcdl.config import MAX_ALIAS_NODES, MAX_YAML_DEPTH, load_yaml


def alias_bomb(levels: int = 7, width: int = 9) -> str:
    """``levels`` anchors, each a list of ``width`` aliases of the previous one: ~350 bytes
    that expand to width**levels strings (4.8 million here; on main: 1.5 s, 9 levels 14 s)."""
    lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def deep(levels: int = 20_000) -> str:
    return "x: " + "[" * levels + "]" * levels + "\n"


COMMANDS = {
    "render": lambda path: ["render", str(path)],
    "train": lambda path: ["train", str(path)],
    "sweep run": lambda path: ["sweep", "run", str(path)],
}
CASES = {
    "alias bomb": (alias_bomb(), ":5: invalid YAML: aliases expand to more than 10,000 nodes"),
    "deep nesting": (deep(), ":1: invalid YAML: nested deeper than 100 levels"),
    "deep block nesting": (
        "".join(" " * i + "k:\n" for i in range(1_000)) + " " * 1_000 + "k: 1\n",
        ":100: invalid YAML: nested deeper than 100 levels",
    ),
    "recursive alias": (
        "a: &a [1, *a]\n",
        ":1: invalid YAML: alias *a refers to a node containing it",
    ),
    "over 1 MiB": ("# padding\n" * 110_000, ": larger than 1 MiB, the limit for a YAML file"),
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", list(CASES))
def test_bad_yaml_is_one_line_within_a_second(tmp_path, capsys, command, case):
    text, expected = CASES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    start = time.perf_counter()
    rc = main(COMMANDS[command](path))
    elapsed = time.perf_counter() - start
    line = one_line_error(capsys, rc)
    assert line == f"error: {path}{expected}"
    assert elapsed < 1.0, f"{case} took {elapsed:.2f}s"
    assert not (tmp_path / "jobs").exists()  # nothing queued, no folder made


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("job.env.X=" + "[" * 5_000 + "]" * 5_000, "nested deeper than 100 levels"),
        ("job.env.X=[&a [1,2,3,4,5,6,7,8,9,10], " + ", ".join(["*a"] * 1_000) + "]",
         "aliases expand to more than 10,000 nodes"),
    ],
    ids=["deep", "aliases"],
)  # fmt: skip
def test_bad_yaml_in_an_override_is_refused(tmp_path, capsys, override, expected):
    config = tmp_path / "train.yaml"
    config.write_text((REPO / "configs/train_digits.yaml").read_text())
    line = one_line_error(capsys, main(["render", str(config), override]))
    assert line.endswith(f"job.env.X: invalid YAML value: {expected}"), line


def test_site_profile_bomb_is_refused(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text("name: bomb\nscheduler: local\n" + alias_bomb())
    line = one_line_error(capsys, main(["site", "show", str(path)]))
    assert line == f"error: {path}:7: invalid YAML: aliases expand to more than 10,000 nodes"


def test_ordinary_anchors_and_nesting_still_load():
    text = "base: &base {lr: 0.1, layers: [1, 2]}\nrun: {<<: *base, lr: 0.2}\nagain: *base\n"
    assert load_yaml(text) == {
        "base": {"lr": 0.1, "layers": [1, 2]},
        "run": {"lr": 0.2, "layers": [1, 2]},
        "again": {"lr": 0.1, "layers": [1, 2]},
    }
    assert load_yaml("[" * MAX_YAML_DEPTH + "]" * MAX_YAML_DEPTH) is not None
    with pytest.raises(yaml.YAMLError):
        load_yaml("[" * (MAX_YAML_DEPTH + 1) + "]" * (MAX_YAML_DEPTH + 1))
    # the budget counts expanded nodes: 1,000 uses of a 10-node anchor fit, 1,001 do not
    item = "&a [" + ", ".join("x" * 9) + "]"
    assert MAX_ALIAS_NODES == 10_000
    assert len(load_yaml(f"[{item}, " + ", ".join(["*a"] * 1_000) + "]")) == 1_001
    with pytest.raises(yaml.YAMLError, match="aliases expand"):
        load_yaml(f"[{item}, " + ", ".join(["*a"] * 1_001) + "]")


def test_the_largest_allowed_file_loads(tmp_path):
    """1 MiB is the bound, not a round number below it: a file of exactly 1 MiB loads."""
    from hpcdl.config import MAX_YAML_BYTES, read_yaml

    path = tmp_path / "big.yaml"
    head = "name: big\n"
    path.write_text(head + "#" * (MAX_YAML_BYTES - len(head) - 1) + "\n")
    assert path.stat().st_size == MAX_YAML_BYTES
    assert read_yaml(path) == {"name": "big"}
