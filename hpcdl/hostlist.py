"""Slurm hostlists (``node[01-03,7],gpu1``) expanded in pure Python: the node lists of a task's
variables (``SLURM_STEP_NODELIST``, read inside every task, containers included, where
``scontrol`` may be missing) and of ``scontrol show partition``."""

from __future__ import annotations

import itertools
import re

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?\Z")


def expand_hostlist(nodelist: str) -> list[str]:
    """``node[1-3,5],gpu7`` → ``node1 node2 node3 node5 gpu7``.

    Ranges keep the zero padding of their lower bound (``n[08-10]`` → ``n08 n09 n10``), several
    bracket groups multiply (``r[1-2]n[1-2]`` → ``r1n1 r1n2 r2n1 r2n2``), text may follow a bracket
    (``n[1-2]-ib``), and empty items are skipped. An empty or blank list is ``[]``. Malformed input
    (unbalanced brackets, a non-numeric or reversed range, an empty bracket) raises ``ValueError``.
    """
    names: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        if item:
            names += _expand_item(item, nodelist)
    return names


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets; unbalanced brackets are an error."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in hostlist {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {text!r}")
        elif ch == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    if depth:
        raise ValueError(f"unclosed '[' in hostlist {text!r}")
    items.append(text[start:].strip())
    return items


def _expand_item(item: str, whole: str) -> list[str]:
    """One host expression: literal text and bracket groups, expanded as a cartesian product."""
    pieces: list[list[str]] = []
    rest = item
    while "[" in rest:
        literal, _, tail = rest.partition("[")
        spec, _, rest = tail.partition("]")  # brackets are balanced and flat (checked above)
        if literal:
            pieces.append([literal])
        pieces.append(_expand_ranges(spec, whole))
    if rest:
        pieces.append([rest])
    return ["".join(p) for p in itertools.product(*pieces)]


def _expand_ranges(spec: str, whole: str) -> list[str]:
    out: list[str] = []
    for part in spec.split(","):
        m = _RANGE.match(part.strip())
        if not m:
            raise ValueError(f"bad range {part!r} in hostlist {whole!r}")
        lo, hi = m[1], m[2] or m[1]
        if int(hi) < int(lo):
            raise ValueError(f"reversed range {part!r} in hostlist {whole!r}")
        out += [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
    return out
