"""Conditional search spaces: a parameter drawn only when others have given values
(``when: {optimizer: sgd}``).

The rules are pure functions of the spec's space, so the spec's validation, the sampling in
:func:`hpcdl.hpo.study.suggest` and the warm start's check of imported trials agree.
"""

from __future__ import annotations

from typing import Any

from hpcdl.hpo.space import Choice, Grid, IntRange, SpecProblem


def wanted(value: Any) -> list[Any]:
    """A condition's allowed values: a list is any of them, anything else is itself."""
    return list(value) if isinstance(value, list) else [value]


def possible(param: Any, value: Any) -> bool:
    """Whether ``param`` can ever take ``value`` (a condition on it that cannot hold is a
    mistake in the spec, not a parameter never drawn)."""
    if isinstance(param, Choice | Grid):
        return value in param.values
    if isinstance(param, IntRange):
        return (isinstance(value, int) and not isinstance(value, bool)
                and param.low <= value <= param.high and (value - param.low) % param.step == 0)  # fmt: skip
    return False


def check_conditions(space: dict[str, Any], sampler: str) -> None:
    """Every ``when`` names another parameter of the space that is a choice or an int range,
    with values it can take, and the conditions have no cycle; the grid sampler takes none
    (its grid is every combination of every parameter)."""
    for key, param in space.items():
        if not param.when:
            continue
        field = f"space.{key}.when"
        if sampler == "grid":
            raise SpecProblem(field, "the grid sampler draws every parameter in every trial: "
                              "conditions need tpe, gp, nsga2, random or cmaes")  # fmt: skip
        for parent, value in param.when.items():
            if parent == key:
                raise SpecProblem(field, f"{key!r} cannot depend on itself")
            if parent not in space:
                raise SpecProblem(field, f"unknown parameter {parent!r} (the space has "
                                  f"{', '.join(k for k in space if k != key)})")  # fmt: skip
            if not isinstance(space[parent], Choice | Grid | IntRange):
                raise SpecProblem(field, f"{parent!r} is a continuous range: a condition "
                                  "needs a choice or int parameter")  # fmt: skip
            for v in wanted(value):
                if not possible(space[parent], v):
                    raise SpecProblem(field, f"{parent}={v!r} is impossible: {parent!r} "
                                      f"takes {_takes(space[parent])}")  # fmt: skip
    draw_order(space)


def _takes(param: Any) -> str:
    if isinstance(param, Choice | Grid):
        return "one of " + ", ".join(repr(v) for v in param.values)
    return f"integers {param.low}..{param.high} step {param.step}"


def draw_order(space: dict[str, Any]) -> list[str]:
    """The space's keys with every parameter after those its condition names (otherwise in
    the spec's order); a cycle is a spec error."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(key: str, path: tuple[str, ...]) -> None:
        if key in order:
            return
        if key in visiting:
            raise SpecProblem(f"space.{key}.when",
                              "conditions form a cycle: " + " -> ".join((*path, key)))  # fmt: skip
        visiting.add(key)
        for parent in space[key].when or {}:
            if parent in space:
                visit(parent, (*path, key))
        visiting.discard(key)
        order.append(key)

    for key in space:
        visit(key, ())
    return order


def active(when: dict[str, Any] | None, drawn: dict[str, Any]) -> bool:
    """Whether a parameter with condition ``when`` is drawn, given the parameters drawn so far
    (a parent that was not drawn itself makes the condition false)."""
    return all(parent in drawn and drawn[parent] in wanted(value)
               for parent, value in (when or {}).items())  # fmt: skip
